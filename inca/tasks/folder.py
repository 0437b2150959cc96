"""``folder:PATH`` tasks: images in class folders, optionally under split folders.

Layout rules (also in the README, "Task specs"):

- **Skipped everywhere**: names starting with ``.`` (``.ipynb_checkpoints``, ``.cache``, ``.git``, macOS'
  ``._x.jpg``) and the system folders in :data:`SYSTEM_NAMES` (``__MACOSX``, ``@eaDir``, ...).
- **Split folders** are PATH's sub-folders named ``train``, ``val`` / ``valid`` / ``validation`` or ``test``
  (any letter case). If PATH has one, it is a split layout, ``PATH/<split>/<class>/<images>``: it must have
  ``train``, nothing but split folders beside it, and each split under one name only. Otherwise every
  sub-folder of PATH is a class, ``PATH/<class>/<images>``.
- **A class folder** is a sub-folder of PATH (class layout) or of a split folder. Its images are the regular
  files (or links to one; never FIFOs, devices or sockets) with an image extension in it and in its
  sub-folders at any depth. An image file directly in PATH or in a split folder belongs to no class: it is
  left out, with a warning.
- **Classes** are train's class folders, sorted by name. A val or test class folder is matched to them by
  name; one that train does not have is refused. Each train class folder must hold an image; a class may
  have no val or test images.
- **Refused**, in one line naming the paths: split folders beside other folders, val/test without train,
  one split under two names, a class missing from train, a folder that cannot be listed.
- A missing val or test split is carved from train (``--split-seed``).

Every image is decoded in full up front (in threads: decoding and hashing release the GIL), exactly as
training reads it, so a truncated file is named before training starts (``--skip-bad-images`` leaves it out).

The task's identity is the folder's resolved path and the SHA-256 of every image's bytes: the same folder
spelled another way (relative, with ``..``, a trailing slash, through a symlink) is one task, named after the
folder (``faces-<fingerprint>``), and a store or result built from images that have since changed (even
rewritten with the same size) is never reused. The layout is checked before any image is read (and before
torch is imported): folders are listed, each train class folder must hold an image file. Each file's hash
and decode check are remembered by (size, mtime, ctime, inode) in ``$INCA_CACHE/file-scans``; ctime cannot be
set back by a user, so an unchanged entry is a file that was not rewritten, and a rerun reads only what
changed. Directories are walked in sorted order and each real directory once, so a symlink loop cannot repeat
images; the same image content in two splits is reported, since it leaks evaluation data into training.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InCAError, first_line
from ..images import IMAGE_EXTENSIONS, open_image, open_image_turned
from ..io import FINGERPRINT_LENGTH, atomic_write_json, cache_root, digest, file_sha256, read_json
from ..progress import progress
from .base import Split, Task, make_splits
from .registry import TaskLoadConfig, register_task_source

logger = logging.getLogger(__name__)

SPLIT_DIR_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
# Folders that operating systems, NAS boxes and archivers add beside the data (names starting with "." too).
SYSTEM_NAMES = frozenset({"__MACOSX", "@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN", "System Volume Information",
                          "lost+found", "__pycache__"})
SCAN_WORKERS = min(8, os.cpu_count() or 1)
SCAN_CHUNK = 1024  # files in flight at once, so a large dataset does not queue a future per file


@dataclass
class FileSource:
    """Images read from files on demand (in DataLoader workers)."""

    in_memory = False
    paths: list[str]

    def load(self, row: int) -> Image.Image:
        return open_image(self.paths[row])  # decoded, upright by its EXIF orientation, as prediction reads it

    def describe(self, row: int) -> str:
        return self.paths[row]


def is_skipped(name: str) -> bool:
    """Hidden and system entries, which are never classes, splits or images."""
    return name.startswith(".") or name in SYSTEM_NAMES


def load_folder_task(spec: str, path: str, seed: int = 0, skip_bad_images: bool = False) -> Task:
    """The task in ``path`` (layout rules in the module docstring); unreadable images are all named in one
    error, or dropped (and counted in the task's identity) with ``skip_bad_images``."""
    root = _directory(spec, path)
    layout = folder_layout(spec, root)
    folders, class_dirs = layout.folders, layout.class_dirs
    for directory, loose in layout.loose.items():
        _warn_loose_images(spec, directory, loose)
    classes = sorted(class_dirs["train"])
    paths: list[str] = []
    seen: set[str] = set()
    available: dict[str, Split] = {}
    for split, found in class_dirs.items():
        samples = [(file, label) for label, name in enumerate(classes) if name in found
                   for file in _image_files(spec, found[name], seen)]
        empty = sorted(set(classes) - {classes[label] for _, label in samples})
        if empty and split == "train":
            raise _no_images(spec, empty, folders[split])
        start = len(paths)
        paths.extend(p for p, _ in samples)
        available[split] = Split(None, np.arange(start, len(paths)), [label for _, label in samples])
    scanned = scan_files(paths)
    bad = [f"{p} ({problem})" for p, (_, problem, _) in zip(paths, scanned) if problem]
    if bad and not skip_bad_images:
        raise InCAError(f"task {spec}: {bad_images_message(bad)}; fix or remove them, or pass --skip-bad-images")
    if bad:
        logger.warning("task %s: skipping %s", spec, bad_images_message(bad))
        keep = np.array([problem is None for _, problem, _ in scanned])
        available = {name: split.subset(np.flatnonzero(keep[split.rows])) for name, split in available.items()}
    source = FileSource(paths)
    for split in available.values():
        split.source = source
    hashes = [sha for sha, _, _ in scanned]
    identity = {"root": os.fspath(root.resolve()), "files": _files_digest(paths, root, hashes),
                "skipped_images": len(bad)}
    turned = sum(bool(t) for _, problem, t in scanned if problem is None)
    if turned:  # read upright (inca.images): never the same activations as a reader that ignores the tag
        identity["turned_by_exif"] = turned
    splits = make_splits(available, seed=seed)
    _report_duplicates(spec, splits, paths, hashes)
    return Task(spec, classes, splits, identity)


def _directory(spec: str, path: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise InCAError(f"task {spec}: {path} is not a directory; give folder:PATH with PATH/<class>/<images>")
    return root


@dataclass(frozen=True)
class FolderLayout:
    """A folder task's layout from one listing of its root and of each split folder: the split folders
    (``{"train": root}`` in a class layout), each split's class folders by name, and the image files lying
    directly in those folders (in no class)."""

    folders: dict[str, Path]
    class_dirs: dict[str, dict[str, Path]]
    loose: dict[Path, list[str]]


def folder_layout(spec: str, root: Path) -> FolderLayout:
    """Every layout rule but the images', checked by listing the root and the split folders once each."""
    listed = _visible_entries(spec, root)
    folders = split_folders(spec, root, listed) or {"train": root}
    listings = {folder: listed if folder == root else _visible_entries(spec, folder) for folder in folders.values()}
    class_dirs = {split: {e.name: Path(e.path) for e in listings[folder] if _is_dir(e)}
                  for split, folder in folders.items()}
    if not class_dirs["train"]:
        raise InCAError(f"task {spec}: no class folders in {folders['train']}; expected "
                        f"{folders['train']}/<class>/<images>")
    for split, found in class_dirs.items():
        unknown = sorted(set(found) - set(class_dirs["train"]))
        if unknown:
            raise InCAError(f"task {spec}: {folders[split]} has classes {unknown[:5]} that train does not have "
                            f"({folders['train']}); class folders are matched by name across splits")
    loose = {directory: [e.path for e in entries if _is_image(e)]
             for directory, entries in {root: listed, **listings}.items()}
    return FolderLayout(folders, class_dirs, loose)


def _no_images(spec: str, empty: list[str], folder: Path) -> InCAError:
    return InCAError(f"task {spec}: class folders {empty[:5]} under {folder} hold no valid file "
                     f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folders")


def split_folders(spec: str, root: Path, entries: list[os.DirEntry]) -> dict[str, Path]:
    """``{split: folder}`` (train first) when ``root`` (listed as ``entries``) is a split layout, ``{}`` when it is
    a class layout; every ambiguous mix is refused, naming the folders."""
    split_of = {name: split for split, names in SPLIT_DIR_NAMES.items() for name in names}
    found: dict[str, list[Path]] = {}
    others: list[Path] = []
    for entry in entries:
        if _is_dir(entry):
            split = split_of.get(entry.name.lower())
            (others if split is None else found.setdefault(split, [])).append(Path(entry.path))
    if not found:
        return {}
    for split, named in found.items():
        if len(named) > 1:
            raise InCAError(f"task {spec}: {_listing(named)} are all the {split} split; keep one of them")
    given = _listing([named[0] for named in found.values()])
    if others:
        raise InCAError(f"task {spec}: split folders ({given}) beside other folders ({_listing(others)}); put "
                        f"every class folder under {root / 'train'} (and val/, test/), or move the split folders out")
    if "train" not in found:
        raise InCAError(f"task {spec}: {given} without a train folder; add {root / 'train'}/<class>/<images> "
                        "(split folders are never classes)")
    return {split: found[split][0] for split in SPLIT_DIR_NAMES if split in found}


def _warn_loose_images(spec: str, directory: Path, loose: list[str]) -> None:
    if loose:
        logger.warning("task %s: %d image file(s) directly in %s belong to no class folder and are left out, "
                        "e.g. %s", spec, len(loose), directory, loose[0])


def _visible_entries(spec: str, directory: str | os.PathLike) -> list[os.DirEntry]:
    """``directory``'s entries but hidden and system ones, sorted by name; an unlistable folder is one line."""
    try:
        with os.scandir(directory) as entries:
            return sorted((e for e in entries if not is_skipped(e.name)), key=lambda e: e.name)
    except OSError as exc:
        raise InCAError(f"task {spec}: cannot list folder {directory} ({_problem(exc)}); fix "
                        "its permissions or remove it") from None


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_image(entry: os.DirEntry) -> bool:
    """A regular file (or a link to one) with an image extension: never a FIFO, device or socket, which
    reading would block on or misread."""
    try:
        return entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
    except OSError:
        return False


def _image_files(spec: str, directory: Path, seen: set[str]) -> list[str]:
    """Image files under ``directory``, sorted, recursing into each real directory once (``seen`` holds the
    real paths already walked, shared across the task's splits)."""
    return list(_walk_images(spec, directory, seen))


def _walk_images(spec: str, directory: Path, seen: set[str]) -> Iterator[str]:
    """:func:`_image_files` one at a time (a check stops at the first)."""
    real = os.path.realpath(directory)
    if real in seen:
        return
    seen.add(real)
    for entry in _visible_entries(spec, directory):
        if _is_dir(entry):
            yield from _walk_images(spec, Path(entry.path), seen)
        elif _is_image(entry):
            yield entry.path


def scan_files(paths: list[str]) -> list[tuple[str, str | None, bool]]:
    """For each image file: the SHA-256 of its bytes, why it cannot be decoded as training decodes it
    (``None`` when it can), and whether its EXIF orientation turns it, checked in threads. Remembered across
    runs by (size, mtime_ns, ctime_ns, inode), so each file is read once until it changes; a file the system
    refuses to read is checked again."""
    index_file = cache_root() / "file-scans" / f"{digest(sorted({os.path.dirname(p) for p in paths}))}.json"
    try:
        known = read_json(index_file)
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    remembered = {path: known[path] for path in paths
                  if isinstance(known.get(path), list) and len(known[path]) == 4 and known[path][0] == _stat_key(path)}
    todo = [path for path in paths if path not in remembered]
    checked = progress(_threaded(_scan_file, todo), total=len(todo), desc="checking images", unit="file",
                       enabled=len(todo) >= 1000)
    entries = {**remembered, **dict(zip(todo, checked))}
    fresh = {path: entries[path] for path in paths if entries[path][0] is not None}
    if fresh != known:
        with contextlib.suppress(OSError, InCAError):  # the index only saves time: never fail a run over it
            atomic_write_json(index_file, fresh)
    return [(entries[path][1], entries[path][2], entries[path][3]) for path in paths]


def _stat_key(path: str) -> str | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return f"{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}:{info.st_ino}"


def _scan_file(path: str) -> list[Any]:
    """``[stat key, SHA-256, problem, turned by EXIF]``; the key is None when the system refuses the file (its
    permissions can be fixed without changing it), so that answer is not remembered."""
    key = _stat_key(path)
    try:
        sha = file_sha256(path) if _is_regular(path) else ""
    except OSError as exc:
        return [None, "", _problem(exc), False]
    problem, turned = _decode(path)
    return [key, sha, problem, turned]


def decode_problem(path: str) -> str | None:
    """Why ``path`` cannot be read the way training reads it; ``None`` when it can."""
    return _decode(path)[0]


def _decode(path: str) -> tuple[str | None, bool]:
    """Why ``path`` cannot be read as training reads it (``open_image``) or None, and whether its EXIF
    orientation turns it: one full decode answers both."""
    try:
        return None, open_image_turned(path)[1]
    except Exception as exc:  # PIL raises many kinds for damaged files
        return _problem(exc), False


def _is_regular(path: str) -> bool:
    """A regular file, or a link to one: hashing a FIFO would block, a device or socket is no image."""
    return stat.S_ISREG(os.stat(path).st_mode)


def _problem(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return first_line(exc, limit=80)


def _threaded(function: Callable[[str], Any], items: Sequence[str]) -> Iterator[Any]:
    """``map(function, items)`` in order, in up to :data:`SCAN_WORKERS` threads (PIL's decoders and hashlib
    release the GIL)."""
    if not items:
        return
    with ThreadPoolExecutor(min(SCAN_WORKERS, len(items))) as pool:
        for start in range(0, len(items), SCAN_CHUNK):
            yield from pool.map(function, items[start:start + SCAN_CHUNK])


def unreadable_images(paths: list[str]) -> list[str]:
    """The files among ``paths`` that cannot be decoded in full."""
    return [path for path, problem in zip(paths, _threaded(decode_problem, paths)) if problem]


def bad_images_message(bad: list[str]) -> str:
    """One line naming every unreadable image (each given as ``path (why)`` or a path)."""
    return f"{len(bad)} unreadable image(s): {', '.join(bad)}"


def _listing(paths: list[Path], limit: int = 5) -> str:
    shown = ", ".join(map(str, paths[:limit]))
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _files_digest(paths: list[str], root: Path, hashes: list[str]) -> str:
    """Relative paths and content: a renamed, added, removed or rewritten image changes the task's identity."""
    sha = hashlib.sha256()
    for path, value in zip(paths, hashes):
        sha.update(os.path.relpath(path, root).encode())
        sha.update(value.encode())
    return sha.hexdigest()[:FINGERPRINT_LENGTH]


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
    """The folder exists and has a valid layout, each train class folder holding an image file: folders are
    listed, no image is read."""
    layout = folder_layout(spec, _directory(spec, path))
    empty = [name for name, folder in layout.class_dirs["train"].items()
             if next(_walk_images(spec, folder, set()), None) is None]
    if empty:
        raise _no_images(spec, empty, layout.folders["train"])


def canonical_folder(path: str) -> str:
    """A folder's one spelling: its absolute path with ``~``, ``..``, a trailing slash and symlinks resolved."""
    return os.fspath(Path(path).expanduser().resolve())


def _load(spec: str, path: str, settings: TaskLoadConfig) -> Task:
    return load_folder_task(spec, path, seed=settings.split_seed, skip_bad_images=settings.skip_bad_images)


register_task_source(
    "folder:", load=_load, check=_check, canonical=canonical_folder, spec_form="folder:PATH",
    summary="images in PATH/<class>/ or PATH/{train,val,test}/<class>/",
    check_on_load=False,  # the load checks the layout and each train class's images from its one listing
)  # fmt: skip
