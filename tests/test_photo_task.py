"""tools/make_photo_task.py: no crop shares a pixel with a crop of another split, the task is seeded, and the design
set's images load from the installed packages."""

import numpy as np
import pytest

from tests.conftest import load_tool


@pytest.fixture(scope="module")
def tool():
    return load_tool("make_photo_task")


def _covered(boxes, width, height):
    mask = np.zeros((height, width), dtype=bool)
    for left, top, right, bottom in boxes:
        mask[top:bottom, left:right] = True
    return mask


@pytest.mark.parametrize("width,height", [(448, 172), (256, 256), (385, 256)])
def test_splits_draw_crops_from_disjoint_pixels(tool, width, height):
    rng = np.random.default_rng(0)
    dealt = tool.deal_tiles(width, height, rng)
    assert all(dealt.values()), "every split gets a tile"
    masks = {split: _covered(tool.crop_boxes(tiles, 200, rng), width, height) for split, tiles in dealt.items()}
    for a in masks:
        for b in masks:
            assert a == b or not (masks[a] & masks[b]).any(), (a, b)
    sides = [right - left for tiles in dealt.values() for left, _, right, _ in tool.crop_boxes(tiles, 50, rng)]
    assert min(sides) >= tool.MIN_CROP and max(sides) <= tool.TILE


def test_the_same_seed_deals_the_same_tiles(tool):
    first, again, other = (tool.deal_tiles(256, 256, np.random.default_rng(s)) for s in (0, 0, 1))
    assert first == again and first != other


def test_design_images_load_and_each_gives_every_split_a_tile(tool):
    images = tool.design_images()
    assert len(images) == 6 and not set(images) & {name.split(".")[0] for name in tool.SKIMAGE}
    for name, image in images.items():
        image = tool.shrink(image)
        assert image.mode == "RGB" and min(image.size) <= tool.MAX_SIDE, name
        assert all(tool.deal_tiles(image.width, image.height, np.random.default_rng(0)).values()), name


def _exit_code(tool, argv):
    with pytest.raises(SystemExit) as exit_:
        tool.main(argv)
    return exit_.value.code


def test_bad_input_exits_2_and_writes_nothing(tool, tmp_path, monkeypatch, capsys):
    out = tmp_path / "crops"
    out.mkdir()
    assert _exit_code(tool, ["--source", "design", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and not any(out.iterdir())
    fresh = tmp_path / "fresh"
    assert _exit_code(tool, ["--source", "design", "--out", str(fresh), "--val", "0"]) == 2

    def missing():
        raise tool.MissingImages("scikit-image is not installed")

    monkeypatch.setitem(tool.SOURCES, "skimage", missing)
    assert _exit_code(tool, ["--source", "skimage", "--out", str(fresh)]) == 2
    assert "not installed" in capsys.readouterr().err and not fresh.exists()
