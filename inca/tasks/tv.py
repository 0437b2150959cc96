"""``tv:NAME`` tasks: torchvision datasets under ``--data-root`` (never downloaded unless asked).

Train's ``classes`` (else ``"0".."max"`` of its integer labels) are the task's classes; a split whose own
class list differs is matched to them by name, and a class train lacks is refused. Rows labelled -1 are
left out with a warning, as in ``hf:`` tasks."""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import inspect
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..errors import InCAError, first_line
from .base import Split, Task, indices_by_name, make_splits, tree_digest
from .registry import TaskLoadConfig, register_task_source

# Candidate values of a ``split=`` argument for each of our splits, in order of preference.
SPLIT_ARGUMENTS = {"train": ("train", "trainval", "balanced"), "val": ("val", "valid"), "test": ("test",)}
LABEL_ATTRIBUTES = ("targets", "_labels", "labels", "y")
_logger = logging.getLogger(__name__)
# torchvision classes that are building blocks, not datasets a spec can mean: what to use instead.
NOT_DATASETS = {
    "ImageFolder": "a loader for a folder of images; use folder:PATH",
    "DatasetFolder": "a loader for a folder of files; use folder:PATH for images",
    "FakeData": "random images with random labels, for testing code",
    "VisionDataset": "the base class of torchvision's datasets",
}


@dataclass
class TorchvisionSource:
    in_memory = False
    dataset: Any
    name: str

    def load(self, row: int) -> Image.Image:
        """Row ``row``'s image; one a dataset read from a file (Flowers102, DTD, ...: PIL keeps its EXIF) upright
        by its EXIF orientation, as folder images and prediction read them (:mod:`inca.images`)."""
        image = self.dataset[row][0]
        return ImageOps.exif_transpose(image) if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))

    def describe(self, row: int) -> str:
        return f"{self.name} row {row}"


def torchvision_class(spec: str, name: str, data_root: str | None) -> type:
    """The torchvision dataset class ``tv:NAME`` names (case-insensitive); it needs a ``--data-root``."""
    import torchvision.datasets as tvd

    found = _dataset_name(spec, name, _classes_of(tvd))
    _require_root(spec, data_root)
    return getattr(tvd, found)


def _dataset_name(spec: str, name: str, names: dict[str, str]) -> str:
    """torchvision's spelling of the dataset ``name`` among ``names`` (by lower-case name); a building block or an
    unknown name is one line."""
    found = names.get(name.lower())
    if found in NOT_DATASETS:
        raise InCAError(f"task {spec}: torchvision's {found} is not a dataset ({NOT_DATASETS[found]}); name one "
                        "such as tv:CIFAR10, tv:DTD, tv:Flowers102")
    if found is None:
        raise InCAError(f"task {spec}: torchvision has no dataset {name!r} (e.g. tv:CIFAR10, tv:DTD, tv:Flowers102)")
    return found


def _require_root(spec: str, data_root: str | None) -> None:
    if not data_root:
        raise InCAError(f"task {spec} needs --data-root DIR (where torchvision keeps the dataset files)")


def load_torchvision_task(
    spec: str, name: str, data_root: str | None, download: bool = False, seed: int = 0
) -> Task:
    cls = torchvision_class(spec, name, data_root)
    params = inspect.signature(cls.__init__).parameters
    datasets: dict[str, Any] = {}
    if "train" in params:
        datasets = {
            split: _construct(spec, cls, data_root, download, train=split == "train") for split in ("train", "test")
        }
    elif "split" in params:
        for split, candidates in SPLIT_ARGUMENTS.items():
            dataset = _first_split(spec, cls, data_root, download, candidates)
            if dataset is not None:
                datasets[split] = dataset
        if "train" not in datasets:
            raise InCAError(f"task {spec}: found no train split under {data_root}; check the dataset files")
    else:
        datasets = {"train": _construct(spec, cls, data_root, download)}
    targets = {split: _targets(dataset) for split, dataset in datasets.items()}
    classes = _class_names(datasets["train"], targets["train"])
    available: dict[str, Split] = {}
    for split, dataset in datasets.items():
        labels = _by_name(spec, split, _class_names(dataset, targets[split]), targets[split], classes)
        labelled = np.flatnonzero(labels >= 0)
        if len(labelled) < len(labels):
            _logger.warning("%s: %d of %d rows of the %s split have no label (-1) and are left out", spec,
                            len(labels) - len(labelled), len(labels), split)
        available[split] = Split(TorchvisionSource(dataset, f"{spec}[{split}]"), labelled, labels[labelled])
    identity = {"dataset": cls.__name__, "root": os.path.realpath(data_root),
                "sizes": {split: len(d) for split, d in datasets.items()}, "files": tree_digest(data_root)}
    if not all(_holds_arrays(d) for d in datasets.values()):  # read from files, turned by their EXIF orientation
        identity["upright"] = True  # so that no store built before they were is reused
    return Task(spec, classes, make_splits(available, seed=seed), identity)


