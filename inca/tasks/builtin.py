"""Offline tasks: scikit-learn's bundled digits and procedural ``synth-*`` tasks generated from a seed.

The synthetic tasks are 32x32 RGB images drawn with numpy, deterministic for a seed, and chosen to need
different things of a representation: shape, counting (spatial reasoning), orientation and colour.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .base import ArraySource, Split, Task, make_splits
from .registry import TaskLoadConfig, register_task_source

# The synth-* tasks' image side and split sizes: inca's own choice. 32 px is the input of the tests' and the proxy's
# tiny ViT (img_size=32, patch_size=8: 16 patches); 1000/200/400 rows keep a task's activations small enough for a
# CPU run while a test accuracy is measured on 400 images (one image moves it by 0.25 points).
SYNTH_SIZE = 32
SYNTH_SPLIT_SIZES = {"train": 1000, "val": 200, "test": 400}


def load_digits_task(seed: int = 0) -> Task:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)  # 8x8, values 0..16
    source = ArraySource(images, "digits")
    full = Split(source, np.arange(len(images)), digits.target)
    splits = make_splits({"train": full}, seed=seed)
    return Task("digits", [str(i) for i in range(10)], splits, {"source": "sklearn.datasets.load_digits", "seed": seed})


def _grid() -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:SYNTH_SIZE, 0:SYNTH_SIZE].astype(np.float32)


def _canvas(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A noisy background of a random dark colour, and a random bright foreground colour."""
    background = rng.uniform(0, 110, size=3)
    image = np.broadcast_to(background, (SYNTH_SIZE, SYNTH_SIZE, 3)) + rng.normal(0, 12, (SYNTH_SIZE, SYNTH_SIZE, 3))
    foreground = rng.uniform(150, 255, size=3)
    return image, foreground


def _paint(image: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    image[mask] = colour


def _draw_shapes(rng: np.random.Generator, label: int) -> np.ndarray:
    yy, xx = _grid()
    image, colour = _canvas(rng)
    radius = rng.uniform(5, 10)
    cy, cx = rng.uniform(radius + 1, SYNTH_SIZE - radius - 1, size=2)
    dy, dx = yy - cy, xx - cx
    if label == 0:  # circle
        mask = dy**2 + dx**2 <= radius**2
    elif label == 1:  # square
        mask = (np.abs(dy) <= radius * 0.8) & (np.abs(dx) <= radius * 0.8)
    elif label == 2:  # triangle, apex up
        mask = (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.55)
    else:  # cross
        arm = radius * 0.3
        mask = ((np.abs(dy) <= arm) & (np.abs(dx) <= radius)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= radius))
    _paint(image, mask, colour)
    return image


def _draw_count(rng: np.random.Generator, label: int) -> np.ndarray:
    """``label + 1`` dots of radius 2-3 that never touch: the count is the only thing that varies by class."""
    yy, xx = _grid()
    image, colour = _canvas(rng)
    centres: list[np.ndarray] = []
    while len(centres) < label + 1:
        candidate = rng.uniform(4, SYNTH_SIZE - 4, size=2)
        if all(np.linalg.norm(candidate - c) > 7.5 for c in centres):
            centres.append(candidate)
    for cy, cx in centres:
        radius = rng.uniform(2.0, 3.0)
        _paint(image, (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2, colour)
    return image


def _draw_orientation(rng: np.random.Generator, label: int) -> np.ndarray:
    yy, xx = _grid()
    image, colour = _canvas(rng)
    angle = np.deg2rad(45.0 * label + rng.uniform(-8, 8))
    cy, cx = rng.uniform(12, SYNTH_SIZE - 12, size=2)
    along = (xx - cx) * np.cos(angle) - (yy - cy) * np.sin(angle)
    across = (xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    _paint(image, (np.abs(along) <= rng.uniform(8, 12)) & (np.abs(across) <= 1.6), colour)
    return image


COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230), "yellow": (230, 220, 40),
           "magenta": (220, 50, 210), "cyan": (40, 210, 220)}


def _draw_colour(rng: np.random.Generator, label: int) -> np.ndarray:
    yy, xx = _grid()
    image = rng.uniform(60, 160) + rng.normal(0, 20, (SYNTH_SIZE, SYNTH_SIZE, 3))  # grey, noisy
    colour = np.array(list(COLOURS.values())[label], dtype=np.float32) + rng.normal(0, 15, 3)
    radius = rng.uniform(5, 10)
    cy, cx = rng.uniform(radius, SYNTH_SIZE - radius, size=2)
    _paint(image, (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2, colour)
    return image


SYNTH_TASKS: dict[str, tuple[list[str], Callable[[np.random.Generator, int], np.ndarray]]] = {
    "shapes": (["circle", "square", "triangle", "cross"], _draw_shapes),
    "count": (["1", "2", "3", "4", "5"], _draw_count),
    "orientation": (["0", "45", "90", "135"], _draw_orientation),
    "colour": (list(COLOURS), _draw_colour),
}


def load_synth_task(kind: str, seed: int = 0) -> Task:
    """Generate ``synth-<kind>``: balanced classes, each split from its own seeded stream."""
    classes, draw = SYNTH_TASKS[kind]
    images, labels, starts = [], [], {}
    for offset, (split, size) in enumerate(SYNTH_SPLIT_SIZES.items()):
        rng = np.random.default_rng([seed, offset, sum(map(ord, kind))])
        split_labels = rng.permutation(np.arange(size) % len(classes))
        starts[split] = len(labels)
        images.extend(draw(rng, int(label)) for label in split_labels)
        labels.extend(split_labels.tolist())
    array = np.clip(np.stack(images), 0, 255).round().astype(np.uint8)
    source = ArraySource(array, f"synth-{kind}")
    labels_array = np.asarray(labels)
    splits = {}
    for split, size in SYNTH_SPLIT_SIZES.items():
        rows = np.arange(starts[split], starts[split] + size)
        splits[split] = Split(source, rows, labels_array[rows])
    return Task(f"synth-{kind}", classes, splits, {"generator": "inca.synth/1", "seed": seed})


def _load_digits(spec: str, name: str, settings: TaskLoadConfig) -> Task:
    return load_digits_task(seed=settings.split_seed)


def _load_synth(spec: str, name: str, settings: TaskLoadConfig) -> Task:
    return load_synth_task(name.removeprefix("synth-"), seed=settings.split_seed)


register_task_source("digits", load=_load_digits, spec_form="digits",
                     summary="scikit-learn's 8x8 handwritten digits, offline")
register_task_source(
    [f"synth-{kind}" for kind in SYNTH_TASKS], name="synth", load=_load_synth,
    spec_form="synth-{" + ",".join(SYNTH_TASKS) + "}",
    summary="procedural 32x32 images generated from the seed: shape, dot count, orientation or colour",
)  # fmt: skip
