"""``hf:NAME[:CONFIG]`` tasks from Hugging Face ``datasets``: hub names (from the local cache when offline)
or directories written by ``save_to_disk``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InCAError, first_line
from .base import Split, Task, make_splits
from .registry import TaskLoadConfig, register_task_source

SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid", "dev"), "test": ("test",)}
logger = logging.getLogger(__name__)
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")


@dataclass
class HFSource:
    """Rows of one ``datasets.Dataset``; only the image column is decoded."""

    in_memory = False
    dataset: Any
    image_column: str
    name: str

    def load(self, row: int) -> Image.Image:
        image = self.dataset[row][self.image_column]
        return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))

    def describe(self, row: int) -> str:
        return f"{self.name} row {row}"


def load_hf_task(spec: str, name: str, config: str | None = None, seed: int = 0) -> Task:
    splits_by_name = _open(spec, name, config)
    first = next(iter(splits_by_name.values()))
    image_column = _image_column(spec, first.features)
    label_column, classes = _label_column(spec, first.features, splits_by_name)
    available: dict[str, Split] = {}
    identity: dict[str, Any] = {"name": name, "config": config}
    for split, candidates in SPLIT_NAMES.items():
        hf_split = next((c for c in candidates if c in splits_by_name), None)
        if hf_split is None:
            continue
        dataset = splits_by_name[hf_split].select_columns([image_column, label_column])
        labels = _labels(dataset[label_column], classes)
        labelled = np.flatnonzero(labels >= 0)  # -1: no label (ImageNet-1k's test split, competitions' tests)
        if len(labelled) == 0:
            logger.warning("%s: the %r split has no labels; %s is carved from train instead", spec, hf_split, split)
            continue
        if len(labelled) < len(labels):
            logger.warning("%s: %d of %d rows of the %r split have no label (-1) and are left out", spec,
                           len(labels) - len(labelled), len(labels), hf_split)
        source = HFSource(dataset.select_columns([image_column]), image_column, f"{spec}[{hf_split}]")
        available[split] = Split(source, labelled, labels[labelled])
        identity[split] = getattr(dataset, "_fingerprint", None)
    if "train" not in available:
        raise InCAError(f"task {spec}: the dataset has no train split (it has {sorted(splits_by_name)})")
    return Task(spec, classes, make_splits(available, seed=seed), identity)


def _open(spec: str, name: str, config: str | None) -> dict[str, Any]:
    import datasets

    try:
        if Path(name).expanduser().exists():
            loaded = datasets.load_from_disk(str(Path(name).expanduser()))
        else:
            loaded = datasets.load_dataset(name, config)
    except Exception as exc:
        reason = first_line(exc)
        raise InCAError(
            f"task {spec}: cannot load the Hugging Face dataset ({reason}); offline, the dataset must be "
            "in the local HF cache (HF_HOME) or given as a save_to_disk directory"
        ) from None
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def _image_column(spec: str, features: Any) -> str:
    import datasets

    for column, feature in features.items():
        if isinstance(feature, datasets.Image):
            return column
    raise InCAError(f"task {spec}: no Image column among {list(features)}; cast one with datasets.Image()")


def _label_column(spec: str, features: Any, splits: dict[str, Any]) -> tuple[str, list[str]]:
    """The ClassLabel column (its names are the classes), else a conventional label column."""
    import datasets

    for column, feature in features.items():
        if isinstance(feature, datasets.ClassLabel):
            return column, list(feature.names)
    for column in LABEL_COLUMNS:
        if column in features:
            if not isinstance(features[column], datasets.Value):
                raise InCAError(f"task {spec}: label column {column!r} holds {type(features[column]).__name__} "
                                "values, not one label per image (multi-label datasets are not supported); "
                                "map it to a single ClassLabel column first")
            values = sorted({v for split in splits.values() for v in split.unique(column) if v is not None})
            if all(isinstance(v, int) for v in values):
                return column, [str(i) for i in range(max(values) + 1)]
            return column, [str(v) for v in values]
    raise InCAError(f"task {spec}: no label column (a ClassLabel, or one of {', '.join(LABEL_COLUMNS)})")


def _labels(values: list[Any], classes: list[str]) -> np.ndarray:
    """Class indices; -1 for a row without a label (None, or -1 as ``datasets`` writes a missing ClassLabel)."""
    index = {name: i for i, name in enumerate(classes)}
    return np.asarray(
        [-1 if v is None else int(v) if isinstance(v, (int, np.integer)) else index[str(v)] for v in values],
        dtype=np.int64,
    )


def _load(spec: str, argument: str, settings: TaskLoadConfig) -> Task:
    name, _, config = argument.partition(":")
    return load_hf_task(spec, name, config or None, seed=settings.split_seed)


register_task_source(
    "hf:", load=_load, spec_form="hf:NAME[:CONFIG]",
    summary="a Hugging Face dataset: a hub name (from the local cache offline) or a save_to_disk directory",
)  # fmt: skip
