"""``hf:NAME[:CONFIG]`` tasks from Hugging Face ``datasets``: hub names (from the local cache when offline)
or directories written by ``save_to_disk``.

One class list per task, taken from the train split and matched BY NAME in every other split:

- The classes are train's ClassLabel names (in their order), else the sorted distinct strings of train's
  label column, else ``"0"..."N"`` for plain integer ids (N the largest in train).
- A val/test row's label is looked up by its name (a ClassLabel's name for its id, the string, or the integer
  written as a string), so a split whose ClassLabel lists the same names in another order is read correctly.
  A class that train does not have is refused, naming the class and the split; so is a split labelled with
  names where train's labels are plain integers (or the reverse): which integer is which name is unknowable.
- Each split's image and label columns are found the same way (the first Image column; a ClassLabel, else
  one of :data:`LABEL_COLUMNS`), preferring train's column names, so a test split whose image column is
  named otherwise is read too.
- A row without a label (None, NaN, or a negative id such as the -1 ``datasets`` writes) is left out with a
  warning; a split without any label (or label column) is carved from train instead, with a warning.
- A float label must be a whole number (``1.0`` is class ``"1"``); ``0.5`` is refused.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InCAError, first_line
from .base import Split, Task, indices_by_name, make_splits
from .folder import canonical_folder
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


@dataclass
class SplitLabels:
    """One split's labels as stored: class names (``named``) or plain integer ids; ``None`` where a row has
    no label. ``declared`` holds a ClassLabel's names, which fix the class order when read from train."""

    values: list[str | int | None]
    named: bool
    declared: list[str] | None = None

    @property
    def kind(self) -> str:
        return "class names" if self.named else "plain integers"


def load_hf_task(spec: str, name: str, config: str | None = None, seed: int = 0) -> Task:
    splits_by_name = _open(spec, name, config)
    if "train" not in splits_by_name:
        raise InCAError(f"task {spec}: the dataset has no train split (it has {sorted(splits_by_name)})")
    train_features = splits_by_name["train"].features
    image_column = _image_column(spec, "train", train_features)
    label_column = _label_column(spec, "train", train_features)
    found: dict[str, tuple[str, Any, SplitLabels]] = {}
    for split, candidates in SPLIT_NAMES.items():
        hf_split = next((c for c in candidates if c in splits_by_name), None)
        if hf_split is None:
            continue
        dataset = splits_by_name[hf_split]
        column = _label_column(spec, hf_split, dataset.features, preferred=label_column)
        labels = _read_labels(spec, hf_split, dataset, column) if column else None
        if labels is None or all(v is None for v in labels.values):
            if split == "train":
                raise InCAError(f"task {spec}: the train split has no labels; label it, or use another dataset")
            logger.warning("%s: the %r split has no labels; %s is carved from train instead", spec, hf_split, split)
            continue
        found[split] = (hf_split, dataset, labels)
    train_labels = found["train"][2]
    classes = _classes(train_labels)
    available: dict[str, Split] = {}
    identity: dict[str, Any] = {"name": name, "config": config}
    for split, (hf_split, dataset, labels) in found.items():
        indices = _class_indices(spec, hf_split, labels, train_labels, classes)
        labelled = np.flatnonzero(indices >= 0)
        if len(labelled) < len(indices):
            logger.warning("%s: %d of %d rows of the %r split have no label (None, NaN or -1) and are left out",
                            spec, len(indices) - len(labelled), len(indices), hf_split)
        images = _image_column(spec, hf_split, dataset.features, preferred=image_column)
        source = HFSource(dataset.select_columns([images]), images, f"{spec}[{hf_split}]")
        available[split] = Split(source, labelled, indices[labelled])
        identity[split] = getattr(dataset, "_fingerprint", None)
    return Task(spec, classes, make_splits(available, seed=seed), identity)


# The files ``datasets``' save_to_disk writes: a DatasetDict's index, or a single Dataset's state.
SAVED_MARKERS = ("dataset_dict.json", "state.json")


