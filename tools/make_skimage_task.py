"""Write an image-folder task of crops from the real photographs and textures that scikit-image's wheel bundles.

Why this data: it judges the proxy backbone (tools/pretrain_proxy.py) on images that played no part in shaping
its recipe. The recipe was tuned on digits and the synth-* tasks; these are photographs and scans (a portrait,
a cat, a coffee cup, coins, the Moon, a rocket launch, a retina, a stained tissue slide, Hubble's deep field,
printed text, and brick, grass and gravel textures) that install offline with ``pip install scikit-image``
(the files ship inside the wheel, ``skimage/data``; nothing is fetched). Drawings and synthetic images of that
folder (chessboards, a logo, a silhouette, a phantom, a colour chart) are left out.

The class of a crop is the image it comes from. Each image, its shorter side reduced to at most
:data:`MAX_SIDE` pixels, is cut into a grid of :data:`TILE`-pixel tiles; the tiles are shuffled (``--seed``)
and dealt to train, val and test, every split getting at least one, and every crop lies inside one tile of its
split: no crop shares a pixel with a crop of another split. A crop is a random square of
:data:`MIN_CROP`-:data:`TILE` pixels resized to the proxy's 32x32 input.

    python tools/make_skimage_task.py --out runs/skimage-crops
    inca-probe ... --tasks folder:runs/skimage-crops

Writes ``OUT/{train,val,test}/<image>/<n>.png`` in a temporary folder beside OUT, renamed into place when
complete.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

# The photographs and texture scans of skimage/data (scikit-image 0.26), by file name.
IMAGES = ["astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
          "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
          "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png"]
MAX_SIDE = 256  # the large scans (retina 1411 px, Hubble 872 px) brought near the others' scale
TILE = 64  # the smallest image (text.png, 172 px high) still gives 2 x 7 tiles
MIN_CROP = 24  # crops of 24-64 px resized to 32: from slightly enlarged to halved, as the proxy's views are
SIZE = 32  # the proxy's input size
SPLIT_SHARES = {"train": 0.7, "val": 0.1, "test": 0.2}  # of each image's tiles


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=60, help="crops per image in train")
    parser.add_argument("--val", type=int, default=15, help="crops per image in val")
    parser.add_argument("--test", type=int, default=30, help="crops per image in test")
    return parser.parse_args()


def data_dir() -> Path:
    """skimage/data of the installed wheel (imported only here: the rest needs no scikit-image)."""
    try:
        import skimage
    except ImportError as exc:
        raise SystemExit("scikit-image is not installed; pip install -e '.[results]'") from exc
    return Path(skimage.__file__).parent / "data"


def load_image(path: Path) -> Image.Image:
    """The image in RGB, its shorter side reduced to at most MAX_SIDE."""
    image = Image.open(path).convert("RGB")
    scale = MAX_SIDE / min(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    return image


def deal_tiles(width: int, height: int, rng: np.random.Generator) -> dict[str, list[tuple[int, int]]]:
    """The image's TILE x TILE tiles (their top-left corners), shuffled and dealt to the splits by
    SPLIT_SHARES, each split at least one tile."""
    tiles = [(x, y) for y in range(0, height - TILE + 1, TILE) for x in range(0, width - TILE + 1, TILE)]
    if len(tiles) < len(SPLIT_SHARES):
        raise ValueError(f"a {width}x{height} image has fewer than {len(SPLIT_SHARES)} tiles of {TILE} px")
    order = rng.permutation(len(tiles))
    counts = {s: max(1, round(share * len(tiles))) for s, share in SPLIT_SHARES.items() if s != "train"}
    counts["train"] = len(tiles) - sum(counts.values())
    dealt, start = {}, 0
    for split in SPLIT_SHARES:
        dealt[split] = [tiles[i] for i in order[start:start + counts[split]]]
        start += counts[split]
    return dealt


def crop_boxes(tiles: list[tuple[int, int]], count: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """``count`` random squares (left, top, right, bottom), each inside one of ``tiles``."""
    boxes = []
    for _ in range(count):
        x, y = tiles[rng.integers(len(tiles))]
        side = int(rng.integers(MIN_CROP, TILE + 1))
        left, top = x + int(rng.integers(TILE - side + 1)), y + int(rng.integers(TILE - side + 1))
        boxes.append((left, top, left + side, top + side))
    return boxes


def write_task(out: Path, source: Path, counts: dict[str, int], seed: int) -> None:
    """Every image's crops under ``out/<split>/<image>/``."""
    missing = [name for name in IMAGES if not (source / name).is_file()]
    if missing:
        raise SystemExit(f"{source} lacks {', '.join(missing)}; pip install -e '.[results]' (scikit-image>=0.26)")
    rng = np.random.default_rng(seed)
    for name in IMAGES:
        image = load_image(source / name)
        for split, tiles in deal_tiles(image.width, image.height, rng).items():
            folder = out / split / Path(name).stem
            folder.mkdir(parents=True)
            for n, box in enumerate(crop_boxes(tiles, counts[split], rng)):
                crop = image.crop(box).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
                crop.save(folder / f"{n:04d}.png")


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; remove it or give another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = {"train": args.train, "val": args.val, "test": args.test}
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_task(staging, data_dir(), counts, args.seed)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out}: {len(IMAGES)} classes, {counts} crops per class; use --tasks folder:{out}")


if __name__ == "__main__":
    main()
