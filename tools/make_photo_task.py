"""Write an image-folder task of crops from real images that installed packages bundle: an evaluation set and a
design set, by the same code.

Why this data: the proxy backbone (tools/pretrain_proxy.py) is made for small real images, yet its formulas
are drawn, not photographed. Two sources, kept apart by their role (docs/proxy-recipe.md):

* ``--source design``: the images recipe candidates are compared on, from matplotlib and scikit-learn
  (``mpl-data/sample_data``, ``sklearn/datasets/images``): Grace Hopper's portrait, the photographs of a
  Chinese temple and a flower, an MRI slice of a head (``s1045.ima.gz``), the elevation raster of the
  Jacksboro fault (``jacksboro_fault_dem.npz``, as grey levels), and one rendered illustration, a blue gift
  pack (``Minduka_Present_Blue_Pack.png``), kept because every recorded design-set figure was measured with
  it. The other drawings, a logo and rasters smaller than three tiles (``topobathy.npz``) are left out.
* ``--source skimage``: the images the frozen recipe is judged on, once, and never designed on: the
  photographs and scans that scikit-image's wheel bundles (``skimage/data``: a portrait, a cat, a coffee
  cup, coins, the Moon, a rocket launch, a retina, a stained tissue slide, Hubble's deep field, printed text,
  and brick, grass and gravel textures). Its drawings and synthetic images (chessboards, a logo, a
  silhouette, a phantom, a colour chart) are left out.

Both install offline (``pip install -e '.[results]'`` for scikit-image; matplotlib and scikit-learn come with
inca); nothing is fetched, and no image is in both sets.

The class of a crop is the image it comes from. Each image, its shorter side reduced to at most
:data:`MAX_SIDE` pixels, is cut into a grid of :data:`TILE`-pixel tiles; the tiles are shuffled (``--seed``)
and dealt to train, val and test, every split getting at least one, and every crop lies inside one tile of its
split: no crop shares a pixel with a crop of another split. A crop is a random square of
:data:`MIN_CROP`-:data:`TILE` pixels resized to the proxy's 32x32 input.

    python tools/make_photo_task.py --source design --out runs/design-crops
    python tools/make_photo_task.py --source skimage --out runs/skimage-crops
    inca-probe ... --tasks folder:runs/skimage-crops

Writes ``OUT/{train,val,test}/<image>/<n>.png`` in a temporary folder beside OUT, renamed into place when
complete.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

# The photographs and texture scans of skimage/data (scikit-image 0.26), by file name.
SKIMAGE = ["astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
           "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
           "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png"]
MAX_SIDE = 256  # the large scans (retina 1411 px, Hubble 872 px) brought near the others' scale
TILE = 64  # the smallest image (the 128-px gift pack; text.png, 172 px high) still gives 4 tiles
MIN_CROP = 24  # crops of 24-64 px resized to 32: from slightly enlarged to halved, as the proxy's views are
SIZE = 32  # the proxy's input size
SPLIT_SHARES = {"train": 0.7, "val": 0.1, "test": 0.2}  # of each image's tiles


class MissingImages(Exception):
    """A package that holds a set's images is not installed, or lacks some of them."""


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, choices=sorted(SOURCES),
                        help="design: matplotlib's and scikit-learn's images (to compare recipes on); skimage: "
                             "scikit-image's (to judge the frozen recipe on)")
    parser.add_argument("--out", required=True, help="folder to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=60, help="crops per image in train")
    parser.add_argument("--val", type=int, default=15, help="crops per image in val")
    parser.add_argument("--test", type=int, default=30, help="crops per image in test")
    return parser


def _package_dir(module: str, extra: str) -> Path:
    """The installed package's folder (imported only here: the rest needs none of them)."""
    import importlib

    try:
        return Path(importlib.import_module(module).__file__).parent
    except ImportError as exc:
        raise MissingImages(f"{module} is not installed; pip install -e '.{extra}'") from exc


def _grey(values: np.ndarray) -> Image.Image:
    """A raster (an MRI slice, an elevation map) as an RGB image of its values stretched to 0-255."""
    values = values.astype(np.float64)
    low, high = values.min(), values.max()
    return Image.fromarray(np.round(255 * (values - low) / (high - low)).astype(np.uint8)).convert("RGB")


def skimage_images() -> dict[str, Image.Image]:
    folder = _package_dir("skimage", "[results]") / "data"
    missing = [name for name in SKIMAGE if not (folder / name).is_file()]
    if missing:
        raise MissingImages(f"{folder} lacks {', '.join(missing)}; pip install -e '.[results]' (scikit-image>=0.26)")
    return {Path(name).stem: Image.open(folder / name).convert("RGB") for name in SKIMAGE}


def design_images() -> dict[str, Image.Image]:
    mpl = _package_dir("matplotlib", "") / "mpl-data" / "sample_data"
    sklearn = _package_dir("sklearn", "") / "datasets" / "images"
    with gzip.open(mpl / "s1045.ima.gz") as file:  # 256x256 big-endian 16-bit, as matplotlib's MRI demo reads it
        mri = np.frombuffer(file.read(), ">u2").reshape(256, 256)
    return {
        "grace_hopper": Image.open(mpl / "grace_hopper.jpg").convert("RGB"),
        "gift_pack": Image.open(mpl / "Minduka_Present_Blue_Pack.png").convert("RGB"),
        "mri": _grey(mri),
        "fault_elevation": _grey(np.load(mpl / "jacksboro_fault_dem.npz")["elevation"]),
        "china": Image.open(sklearn / "china.jpg").convert("RGB"),
        "flower": Image.open(sklearn / "flower.jpg").convert("RGB"),
    }


SOURCES: dict[str, Callable[[], dict[str, Image.Image]]] = {"skimage": skimage_images, "design": design_images}


def shrink(image: Image.Image) -> Image.Image:
    """The image with its shorter side reduced to at most MAX_SIDE."""
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


def write_task(out: Path, images: dict[str, Image.Image], counts: dict[str, int], seed: int) -> None:
    """Every image's crops under ``out/<split>/<image>/``."""
    rng = np.random.default_rng(seed)
    for name, image in images.items():
        image = shrink(image)
        for split, tiles in deal_tiles(image.width, image.height, rng).items():
            folder = out / split / name
            folder.mkdir(parents=True)
            for n, box in enumerate(crop_boxes(tiles, counts[split], rng)):
                crop = image.crop(box).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
                crop.save(folder / f"{n:04d}.png")


def main(argv: list[str] | None = None) -> None:
    """Bad input (OUT exists, a count below 1, a set's package missing) exits with code 2 and one line."""
    parser = make_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        parser.error(f"{out} exists; remove it or give another --out")
    counts = {"train": args.train, "val": args.val, "test": args.test}
    if min(counts.values()) < 1:
        parser.error(f"every split needs at least one crop per image, got {counts}")
    try:
        images = SOURCES[args.source]()
    except MissingImages as exc:
        parser.error(str(exc))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_task(staging, images, counts, args.seed)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out}: {len(images)} classes ({', '.join(images)}), {counts} crops per class; "
          f"use --tasks folder:{out}")


if __name__ == "__main__":
    main()
