"""Images in, logits out: InCA adapters joined to their frozen backbone as ordinary ``nn.Module`` s.

- :class:`InCAClassifier`: backbone + layer + adapter, ``forward(images) -> logits``; drop it into any
  training or evaluation loop, ``torch.compile`` it or ``torch.export`` it.
- :class:`MultiTaskInCA`: many tasks' adapters (each one adapter or an ensemble, on any layers) served
  from **one** backbone pass that stops at the deepest block any of them reads, ``-> {task: logits}``.
  This is the composability of InCA (Dukler et al., 2023): adapters trained in isolation run together.
  It serves :class:`EndToEndModel` s beside them (LoRA, LoRA-GA, Compacter, full fine-tuning, linear probe, as
  ``inca-compare`` saves them); each of those changed its own copy of the backbone, so each runs its own forward.

Both run the backbone through timm's ``forward_intermediates(stop_early=True)``, so blocks past the deepest
layer read are never computed, and the module stays traceable (no hooks, no data-dependent control flow).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from inca.adapters.common import config_additions, configs_read_once, read_config
from inca.adapters.saved import METHOD as INCA
from inca.adapters.saved import TaskAdapter, load_adapter
from inca.backbone import Backbone, block_tokens, create_backbone, intermediate_tokens, resolve_layers
from inca.errors import InCAError
from inca.methods.registry import get_method
from inca.tasks import task_names
from inca.train.e2e import trainable_copy

__all__ = ["EndToEndModel", "InCAClassifier", "MultiTaskInCA", "check_adapter_fits", "load_end_to_end",
           "save_end_to_end"]

logger = logging.getLogger(__name__)

_PROVENANCE = ("name", "model_kwargs", "weights_hash", "final_norm")
# The registered method that trained a saved end-to-end model, whose ``load`` rebuilds it (its config's ``method``
# names the saved format, which methods share: LoRA-GA saves a LoRA).
TRAINED_WITH = "trained_with"


def _frozen_model(backbone: Backbone | nn.Module) -> nn.Module:
    model = backbone.model if isinstance(backbone, Backbone) else backbone
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "blocks"):
        raise InCAError(f"{type(model).__name__} is not a timm ViT-family model (no forward_intermediates/blocks)")
    return model.eval().requires_grad_(False)


class _FrozenBackbone(nn.Module):
    """A module whose ``backbone`` submodule stays frozen and in eval mode whatever ``train()`` says."""

    backbone: nn.Module

    def train(self, mode: bool = True) -> _FrozenBackbone:
        super().train(mode)
        self.backbone.eval()
        return self


class InCAClassifier(_FrozenBackbone):
    """A frozen timm ViT, one of its blocks, and an adapter reading that block: ``images -> logits``.

    ``backbone`` is an :class:`~inca.backbone.Backbone` or a timm model; it is frozen (``requires_grad``
    off, eval mode kept across ``.train()``), so only the adapter's parameters train and no gradient is
    ever computed through the backbone. ``adapter`` maps tokens ``[B, T, D]`` to logits (an
    :class:`~inca.adapters.inca.InCA`, or any module with that contract). ``layer`` may be negative.
    """

    def __init__(self, backbone: Backbone | nn.Module, layer: int, adapter: nn.Module) -> None:
        super().__init__()
        self.backbone = _frozen_model(backbone)
        self.layer = resolve_layers([layer], len(self.backbone.blocks))[0]
        self.adapter = adapter

    def forward(self, images: Tensor) -> Tensor:
        return self.adapter(intermediate_tokens(self.backbone, images, [self.layer])[0])


class EndToEndModel(_FrozenBackbone):
    """A task's end-to-end model as ``inca-compare`` saves it: a copy of the backbone that a method changed
    (LoRA, LoRA-GA, Compacter, full fine-tuning, a linear probe, or any registered method that trains a copy) and
    its head, ``images -> logits``. Frozen and in eval mode, as served; ``metadata`` is what its config records
    (backbone description, task, accuracies, hyper-parameters)."""

    def __init__(self, model: nn.Module, method: str, classes: Sequence[str], metadata: Mapping[str, Any]) -> None:
        super().__init__()
        self.backbone = model.eval().requires_grad_(False)
        self.method, self.classes, self.metadata = method, [str(c) for c in classes], dict(metadata)

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)


Served = TaskAdapter | EndToEndModel


def save_end_to_end(
    method: str, model: nn.Module, directory: str | os.PathLike, backbone: Backbone, classes: Sequence[str],
    head_pool: str | None = None, metadata: Mapping[str, Any] | None = None,
) -> None:  # fmt: skip
    """Save ``model`` (a trainable copy of ``backbone`` that ``method`` trained) with the method's own ``save``,
    whose signed config also records what rebuilding and serving it needs: the backbone's description (name,
    weights, weights hash, model kwargs, preprocessing), ``classes``, the head's pooling (``head_pool``, None: the
    backbone's own) and ``metadata`` (task, accuracies, hyper-parameters). The weights are written once."""
    with config_additions(directory, {**(metadata or {}), TRAINED_WITH: method, "backbone": backbone.describe(),
                                      "classes": list(classes), "head_pool": head_pool}):
        get_method(method).save(model, directory)


