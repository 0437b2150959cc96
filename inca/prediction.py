"""Classify image files for every task of a :class:`~inca.inference.MultiTaskInCA` (one backbone pass per
batch serves them all) and write one row per image: CSV or JSON Lines.

Images are read by :func:`inca.images.open_image` (fully decoded, upright by their EXIF orientation, as in
training) in DataLoader workers; one that cannot be read is skipped and reported, never a reason to lose the
rows of the others. Torch is imported only to predict: what the saved models, runs, images and output paths
are is read and checked (:func:`check_predict_input`) before it is.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InCAError, first_line, require_positive
from .images import IMAGE_EXTENSIONS, open_image
from .io import existing_parent, read_json_file
from .options import BATCH_SIZE
from .outputs import ADAPTER_CONFIG, ADAPTER_DIR, COMPARE_REPORT, ENSEMBLE_DIR, TRAIN_REPORT

if TYPE_CHECKING:
    import torch

    from .inference import MultiTaskInCA

__all__ = ["FORMATS", "USES", "ImagePrediction", "adapter_paths", "check_output_file", "expand_images",
           "check_predict_input", "format_predictions", "output_format", "predict_images", "run_adapters"]

FORMATS = ("csv", "jsonl")
USES = ("adapter", "ensemble")  # what --run serves of each inca-train task

logger = logging.getLogger(__name__)


@dataclass
class ImagePrediction:
    """One image's top-k classes and probabilities for every task, best first."""

    path: str
    labels: dict[str, list[str]]
    probabilities: dict[str, list[float]]


def predict_images(
    model: MultiTaskInCA,
    paths: Sequence[str],
    top_k: int = 1,
    batch_size: int = BATCH_SIZE,
    num_workers: int | None = None,
    on_bad_image: Callable[[str, str], None] | None = None,
) -> Iterator[ImagePrediction]:
    """Predictions for image files (or directories of them), in file order, under inference mode.

    An image that cannot be read (damaged, truncated, not a regular file, no permission) is skipped and
    ``on_bad_image(path, reason)`` is called; without ``on_bad_image`` it is a one-line :class:`InCAError`.
    """
    import torch
    from torch.utils.data import DataLoader

    from .devices import autocast
    from .tasks import sequential_batches

    if model.transform is None:
        raise InCAError("predict_images needs a MultiTaskInCA built from an inca Backbone (it knows the preprocessing)")
    require_positive(top_k=top_k, batch_size=batch_size)
    files = expand_images(paths)
    batches = sequential_batches(0, len(files), batch_size)
    if num_workers is None:  # a worker only pays off when it decodes one batch while the model runs another
        num_workers = 0 if len(batches) == 1 else min(8, os.cpu_count() or 1, len(batches))
    loader = DataLoader(_ImageFiles(files, model.transform), batch_sampler=[b.tolist() for b in batches],
                        num_workers=num_workers, collate_fn=_collate)
    device = next(model.parameters()).device
    model.eval()
    for rows, images, failures in loader:
        for row, reason in failures:
            if on_bad_image is None:
                raise InCAError(f"cannot read image {files[row]} ({reason}): remove or replace it")
            on_bad_image(files[row], reason)
        if not rows:
            continue
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


class _ImageFiles:
    """``(row, preprocessed image, None)``, or ``(row, None, why it cannot be read)``: decoded in workers."""

    def __init__(self, files: Sequence[str], transform: Callable) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = open_image(self.files[row])
        except PermissionError:
            return row, None, "permission denied"
        except Exception as exc:  # PIL raises many kinds for damaged files
            return row, None, f"cannot be read as an image ({first_line(exc)})"
        return row, self.transform(image), None


def _collate(items: list) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """The readable rows of a batch, their images stacked, and the others with the reason."""
    import torch

    rows = [row for row, image, _ in items if image is not None]
    images = torch.stack([image for _, image, _ in items if image is not None]) if rows else None
    return rows, images, [(row, reason) for row, image, reason in items if image is None]


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


