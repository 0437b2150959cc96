"""What a task is: class names and train / val / test splits of (image, label), with stable identity."""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from ..errors import InCAError, first_line
from ..io import FINGERPRINT_LENGTH, canonical_json

SPLITS = ("train", "val", "test")
T = TypeVar("T")
# The shares carved out as test and val when a dataset lacks those splits: inca's own choice, a common hold-out.
# Test is a fifth of the rows, then val a tenth of what is left (72/8/20 of the whole), each stratified by class.
VAL_FRACTION = 0.1
TEST_FRACTION = 0.2


@dataclass
class ArraySource:
    """Images held in memory as uint8 ``[N, H, W]`` or ``[N, H, W, C]``: built-in and procedural tasks."""

    in_memory = True
    images: np.ndarray
    name: str

    def load(self, row: int) -> Image.Image:
        return Image.fromarray(self.images[row])

    def describe(self, row: int) -> str:
        return f"{self.name} row {row}"


@dataclass
class Split:
    """The rows of one split: which rows of ``source`` and their integer labels.

    ``source`` has ``load(row)`` (a PIL image), ``describe(row)`` (where the row comes from, for errors) and
    ``in_memory`` (its images are held in memory: decoded in the main process, where workers would only add
    start-up and copying)."""

    source: Any
    rows: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, index: int) -> Image.Image:
        """The RGB image of the split's ``index``-th row (grayscale, palette and RGBA are converted)."""
        row = int(self.rows[index])
        try:
            image = self.source.load(row)
            return image if image.mode == "RGB" else image.convert("RGB")
        except Exception as exc:
            raise InCAError(
                f"cannot read image {self.source.describe(row)} ({first_line(exc)}): remove or replace it"
            ) from None

    def subset(self, positions: np.ndarray) -> Split:
        return Split(self.source, self.rows[positions], self.labels[positions])


@dataclass
class Task:
    """A classification task: its spec string, class names and splits.

    ``spec`` is the task's one canonical spelling (a folder by its resolved absolute path), so the same data is
    one task however its spec was typed; ``typed_spec`` keeps the spelling the user gave, for the reports."""

    spec: str
    classes: list[str]
    splits: dict[str, Split]
    identity: dict[str, Any] = field(default_factory=dict)
    typed_spec: str = ""

    def __post_init__(self) -> None:
        self.typed_spec = self.typed_spec or self.spec
        missing = [name for name in SPLITS if name not in self.splits]
        if missing:
            raise InCAError(f"task {self.spec}: no {'/'.join(missing)} split could be formed")
        if len(self.classes) < 2:
            raise InCAError(f"task {self.spec} has {len(self.classes)} class(es); classification needs at least two")
        for name in SPLITS:
            split = self.splits[name]
            if len(split) == 0:
                raise InCAError(f"task {self.spec}: the {name} split is empty; add images or use another dataset")
            bad = (split.labels < 0) | (split.labels >= len(self.classes))
            if bad.any():
                raise InCAError(
                    f"task {self.spec}: {name} label {int(split.labels[bad][0])} is out of range "
                    f"for {len(self.classes)} classes; fix the labels or the class list"
                )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def name(self) -> str:
        """A short readable name (:func:`task_name`). Not unique alone (two folders may share a name): output names
        add the fingerprint, reports and prediction columns :func:`task_names`."""
        return task_name(self.spec)

    @property
    def slug(self) -> str:
        """A filesystem-safe form of :attr:`name` for directories."""
        return slugify(self.name)

    @property
    def fingerprint(self) -> str:
        """Identifies the data: spec, source identity, class names, and exactly which rows form each split."""
        digest = hashlib.sha256()
        digest.update(canonical_json({"spec": self.spec, "identity": self.identity, "classes": self.classes}))
        for name in SPLITS:
            digest.update(name.encode())
            digest.update(self.splits[name].rows.tobytes())
            digest.update(self.splits[name].labels.tobytes())
        return digest.hexdigest()[:FINGERPRINT_LENGTH]

    def sizes(self) -> dict[str, int]:
        return {name: len(self.splits[name]) for name in SPLITS}

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "classes": self.classes, "sizes": self.sizes(), "fingerprint": self.fingerprint}