def load_end_to_end(directory: str | os.PathLike, backbone: Backbone) -> EndToEndModel:
    """What :func:`save_end_to_end` wrote, rebuilt on ``backbone`` (the one it records, which must have the same
    weights): a trainable copy with a new head, and the method's ``load`` puts the saved tensors in."""
    with configs_read_once():  # the method's load shares this read of the config
        config = read_config(directory)
        method = get_method(str(config.get(TRAINED_WITH) or config.get("method")))
        classes = config.get("classes")
        if method.load is None or not isinstance(classes, list) or not classes:
            raise InCAError(f"{directory} holds a {method.name!r} model without the classes inca-compare records (or "
                            "a method that cannot load one); save it again with inca-compare")
        metadata = {key: value for key, value in config.items() if key not in ("method", TRAINED_WITH, "classes")}
        check_adapter_fits(metadata, backbone, str(config.get("task") or directory))
        with torch.random.fork_rng(devices=[]):  # the new head's draw, overwritten by the saved one
            model = trainable_copy(backbone, len(classes), pool=config.get("head_pool"))
        method.load(model, directory)  # checks the weights and the config's signature
    return EndToEndModel(model, method.name, classes, metadata)


class MultiTaskInCA(_FrozenBackbone):
    """Several tasks' adapters on one frozen backbone: ``images -> {task: logits [B, C_task]}``.

    The backbone runs once per batch, up to the deepest block any adapter reads; each task's
    :class:`~inca.adapters.saved.TaskAdapter` (one adapter or an ensemble) reads its layers from that
    pass. An :class:`EndToEndModel` runs its own forward on the images (its backbone is its own). Adapters and
    models recorded against different backbones or weights are refused, as is a backbone whose width, depth or
    (for an :class:`~inca.backbone.Backbone`) weights differ from what they recorded.
    ``transform`` is the backbone's eval preprocessing when it is given as a ``Backbone`` (``preprocessing``:
    its settings, timm's data config).
    """

    def __init__(self, backbone: Backbone | nn.Module, adapters: Mapping[str, Served]) -> None:
        super().__init__()
        if not adapters:
            raise InCAError("MultiTaskInCA needs at least one task adapter")
        self.backbone = _frozen_model(backbone)
        self.tasks = list(adapters)
        for task, adapter in adapters.items():
            check_adapter_fits(adapter, backbone, task)
        _check_same_provenance({task: adapter.metadata for task, adapter in adapters.items()})
        self.adapters = nn.ModuleList(adapters.values())
        self.layers = sorted({layer for adapter in self.adapters if isinstance(adapter, TaskAdapter)
                              for layer in adapter.reads})
        self.transform = backbone.transform if isinstance(backbone, Backbone) else None
        self.preprocessing = backbone.preprocessing if isinstance(backbone, Backbone) else None
        # Adapters trained on the last block's tokens through the final norm (inca-compare --final-norm) read them so.
        self.final_norm = isinstance(backbone, Backbone) and backbone.final_norm

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        features = block_tokens(self.backbone, images, self.layers, self.final_norm)
        return {task: adapter(features) if isinstance(adapter, TaskAdapter) else adapter(images)
                for task, adapter in zip(self.tasks, self.adapters)}

    def classes(self, task: str) -> list[str]:
        return self.adapters[self.tasks.index(task)].classes

    @classmethod
    def from_saved(
        cls,
        adapters: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
        weights: str | None = None,
        device: str | torch.device = "cpu",
    ) -> MultiTaskInCA:
        """Load saved adapters and end-to-end models (a list, each named by its recorded task, or ``{task:
        directory}``) and the backbone they record (``weights`` overrides the recorded weights, which must then
        be identical). In a list, several of one task are told apart by a suffix (:func:`column_names`)."""
        directories = list(adapters.values()) if isinstance(adapters, Mapping) else list(adapters)
        if not directories:
            raise InCAError("MultiTaskInCA.from_saved needs at least one saved adapter directory")
        with configs_read_once():  # one read of each config: choosing the loader, naming, loading
            configs = [read_config(directory) for directory in directories]
            inca = {k: load_adapter(directories[k]) for k, config in enumerate(configs)
                    if config.get("method") == INCA}
            metadata = [inca[k].metadata if k in inca else config for k, config in enumerate(configs)]
            names = list(adapters) if isinstance(adapters, Mapping) else column_names(
                directories, metadata, [str(config.get(TRAINED_WITH) or config.get("method")) for config in configs])
            _check_same_provenance(dict(zip(names, metadata)))
            record = _backbone_record(metadata[0], names[0])
            backbone = create_backbone(record["name"], weights or record["weights"], record.get("model_kwargs"),
                                       device, final_norm=bool(record.get("final_norm")))
            served = {name: inca[k] if k in inca else load_end_to_end(directories[k], backbone)
                      for k, name in enumerate(names)}
        return cls(backbone, served).to(device)