def adapter_paths(items: Sequence[str], runs: Sequence[str] = (), use: str = "adapter") -> dict[str, str] | list[str]:
    """``--adapter`` values and ``--run`` directories as :meth:`MultiTaskInCA.from_saved` takes them: ``NAME=DIR``
    items as a mapping of names to directories, plain directories as a list (named by their recorded tasks). An
    item that exists as a path is a directory even if it holds ``=``; naming some adapters but not all is an
    error. An output directory of inca-train or inca-compare among the plain items is read as ``--run`` (logged)."""
    pairs = [_name_and_directory(item) for item in items]
    named = {name: directory for name, directory in pairs if name}
    if named and (len(named) != len(pairs) or runs):
        raise InCAError("--adapter: name every adapter (NAME=DIR, names distinct) or none (--run's adapters are "
                        "named by their tasks)")
    if named:
        return named
    directories: list[str] = []
    for directory in [directory for _, directory in pairs]:
        if _run_report(directory) is None:
            directories.append(directory)
        else:
            logger.info("%s is an output directory, not an adapter: serving it as --run %s", directory, directory)
            directories += run_adapters(directory, use)
    for run in runs:
        directories += run_adapters(run, use)
    return directories


def run_adapters(run_dir: str | os.PathLike, use: str = "adapter") -> list[str]:
    """The saved adapters an output directory serves. Of an inca-train run, one per task: its best adapter on val,
    or with ``use="ensemble"`` its ensemble where ``results.json`` offers one (saved, and better on val than the
    best adapter; else its best adapter, logged). Of an inca-compare run, every (task, method) pair's saved model
    (InCA's adapter, LoRA's, full fine-tuning's, ...). Found inside ``run_dir`` wherever the run was made from."""
    if use not in USES:
        raise InCAError(f"--use {use!r} is not one of {', '.join(USES)}")
    report = _required_run_report(run_dir)
    content = read_json_file(report, "run the command again into another directory")
    run = Path(run_dir)
    if report.name == COMPARE_REPORT:
        results = content.get("results", [])
        kept = [r for r in results if (run / r.get("adapter_dir", "-") / ADAPTER_CONFIG).is_file()]
        if len(kept) < len(results):
            logger.warning("%s: %d of its %d trained models were not saved (an older inca-compare trained them): "
                           "they are not served", run_dir, len(results) - len(kept), len(results))
        directories = [str(run / r["adapter_dir"]) for r in kept]
    else:
        directories = [_train_run_adapter(run, spec, result, use) for spec, result in content.get("tasks", {}).items()]
    if not directories:
        raise InCAError(f"{run_dir} holds no trained model to serve yet ({report.name} lists none)")
    return directories


def _train_run_adapter(run: Path, spec: str, result: dict[str, Any], use: str) -> str:
    """The adapter an inca-train task serves: its best adapter, or with ``use="ensemble"`` the ensemble
    ``results.json`` offers."""
    task_dir = run / (result.get("directory") or Path(result["best"]["adapter_dir"]).parent.name)
    saved = bool((result.get("ensemble") or {}).get("adapter_dir"))
    offered = result.get("serve", ENSEMBLE_DIR if saved else ADAPTER_DIR) == ENSEMBLE_DIR
    if use == "ensemble" and not offered:
        why = "it is not better than the best adapter on val" if saved else "none was saved: train with --ensemble K"
        logger.info("%s: no ensemble offered (%s); serving its best adapter", spec, why)
    return str(task_dir / (ENSEMBLE_DIR if use == "ensemble" and offered else ADAPTER_DIR))


def _name_and_directory(item: str) -> tuple[str, str]:
    """An ``--adapter`` value's name (empty when not named) and directory: ``NAME=DIR``, unless it exists as a
    path."""
    name, _, directory = item.partition("=") if "=" in item and not os.path.exists(item) else ("", "", item)
    return name, directory