def task_name(spec: str) -> str:
    """A task's short readable name, from its spec: a path's last component (``folder:/data/faces`` -> ``faces``),
    else the spec itself (``digits``, ``tv:CIFAR10``)."""
    _, colon, argument = spec.partition(":")
    if colon and os.path.isabs(argument):
        return os.path.basename(argument.rstrip(os.sep)) or spec
    return spec


def task_names(specs: Iterable[str]) -> dict[str, str]:
    """The name each of ``specs`` (canonical) shows in reports, summaries and prediction columns: its
    :func:`task_name`, or where two of them share that name (two folders called ``faces``) their whole specs, so no
    two tasks look alike. Reports' JSON keeps the specs."""
    short = {spec: task_name(spec) for spec in specs}
    counts = Counter(short.values())
    return {spec: name if counts[name] == 1 else spec for spec, name in short.items()}


def by_task_name(by_spec: Mapping[str, T]) -> dict[str, T]:
    """``by_spec`` (a report's tasks, keyed by canonical spec) keyed by the names they show (:func:`task_names`)."""
    names = task_names(by_spec)
    return {names[spec]: value for spec, value in by_spec.items()}


def slugify(spec: str) -> str:
    """A filesystem-safe form of a task spec (``hf:org/name`` -> ``hf_org_name``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_")[:60] or "task"


def indices_by_name(spec: str, split: str, names: Sequence[str | None], classes: list[str]) -> np.ndarray:
    """Each row's index in the task's ``classes`` (train's), found by class name; -1 where ``names`` holds None
    (a row without a label). A class that train does not have is one line naming it and the split."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({name for name in names if name is not None and name not in index})
    if unknown:
        shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise InCAError(f"task {spec}: the {split!r} split has class {unknown[0]!r}{more} that train does not have "
                        f"(train's classes: {shown}); classes are matched by name across splits")
    return np.asarray([-1 if name is None else index[name] for name in names], dtype=np.int64)


def carve(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministically split positions into (kept, carved), stratified by class when every class allows it."""
    from sklearn.model_selection import train_test_split  # here: scikit-learn takes seconds to import

    positions = np.arange(len(labels))
    counts = np.bincount(labels) if len(labels) else np.array([])
    stratify = labels if len(counts) and counts[counts > 0].min() >= 2 else None
    n_carved = max(1, round(fraction * len(labels)))
    if stratify is not None and n_carved < len(np.unique(labels)):
        stratify = None
    if len(labels) < 2:
        return positions, positions[:0]
    kept, carved = train_test_split(positions, test_size=n_carved, random_state=seed, stratify=stratify)
    return np.sort(kept), np.sort(carved)


def make_splits(
    available: dict[str, Split], seed: int, val_fraction: float = VAL_FRACTION, test_fraction: float = TEST_FRACTION
) -> dict[str, Split]:
    """Complete ``available`` to train/val/test: test carved from train when absent, then val from train."""
    splits = dict(available)
    if "train" not in splits:
        raise InCAError("the dataset has no train split")
    if "test" not in splits:
        kept, carved = carve(splits["train"].labels, test_fraction, seed)
        splits["test"] = splits["train"].subset(carved)
        splits["train"] = splits["train"].subset(kept)
    if "val" not in splits:
        kept, carved = carve(splits["train"].labels, val_fraction, seed + 1)
        splits["val"] = splits["train"].subset(carved)
        splits["train"] = splits["train"].subset(kept)
    return splits


def tree_digest(root: str | os.PathLike) -> str:
    """Relative path, size, mtime, ctime and inode of every file under ``root`` (symlinks not followed): a
    dataset whose files were rewritten (even with the same size and a restored mtime: ctime cannot be set
    back), replaced, added or removed gets another identity, without reading the files."""
    sha = hashlib.sha256()
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(directory, name)
            stat = os.stat(path, follow_symlinks=False)
            sha.update(f"{os.path.relpath(path, root)}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:"
                       f"{stat.st_ino}\n".encode())
    return sha.hexdigest()[:FINGERPRINT_LENGTH]