def _on_disk(name: str) -> bool:
    """Whether ``name`` means a directory (it exists, or is spelled as a path) rather than a hub dataset."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or Path(name).expanduser().exists()


def _open(spec: str, name: str, config: str | None) -> dict[str, Any]:
    import datasets

    try:
        if _on_disk(name):
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


def _image_column(spec: str, hf_split: str, features: Any, preferred: str | None = None) -> str:
    """``preferred`` (train's image column) when this split has it as an Image column, else the first one."""
    import datasets

    columns = [column for column, feature in features.items() if isinstance(feature, datasets.Image)]
    if not columns:
        raise InCAError(f"task {spec}: the {hf_split!r} split has no Image column among {list(features)}; "
                        "cast one with datasets.Image()")
    return preferred if preferred in columns else columns[0]


def _label_column(spec: str, hf_split: str, features: Any, preferred: str | None = None) -> str | None:
    """``preferred`` (train's label column) when present, else the first ClassLabel column, else a
    conventional label column; ``None`` when there is none (train must have one)."""
    import datasets

    if preferred in features:
        return preferred
    column = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    column = column or next((c for c in LABEL_COLUMNS if c in features), None)
    if column is None and preferred is None:
        raise InCAError(f"task {spec}: no label column (a ClassLabel, or one of {', '.join(LABEL_COLUMNS)})")
    return column


def _read_labels(spec: str, hf_split: str, dataset: Any, column: str) -> SplitLabels:
    """The split's labels, without decoding images."""
    import datasets

    feature = dataset.features[column]
    raw = dataset[column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        beyond = next((v for v in raw if v is not None and v >= len(names)), None)
        if beyond is not None:
            raise InCAError(f"task {spec}: the {hf_split!r} split has label {beyond}, beyond the {len(names)} "
                            f"names of its ClassLabel column {column!r}; fix the labels or the class list")
        return SplitLabels([None if v is None or v < 0 else names[v] for v in raw], True, names)
    if not isinstance(feature, datasets.Value):
        raise InCAError(f"task {spec}: label column {column!r} holds {type(feature).__name__} values, not one "
                        "label per image (multi-label datasets are not supported); map it to a single ClassLabel "
                        "column first")
    if feature.dtype in ("string", "large_string"):
        return SplitLabels(list(raw), True)
    if feature.dtype == "bool" or "int" in feature.dtype:
        return SplitLabels([None if v is None or v < 0 else int(v) for v in raw], False)
    if "float" in feature.dtype:
        return SplitLabels([_float_label(spec, hf_split, column, v) for v in raw], False)
    raise InCAError(f"task {spec}: label column {column!r} of the {hf_split!r} split holds {feature.dtype} values; "
                    "expected class names or integer class ids")


def _float_label(spec: str, hf_split: str, column: str, value: float | None) -> int | None:
    """A whole-number float as its integer id; None, NaN or a negative value as no label."""
    if value is None or math.isnan(value) or value < 0:
        return None
    if not value.is_integer():
        raise InCAError(f"task {spec}: label column {column!r} of the {hf_split!r} split holds {value}, not a "
                        "class id; labels must be class names or whole numbers")
    return int(value)


def _classes(train: SplitLabels) -> list[str]:
    """Train's class list: its ClassLabel names, its distinct names sorted, or ``0..max`` for integer ids."""
    if train.declared is not None:
        return train.declared
    present = {v for v in train.values if v is not None}
    if train.named:
        return sorted(present)
    return [str(i) for i in range(max(present) + 1)]


def _class_indices(
    spec: str, hf_split: str, labels: SplitLabels, train: SplitLabels, classes: list[str]
) -> np.ndarray:
    """Each row's index in ``classes``, matched by name; -1 for a row without a label."""
    if labels.named != train.named:
        raise InCAError(f"task {spec}: the {hf_split!r} split is labelled with {labels.kind} but train with "
                        f"{train.kind}, so which is which class is unknown; give both the same ClassLabel names")
    return indices_by_name(spec, hf_split, [None if v is None else str(v) for v in labels.values], classes)


def _load(spec: str, argument: str, settings: TaskLoadConfig) -> Task:
    name, _, config = argument.partition(":")
    return load_hf_task(spec, name, config or None, seed=settings.split_seed)


def _check(spec: str, argument: str, settings: TaskLoadConfig) -> None:
    """A dataset on disk is a directory save_to_disk wrote (a hub name is found only when it loads)."""
    name = argument.partition(":")[0]
    if not _on_disk(name):
        return
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise InCAError(f"task {spec}: {name} is not a directory; give hf:DIR with a dataset written by "
                        "datasets' save_to_disk, or a hub name")
    if not any((folder / marker).is_file() for marker in SAVED_MARKERS):
        raise InCAError(f"task {spec}: {name} holds no dataset written by datasets' save_to_disk (no "
                        f"{' or '.join(SAVED_MARKERS)} in it); save it with Dataset.save_to_disk, or use folder:PATH "
                        "for image folders")


def _canonical(argument: str) -> str:
    """A dataset on disk by its resolved path (a hub name as given), with its config."""
    name, colon, config = argument.partition(":")
    return f"{canonical_folder(name)}{colon}{config}" if _on_disk(name) else argument


register_task_source(
    "hf:", load=_load, check=_check, canonical=_canonical, spec_form="hf:NAME[:CONFIG]",
    summary="a Hugging Face dataset: a hub name (from the local cache offline) or a save_to_disk directory",
)  # fmt: skip