def _required_run_report(run_dir: str | os.PathLike) -> Path:
    """The report of the output directory ``run_dir`` (a one-line error when it is not one)."""
    report = _run_report(run_dir)
    if report is None:
        raise InCAError(f"{run_dir} is not an output directory of inca-train ({TRAIN_REPORT}) or inca-compare "
                        f"({COMPARE_REPORT}); pass saved adapters with --adapter OUT/<task>-<hash>/adapter")
    return report


def _run_report(directory: str | os.PathLike) -> Path | None:
    """The report that makes ``directory`` an output directory of inca-train or inca-compare (None: it is not one,
    or it is a saved adapter)."""
    path = Path(directory)
    if not path.is_dir() or (path / ADAPTER_CONFIG).exists():
        return None
    return next((path / name for name in (TRAIN_REPORT, COMPARE_REPORT) if (path / name).is_file()), None)


def output_format(fmt: str | None, output: str | os.PathLike | None) -> str:
    """The rows' format: ``fmt`` when given, else JSON Lines for an output file named ``.json``/``.jsonl``, else
    CSV."""
    if fmt is not None:
        return fmt
    return "jsonl" if str(output or "").endswith((".json", ".jsonl")) else "csv"


def expand_images(paths: Sequence[str]) -> list[str]:
    """Image files given directly or found (recursively, sorted) in given directories. Anything that is not a
    directory is kept, even a FIFO named ``x.png``: reading refuses it (without blocking) and names it."""
    files: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                                and not p.is_dir()))
        elif path.exists() or path.is_symlink():
            files.append(str(path))
        else:
            raise InCAError(f"image {path} does not exist")
    if not files:
        raise InCAError(f"no images found in {', '.join(map(str, paths))} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return files


def check_predict_input(adapters: Sequence[str], runs: Sequence[str], images: Sequence[str] | None,
                        output: str | None = None, export_onnx: str | None = None) -> list[str]:
    """What inca-predict is given, checked before torch is imported or any model loads: each ``--adapter`` a saved
    adapter or model (it holds ``adapter_config.json``) or an output directory, each ``--run`` an output directory of
    inca-train or inca-compare, the images there, and ``--output`` or ``--export-onnx`` writable. Returns the image
    files (none for an export)."""
    if not (adapters or runs) or not (images or export_onnx):
        raise InCAError("--adapter DIR... or --run DIR, with --images (or --export-onnx FILE), is required (or "
                        "--resign DIR to accept an edited adapter config)")
    for _, directory in map(_name_and_directory, adapters):
        if not Path(directory).is_dir():
            raise InCAError(f"--adapter {directory} is not a directory: give a saved adapter "
                            "(OUT/<task>-<hash>/adapter) or an output directory of inca-train or inca-compare")
        if not (Path(directory) / ADAPTER_CONFIG).is_file() and _run_report(directory) is None:
            raise InCAError(f"--adapter {directory} holds no saved adapter ({ADAPTER_CONFIG}) and no report of "
                            f"inca-train ({TRAIN_REPORT}) or inca-compare ({COMPARE_REPORT})")
    for run in runs:
        _required_run_report(run)
    if export_onnx:
        check_output_file(export_onnx, "the ONNX model", "model.onnx")
        return []
    if output:
        check_output_file(output)
    return expand_images(images or [])


def check_output_file(path: str | os.PathLike, what: str = "predictions", example: str = "predictions.csv") -> None:
    """Refuse, before any work, an output path that cannot be written: a directory, or a place that refuses
    new files (read-only, no permission). Its missing parent directories are created when it is written."""
    target = Path(path)
    if target.is_dir():
        raise InCAError(f"cannot write {what} to {path}: it is a directory; name a file in it, e.g. "
                        f"{target / example}")
    place = existing_parent(target.parent)
    if not place.is_dir():
        raise InCAError(f"cannot write {what} to {path}: {place} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=place):
            pass
    except OSError as exc:
        raise InCAError(f"cannot write {what} to {path}: {place} refuses new files "
                        f"({exc.strerror or first_line(exc)}); choose another place") from None
