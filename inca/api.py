"""The whole workflow from Python: probe a task's layers, probe or train a suite of tasks, predict images.

Each function is what the matching command runs (``inca-probe``, ``inca-train``, ``inca-predict``), with the
command's defaults; settings are the command's options by their Python names (``epochs=3``, ``lr=[1e-3, 3e-3]``,
``probes=["linear"]``), checked as a recipe's are. Tasks are specs (``"digits"``, ``"folder:DIR"``) or loaded
:class:`~inca.tasks.Task` objects. Torch and the suites are imported when a function runs, so ``import inca``
stays light.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .options import BATCH_SIZE

if TYPE_CHECKING:
    from .backbone import Backbone
    from .prediction import ImagePrediction
    from .probe_report import ProbeReport
    from .probes import ProbeSuiteConfig
    from .tasks import Task
    from .train.config import InCATrainConfig
    from .training_log import TrainingLog

__all__ = ["predict", "probe_suite", "probe_task", "train_suite"]

LayerSpec = str | int | Sequence[int]


def probe_task(backbone: Backbone, task: str | Task, layers: LayerSpec = "all", **settings: Any) -> dict[str, Any]:
    """Probe ``layers`` of ``backbone`` on one task (nothing written): the result ``inca-probe`` records per task,
    with each probe's val and test accuracy per pooling and layer (``results``), the best layers on val and each
    probe's ranking of the layers. ``settings``: the probes and their options (``probes=["linear", "knn"]``,
    ``k=10``, ``inca_epochs=2``, ...; see ``inca-probe --help``)."""
    from .backbone import resolve_layers
    from .probe import probe_task as probe_one
    from .probes import ProbeSuiteConfig

    loaded = _loader([task])(_spec(task))
    return probe_one(backbone, loaded, resolve_layers(_layer_text(layers), backbone.num_blocks),
                     ProbeSuiteConfig(**settings))


def probe_suite(
    backbone: Backbone, tasks: Iterable[str | Task], out: str | os.PathLike, layers: LayerSpec = "all", *,
    overwrite: bool = False, config: ProbeSuiteConfig | None = None,
    load_task: Callable[[str], Task] | None = None, **settings: Any,
) -> dict[str, Any]:
    """``inca-probe``: every probe on every layer of each task, into ``out`` (``probe.json``, ``probe.md``, plots;
    a rerun with the same settings skips finished tasks). Returns ``probe.json``'s content, whose path
    :func:`train_suite` takes as ``probe_report`` to train on each task's best layers (``layers="best:K"``).
    ``settings`` (or a ``config``) as in :func:`probe_task`; ``load_task`` loads a spec (default: its defaults)."""
    from .probe import run_probe_suite
    from .probes import ProbeSuiteConfig

    tasks = list(tasks)
    config = config or ProbeSuiteConfig(**settings)
    return run_probe_suite(backbone, [_spec(t) for t in tasks], _layer_text(layers), config, out,
                           load_task=load_task or _loader(tasks), overwrite=overwrite)


def train_suite(
    backbone: Backbone, tasks: Iterable[str | Task], out: str | os.PathLike, layers: LayerSpec = "all", *,
    probe_report: str | os.PathLike | ProbeReport | None = None, rank_by: str | None = None, overwrite: bool = False,
    config: InCATrainConfig | None = None, load_task: Callable[[str], Task] | None = None,
    log: TrainingLog | None = None, **settings: Any,
) -> dict[str, Any]:
    """``inca-train``: a grid of InCA adapters trained together on each task's ``layers`` (``"best:K"``: the K best
    of ``probe_report``, its path or a :class:`~inca.probe_report.ProbeReport` already read, ranked by the
    ``rank_by`` probe), into ``out``: each task's best adapter (and ensemble) and ``results.json``/``results.md``;
    a rerun with the same settings skips finished tasks. Returns
    ``results.json``'s content (per task: accuracies, every adapter, ``serve_dir``: what :func:`predict` serves
    with ``use="ensemble"``).
    ``settings``: the grid and training options (``epochs=3``, ``lr=[1e-3, 3e-3]``, ``ensemble=2``, ...; see
    ``inca-train --help``), or a ``config``. The probe report is checked against every task before training."""
    from .probe import layers_from_report
    from .probe_report import check_probe_report
    from .probes.ranking import RANK_BY, best_count
    from .train.config import InCATrainConfig
    from .training import run_train_suite

    tasks = list(tasks)
    specs = [_spec(t) for t in tasks]
    config = config or InCATrainConfig(**settings)
    spec = _layer_text(layers)
    if best_count(spec) is not None and probe_report is not None:  # every task, probed as deep, before any loads
        probe_report = check_probe_report(probe_report, specs, backbone.num_blocks)  # read once, passed on
    layers_for = layers_from_report(spec, backbone.num_blocks, probe_report, rank_by or RANK_BY)
    return run_train_suite(backbone, specs, layers_for, spec, config, out, load_task=load_task or _loader(tasks),
                           overwrite=overwrite, log=log)


def predict(
    adapters: str | os.PathLike | Sequence[str | os.PathLike], images: str | os.PathLike | Sequence[str | os.PathLike],
    *, top_k: int = 1, use: str = "adapter", weights: str | None = None, device: str = "auto",
    batch_size: int = BATCH_SIZE,
) -> list[ImagePrediction]:
    """``inca-predict``: classify image files (or directories of them) for every task at once, one backbone pass per
    batch. ``adapters``: saved adapter directories, or output directories of ``inca-train`` (each task's adapter,
    or with ``use="ensemble"`` its ensemble where ``results.json`` offers one) or ``inca-compare``. Returns one
    :class:`~inca.prediction.ImagePrediction` per image (its ``labels`` and ``probabilities`` per task, top-``k``);
    an unreadable image is a one-line :class:`~inca.errors.InCAError`."""
    from .devices import resolve_device
    from .inference import MultiTaskInCA
    from .prediction import adapter_paths, expand_images, predict_images

    directories = [str(a) for a in ([adapters] if isinstance(adapters, (str, os.PathLike)) else adapters)]
    files = expand_images([str(i) for i in ([images] if isinstance(images, (str, os.PathLike)) else images)])
    model = MultiTaskInCA.from_saved(adapter_paths(directories, use=use), weights, resolve_device(device))
    return list(predict_images(model, files, top_k, batch_size))


def _spec(task: str | Task) -> str:
    return task if isinstance(task, str) else task.spec


def _layer_text(layers: LayerSpec) -> str:
    """A layer spec as the commands read it (``"all"``, ``"last:2"``, ``"best:2"``, ``3`` or ``[0, 2]``)."""
    return layers if isinstance(layers, str) else str(layers) if isinstance(layers, int) else ",".join(map(str, layers))


def _loader(tasks: Sequence[str | Task]) -> Callable[[str], Task]:
    """Loads a spec with the default settings, or returns the given Task of that spec."""
    from .tasks import load_task

    given = {t.spec: t for t in tasks if not isinstance(t, str)}
    return lambda spec: given[spec] if spec in given else load_task(spec)