def column_names(
    directories: Sequence[str | os.PathLike], metadata: Sequence[Mapping[str, Any]], methods: Sequence[str]
) -> list[str]:
    """Each saved model's name (its column in ``inca-predict``'s rows): the name of the task it records
    (:func:`~inca.tasks.task_names`: a folder's own name), else its directory's name. Several of one task become
    ``task@suffix``, the suffix the first that tells them all apart of: their method; the components in which their
    paths differ (``adapter``/``ensemble``, the runs' directories, joined by ``/``); their position. Each renaming
    is logged."""
    tasks = [str(meta.get("task") or Path(directory).name) for directory, meta in zip(directories, metadata)]
    shown = task_names(tasks)
    names = [shown[task] for task in tasks]
    for task in dict.fromkeys(tasks):
        group = [k for k, t in enumerate(tasks) if t == task]
        if len(group) < 2:
            continue
        paths = [Path(directories[k]).resolve().parts[::-1] for k in group]  # aligned from the end
        aligned = [[path[depth] if depth < len(path) else "" for depth in range(max(map(len, paths)))]
                   for path in paths]
        differ = [depth for depth in range(len(aligned[0])) if len({row[depth] for row in aligned}) > 1]
        options = [[methods[k] for k in group], ["/".join(row[depth] for depth in differ[::-1]) for row in aligned],
                   [str(j + 1) for j in range(len(group))]]
        suffixes = next(option for option in options if len(set(option)) == len(group))
        for k, suffix in zip(group, suffixes):
            names[k] = f"{shown[task]}@{suffix}"
        logger.info("%d saved models of task %s: columns %s (name them with NAME=DIR to choose)", len(group),
                    shown[task], ", ".join(f"{names[k]} ({directories[k]})" for k in group))
    return names


def _backbone_record(metadata: Mapping[str, Any], task: str) -> dict[str, Any]:
    record = metadata.get("backbone")
    if not isinstance(record, dict) or "name" not in record:
        raise InCAError(f"the adapter of {task!r} does not record its backbone; it was not saved by inca-train or "
                        "inca-compare")
    wrong = [key for key, kinds in (("name", str), ("weights", str), ("model_kwargs", (dict, type(None))))
             if not isinstance(record.get(key), kinds)]
    if wrong:
        raise InCAError(f"the adapter of {task!r} records its backbone without a valid {', '.join(wrong)} (as "
                        "inca-train writes them); save the adapter again")
    return record


def _check_same_provenance(metadata: Mapping[str, Mapping[str, Any]]) -> None:
    recorded = {task: meta["backbone"] for task, meta in metadata.items() if isinstance(meta.get("backbone"), dict)}
    if not recorded:
        return
    first_task, first = next(iter(recorded.items()))
    for task, record in recorded.items():
        differ = [key for key in _PROVENANCE if record.get(key) != first.get(key)]
        if differ:
            raise InCAError(
                f"adapters {first_task!r} and {task!r} were trained on different backbones (they differ in "
                f"{', '.join(differ)}); serve adapters of one backbone and weights together"
            )


def check_adapter_fits(
    adapter: Served | Mapping[str, Any], backbone: Backbone | nn.Module, task: str = "the task"
) -> None:
    """Refuse an adapter or model trained on another backbone: width, depth or (when known) weights that differ.
    ``adapter`` may be a saved model's metadata alone (checked before it is built)."""
    model = backbone.model if isinstance(backbone, Backbone) else backbone
    width, depth = int(model.embed_dim), len(model.blocks)
    if isinstance(adapter, TaskAdapter) and adapter.dim != width:
        raise InCAError(
            f"the adapter of {task!r} reads width {adapter.dim} but the backbone has width {width}: "
            "use the backbone it was trained on"
        )
    if isinstance(adapter, TaskAdapter) and max(adapter.reads) >= depth:
        raise InCAError(f"the adapter of {task!r} reads layers {adapter.reads}; the backbone has {depth} blocks")
    record = (adapter if isinstance(adapter, Mapping) else adapter.metadata).get("backbone")
    recorded_hash = record.get("weights_hash") if isinstance(record, dict) else None
    if isinstance(backbone, Backbone) and recorded_hash and recorded_hash != backbone.weights_hash:
        raise InCAError(
            f"the adapter of {task!r} was trained on {record.get('name')} with other weights (hash "
            f"{recorded_hash}, these are {backbone.weights_hash}): pass the --weights it was trained with"
        )
