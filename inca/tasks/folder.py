"""``folder:PATH`` tasks in ImageFolder layout: ``PATH/<class>/*`` or ``PATH/{train,val,test}/<class>/*``.

The task's identity is the SHA-256 of every image's bytes, so a store or result built from images that have
since changed (even rewritten with the same size) is never reused. Hashes are remembered per file by
(size, mtime, ctime, inode) in ``$INCA_CACHE/file-hashes``; ctime cannot be set back by a user, so an
unchanged entry is a file that was not rewritten, and a rerun reads only what changed. Directories are
walked in sorted order and each real directory once, so a symlink loop cannot repeat images; the same
image content in two splits is reported, since it leaks evaluation data into training.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InCAError
from ..io import atomic_write_json, cache_root, digest, file_sha256, read_json
from ..progress import progress
from .base import Split, Task, make_splits
from .registry import TaskLoadConfig, register_task_source

logger = logging.getLogger(__name__)

SPLIT_DIR_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


@dataclass
class FileSource:
    """Images read from files on demand (in DataLoader workers)."""

    in_memory = False
    paths: list[str]

    def load(self, row: int) -> Image.Image:
        with Image.open(self.paths[row]) as image:
            image.load()
            return image.convert("RGB")

    def describe(self, row: int) -> str:
        return self.paths[row]


def load_folder_task(spec: str, path: str, seed: int = 0, skip_bad_images: bool = False) -> Task:
    """The task in ``path``; unreadable images are all named in one error, or dropped (and counted in the
    task's identity) with ``skip_bad_images``."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

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
    seen: set[str] = set()
    available: dict[str, Split] = {}
    for split, directory in split_dirs.items() if "train" in split_dirs else [("train", root)]:
        unknown = sorted({p.name for p in directory.iterdir() if p.is_dir()} - set(classes))
        if unknown:
            raise InCAError(f"task {spec}: {directory} has classes {unknown} that train does not have")
        samples = [(file, class_to_idx[c]) for c in classes for file in _image_files(directory / c, seen)]
        empty = sorted(set(classes) - {classes[label] for _, label in samples})
        if empty and split == "train":
            raise InCAError(f"task {spec}: class folders {empty[:5]} under {directory} hold no valid file "
                            f"({', '.join(IMG_EXTENSIONS)}); add images or remove the folders")
        start = len(paths)
        paths.extend(p for p, _ in samples)
        available[split] = Split(None, np.arange(start, len(paths)), [label for _, label in samples])
    scanned = scan_files(paths)
    bad = [p for p, (_, ok) in zip(paths, scanned) if not ok]
    if bad and not skip_bad_images:
        raise InCAError(f"task {spec}: {bad_images_message(bad)}; fix or remove them, or pass --skip-bad-images")
    if bad:
        logger.warning("task %s: skipping %s", spec, bad_images_message(bad))
        keep = np.array([ok for _, ok in scanned])
        available = {name: split.subset(np.flatnonzero(keep[split.rows])) for name, split in available.items()}
    source = FileSource(paths)
    for split in available.values():
        split.source = source
    hashes = [sha for sha, _ in scanned]
    identity = {"root": os.fspath(root.resolve()), "files": _files_digest(paths, root, hashes),
                "skipped_images": len(bad)}
    splits = make_splits(available, seed=seed)
    _report_duplicates(spec, splits, paths, hashes)
    return Task(spec, classes, splits, identity)


def _image_files(directory: Path, seen: set[str]) -> list[str]:
    """Image files under ``directory``, sorted, recursing into each real directory once (``seen`` holds the
    real paths already walked, shared across the task's splits)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    real = os.path.realpath(directory)
    if real in seen or not os.path.isdir(real):
        return []
    seen.add(real)
    files: list[str] = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_dir():
            files.extend(_image_files(Path(entry.path), seen))
        elif entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS):
            files.append(entry.path)
    return files


def scan_files(paths: list[str]) -> list[tuple[str, bool]]:
    """For each image file: the SHA-256 of its bytes and whether PIL can read it. Remembered across runs by
    (size, mtime_ns, ctime_ns, inode), so each file is read once until it changes."""
    index_file = cache_root() / "file-hashes" / f"{digest(sorted({os.path.dirname(p) for p in paths}))}.json"
    try:
        known = read_json(index_file)
    except (OSError, ValueError):
        known = {}
    scanned, fresh = [], {}
    for path in progress(paths, desc="scanning images", unit="file", enabled=len(paths) >= 1000):
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise InCAError(f"cannot read {path} ({exc.strerror}); fix its permissions or remove it") from None
        key = f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}"
        entry = known.get(path)
        if isinstance(entry, list) and len(entry) == 3 and entry[0] == key:
            fresh[path] = entry
        else:
            fresh[path] = [key, file_sha256(path), _readable(path)]
        scanned.append((fresh[path][1], bool(fresh[path][2])))
    if fresh != known:
        with contextlib.suppress(OSError, InCAError):  # the index only saves time: never fail a run over it
            atomic_write_json(index_file, fresh)
    return scanned


def _readable(path: str) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # PIL raises many kinds for damaged files
        return False


def unreadable_images(paths: list[str]) -> list[str]:
    """The files among ``paths`` that PIL cannot read."""
    return [path for path in paths if not _readable(path)]


def bad_images_message(bad: list[str]) -> str:
    """One line naming every unreadable image."""
    return f"{len(bad)} unreadable image(s): {', '.join(bad)}"


def _files_digest(paths: list[str], root: Path, hashes: list[str]) -> str:
    """Relative paths and content: a renamed, added, removed or rewritten image changes the task's identity."""
    sha = hashlib.sha256()
    for path, value in zip(paths, hashes):
        sha.update(os.path.relpath(path, root).encode())
        sha.update(value.encode())
    return sha.hexdigest()[:16]


def _report_duplicates(spec: str, splits: dict[str, Split], paths: list[str], hashes: list[str]) -> None:
    """Warn when the same image content appears in two splits: evaluation would see training images."""
    where: dict[str, set[str]] = {}
    for name, split in splits.items():
        for row in split.rows:
            where.setdefault(hashes[row], set()).add(name)
    shared = {h: names for h, names in where.items() if len(names) > 1}
    if shared:
        example = paths[hashes.index(next(iter(shared)))]
        logger.warning("task %s: %d images appear (same content) in more than one of train/val/test, e.g. %s; "
                       "deduplicate the folders so evaluation never sees training images", spec, len(shared), example)


def _check(spec: str, path: str, settings: TaskLoadConfig) -> None:
    if not Path(path).expanduser().is_dir():
        raise InCAError(f"task {spec}: {path} is not a directory; give folder:PATH with PATH/<class>/<images>")


def _load(spec: str, path: str, settings: TaskLoadConfig) -> Task:
    return load_folder_task(spec, path, seed=settings.split_seed, skip_bad_images=settings.skip_bad_images)


register_task_source(
    "folder:", load=_load, check=_check, spec_form="folder:PATH",
    summary="images in PATH/<class>/ or PATH/{train,val,test}/<class>/",
)  # fmt: skip
