"""``folder:PATH`` tasks in ImageFolder layout: ``PATH/<class>/*`` or ``PATH/{train,val,test}/<class>/*``."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from ..errors import InCAError, first_line
from .base import Split, Task, make_splits

SPLIT_DIR_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


@dataclass
class FileSource:
    """Images read from files on demand (in DataLoader workers)."""

    paths: list[str]

    def load(self, row: int) -> Image.Image:
        with Image.open(self.paths[row]) as image:
            image.load()
            return image.convert("RGB")

    def describe(self, row: int) -> str:
        return self.paths[row]


def load_folder_task(spec: str, path: str, seed: int = 0) -> Task:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise InCAError(f"task {spec}: {root} is not a directory; give folder:PATH with PATH/<class>/<images>")
    split_dirs = {
        split: root / name for split, names in SPLIT_DIR_NAMES.items() for name in names if (root / name).is_dir()
    }
    layout_root = split_dirs.get("train", root)
    try:
        classes, class_to_idx = find_classes(os.fspath(layout_root))
    except FileNotFoundError:
        raise InCAError(
            f"task {spec}: no class folders in {layout_root}; expected {layout_root}/<class>/<images>"
        ) from None

    paths: list[str] = []
    available: dict[str, Split] = {}
    for split, directory in split_dirs.items() if "train" in split_dirs else [("train", root)]:
        unknown = sorted({p.name for p in directory.iterdir() if p.is_dir()} - set(classes))
        if unknown:
            raise InCAError(f"task {spec}: {directory} has classes {unknown} that train does not have")
        try:
            samples = make_dataset(os.fspath(directory), class_to_idx, IMG_EXTENSIONS, allow_empty=split != "train")
        except FileNotFoundError as exc:
            raise InCAError(f"task {spec}: {first_line(exc)} (in {directory})") from None
        start = len(paths)
        paths.extend(p for p, _ in samples)
        available[split] = Split(None, np.arange(start, len(paths)), [label for _, label in samples])
    source = FileSource(paths)
    for split in available.values():
        split.source = source
    identity = {
        "root": os.fspath(root.resolve()),
        "files": _files_digest(paths, root),
    }
    return Task(spec, classes, make_splits(available, seed=seed), identity)


def _files_digest(paths: list[str], root: Path) -> str:
    """Relative paths and sizes: a renamed, added, removed or rewritten image changes the task's identity."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.relpath(path, root).encode())
        digest.update(str(os.path.getsize(path)).encode())
    return digest.hexdigest()[:16]