def _holds_arrays(dataset: Any) -> bool:
    """Whether a torchvision dataset keeps its images as one array (CIFAR, MNIST, SVHN, STL10: ``data``), which no
    EXIF orientation reaches, rather than reading them from files."""
    return hasattr(getattr(dataset, "data", None), "shape")


def _construct(spec: str, cls: type, root: str, download: bool, **kwargs: Any) -> Any:
    try:
        return cls(root=root, download=download, **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        raise _files_missing(spec, root, exc) from None


def _files_missing(spec: str, root: str, exc: BaseException) -> InCAError:
    return InCAError(
        f"task {spec}: dataset files not found under {root} ({first_line(exc)}); put them there or pass --download"
    )


def _first_split(spec: str, cls: type, root: str, download: bool, candidates: tuple[str, ...]) -> Any | None:
    for candidate in candidates:
        try:
            return _construct(spec, cls, root, download, split=candidate)
        except InCAError:
            raise
        except ValueError:  # the dataset has no split of that name
            continue
    return None


def _targets(dataset: Any) -> np.ndarray:
    """Labels without decoding images where the dataset exposes them; else read each sample."""
    for attribute in LABEL_ATTRIBUTES:
        values = getattr(dataset, attribute, None)
        if values is not None and len(values) == len(dataset):
            return np.asarray(values, dtype=np.int64)
    samples = getattr(dataset, "_samples", None)
    if samples is not None:
        return np.asarray([label for _, label in samples], dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def _class_names(dataset: Any, targets: np.ndarray) -> list[str]:
    """The dataset's class names, else ``"0".."max"`` for its integer labels."""
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return [str(c) for c in classes]
    return [str(i) for i in range(int(targets.max(initial=-1)) + 1)]


def _by_name(spec: str, split: str, names: list[str], targets: np.ndarray, classes: list[str]) -> np.ndarray:
    """A split's labels as indices into train's class list, matched by name when its own list differs; -1
    (no label) stays -1."""
    if names == classes:
        return targets
    beyond = targets[targets >= len(names)]
    if len(beyond):
        raise InCAError(f"task {spec}: {split} label {int(beyond[0])} is out of range for its {len(names)} classes")
    return indices_by_name(spec, split, [names[t] if t >= 0 else None for t in targets], classes)


def _classes_of(module: Any) -> dict[str, str]:
    return {name.lower(): name for name in dir(module) if isinstance(getattr(module, name), type)}


def torchvision_dataset_names() -> dict[str, str] | None:
    """torchvision's dataset class names by lower-case name: those of ``torchvision.datasets`` once it is imported,
    before that the ``__all__`` of its source, read without importing it (which would import torch); None when
    torchvision is missing or that list cannot be read (then the name is checked when the task loads)."""
    module = sys.modules.get("torchvision.datasets")
    return _classes_of(module) if module is not None else _declared_dataset_names()


@functools.cache
def _declared_dataset_names() -> dict[str, str] | None:
    found = importlib.util.find_spec("torchvision")
    if found is None or not found.submodule_search_locations:
        return None
    source = Path(found.submodule_search_locations[0]) / "datasets" / "__init__.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            with contextlib.suppress(ValueError):
                return {name.lower(): name for name in ast.literal_eval(node.value)}
    return None


def _check(spec: str, name: str, settings: TaskLoadConfig) -> None:
    """The dataset name and ``--data-root``, without importing torchvision."""
    names = torchvision_dataset_names()
    if names is not None:
        _dataset_name(spec, name, names)
    _require_root(spec, settings.data_root)
    if not settings.download and not Path(settings.data_root).expanduser().is_dir():
        raise InCAError(f"task {spec}: --data-root {settings.data_root} is not a directory; give the directory that "
                        "holds the dataset files, or pass --download to fetch them there")


def _canonical(name: str) -> str:
    """The dataset by torchvision's own spelling of its class (``tv:cifar10`` is ``tv:CIFAR10``)."""
    names = torchvision_dataset_names()
    return (names or {}).get(name.lower(), name)


def _load(spec: str, name: str, settings: TaskLoadConfig) -> Task:
    return load_torchvision_task(spec, name, settings.data_root, download=settings.download, seed=settings.split_seed)


register_task_source(
    "tv:", load=_load, check=_check, canonical=_canonical, spec_form="tv:NAME",
    summary="a torchvision dataset class under --data-root, e.g. tv:CIFAR10",
)  # fmt: skip
