"""Classify image files for every task of a :class:`~inca.inference.MultiTaskInCA` (one backbone pass per
batch serves them all) and write one row per image: CSV or JSON Lines."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from .devices import autocast
from .errors import InCAError, require_positive
from .inference import MultiTaskInCA
from .tasks import Split, image_loader, sequential_batches
from .tasks.folder import FileSource, unreadable_images

__all__ = ["FORMATS", "ImagePrediction", "expand_images", "format_predictions", "predict_images",
           "split_readable"]

FORMATS = ("csv", "jsonl")


@dataclass
class ImagePrediction:
    """One image's top-k classes and probabilities for every task, best first."""

    path: str
    labels: dict[str, list[str]]
    probabilities: dict[str, list[float]]


def predict_images(
    model: MultiTaskInCA, paths: Sequence[str], top_k: int = 1, batch_size: int = 64, num_workers: int | None = None
) -> Iterator[ImagePrediction]:
    """Predictions for image files (or directories of them), in file order, under inference mode."""
    if model.transform is None:
        raise InCAError("predict_images needs a MultiTaskInCA built from an inca Backbone (it knows the preprocessing)")
    require_positive(top_k=top_k, batch_size=batch_size)
    files = expand_images(paths)
    split = Split(FileSource(files), np.arange(len(files)), np.zeros(len(files), dtype=np.int64))
    device = next(model.parameters()).device
    model.eval()
    batches = sequential_batches(0, len(files), batch_size)
    for rows, (images, _) in zip(batches, image_loader(split, model.transform, batches, num_workers)):
        with torch.inference_mode(), autocast(device):
            outputs = model(images.to(device))
        ranked = {}
        for task, logits in outputs.items():
            k = min(top_k, logits.shape[-1])
            values, indices = logits.float().softmax(-1).topk(k, dim=-1)
            classes = model.classes(task)
            ranked[task] = ([[classes[i] for i in idx] for idx in indices.tolist()], values.tolist())
        for j, row in enumerate(rows):
            yield ImagePrediction(
                files[row], {t: labels[j] for t, (labels, _) in ranked.items()},
                {t: probs[j] for t, (_, probs) in ranked.items()},
            )  # fmt: skip


def format_predictions(predictions: Iterable[ImagePrediction], tasks: Sequence[str], fmt: str) -> str:
    """CSV (``path``, then per task ``<task>`` and ``<task>:probability``, top-k joined by ``;``) or JSON
    Lines (``{"path": ..., "tasks": {task: {"labels": [...], "probabilities": [...]}}}``)."""
    if fmt not in FORMATS:
        raise InCAError(f"prediction format {fmt!r} is not one of {', '.join(FORMATS)}")
    buffer = io.StringIO()
    if fmt == "jsonl":
        for p in predictions:
            tasks_out = {t: {"labels": p.labels[t], "probabilities": p.probabilities[t]} for t in tasks}
            buffer.write(json.dumps({"path": p.path, "tasks": tasks_out}) + "\n")
        return buffer.getvalue()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", *[column for t in tasks for column in (t, f"{t}:probability")]])
    for p in predictions:
        cells = [p.path]
        for t in tasks:
            cells += [";".join(p.labels[t]), ";".join(f"{v:.6f}" for v in p.probabilities[t])]
        writer.writerow(cells)
    return buffer.getvalue()


def split_readable(files: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(readable, unreadable)`` image files, each in the given order: one bad file never stops the rest."""
    bad = set(unreadable_images(list(files)))
    return [f for f in files if f not in bad], [f for f in files if f in bad]


def expand_images(paths: Sequence[str]) -> list[str]:
    """Image files given directly or found (recursively, sorted) in given directories."""
    files: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS))
        elif path.is_file():
            files.append(str(path))
        else:
            raise InCAError(f"image {path} does not exist")
    if not files:
        raise InCAError(f"no images found in {', '.join(map(str, paths))} (extensions: {', '.join(IMG_EXTENSIONS)})")
    return files
