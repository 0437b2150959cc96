"""Images in, logits out: InCA adapters joined to their frozen backbone as ordinary ``nn.Module`` s.

- :class:`InCAClassifier`: backbone + layer + adapter, ``forward(images) -> logits``; drop it into any
  training or evaluation loop, ``torch.compile`` it or ``torch.export`` it.
- :class:`MultiTaskInCA`: many tasks' adapters (each one adapter or an ensemble, on any layers) served
  from **one** backbone pass that stops at the deepest block any of them reads, ``-> {task: logits}``.
  This is the composability of InCA (Dukler et al., 2023): adapters trained in isolation run together.

Both run the backbone through timm's ``forward_intermediates(stop_early=True)``, so blocks past the deepest
layer read are never computed, and the module stays traceable (no hooks, no data-dependent control flow).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from inca.adapters.saved import TaskAdapter, load_adapter
from inca.backbone import Backbone, create_backbone, intermediate_tokens, resolve_layers
from inca.errors import InCAError

__all__ = ["InCAClassifier", "MultiTaskInCA", "check_adapter_fits"]

_PROVENANCE = ("name", "model_kwargs", "weights_hash")


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


class MultiTaskInCA(_FrozenBackbone):
    """Several tasks' adapters on one frozen backbone: ``images -> {task: logits [B, C_task]}``.

    The backbone runs once per batch, up to the deepest block any adapter reads; each task's
    :class:`~inca.adapters.saved.TaskAdapter` (one adapter or an ensemble) reads its layers from that
    pass. Adapters recorded against different backbones or weights are refused, as is a backbone whose
    width, depth or (for an :class:`~inca.backbone.Backbone`) weights differ from what they recorded.
    ``transform`` is the backbone's eval preprocessing when it is given as a ``Backbone`` (``preprocessing``:
    its settings, timm's data config).
    """

    def __init__(self, backbone: Backbone | nn.Module, adapters: Mapping[str, TaskAdapter]) -> None:
        super().__init__()
        if not adapters:
            raise InCAError("MultiTaskInCA needs at least one task adapter")
        self.backbone = _frozen_model(backbone)
        self.tasks = list(adapters)
        for task, adapter in adapters.items():
            check_adapter_fits(adapter, backbone, task)
        _check_same_provenance(adapters)
        self.adapters = nn.ModuleList(adapters.values())
        self.layers = sorted({layer for adapter in self.adapters for layer in adapter.reads})
        self.transform = backbone.transform if isinstance(backbone, Backbone) else None
        self.preprocessing = backbone.preprocessing if isinstance(backbone, Backbone) else None

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        features = dict(zip(self.layers, intermediate_tokens(self.backbone, images, self.layers)))
        return {task: adapter(features) for task, adapter in zip(self.tasks, self.adapters)}

    def classes(self, task: str) -> list[str]:
        return self.adapters[self.tasks.index(task)].classes

    @classmethod
    def from_saved(
        cls,
        adapters: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
        weights: str | None = None,
        device: str | torch.device = "cpu",
    ) -> MultiTaskInCA:
        """Load saved adapters (a list, named by their recorded task, or ``{task: directory}``) and the backbone
        they record (``weights`` overrides the recorded weights, which must then be identical)."""
        if isinstance(adapters, Mapping):
            loaded = {task: load_adapter(directory) for task, directory in adapters.items()}
        else:
            loaded = _name_by_task({directory: load_adapter(directory) for directory in adapters})
        _check_same_provenance(loaded)
        record = _backbone_record(next(iter(loaded.values())), next(iter(loaded)))
        backbone = create_backbone(record["name"], weights or record["weights"], record.get("model_kwargs"), device)
        return cls(backbone, loaded).to(device)


def _name_by_task(adapters: Mapping[str | os.PathLike, TaskAdapter]) -> dict[str, TaskAdapter]:
    """Adapters keyed by the task they record (else their directory's name); two for one task is an error."""
    named: dict[str, TaskAdapter] = {}
    for directory, adapter in adapters.items():
        task = str(adapter.metadata.get("task") or Path(directory).name)
        if task in named:
            raise InCAError(f"two adapters for task {task!r} (one in {directory}); name them with NAME=DIR")
        named[task] = adapter
    return named


def _backbone_record(adapter: TaskAdapter, task: str) -> dict[str, Any]:
    record = adapter.metadata.get("backbone")
    if not isinstance(record, dict) or "name" not in record:
        raise InCAError(f"the adapter of {task!r} does not record its backbone; it was not saved by inca-train")
    wrong = [key for key, kinds in (("name", str), ("weights", str), ("model_kwargs", (dict, type(None))))
             if not isinstance(record.get(key), kinds)]
    if wrong:
        raise InCAError(f"the adapter of {task!r} records its backbone without a valid {', '.join(wrong)} (as "
                        "inca-train writes them); save the adapter again")
    return record


def _check_same_provenance(adapters: Mapping[str, TaskAdapter]) -> None:
    recorded = {task: a.metadata["backbone"] for task, a in adapters.items()
                if isinstance(a.metadata.get("backbone"), dict)}
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


def check_adapter_fits(adapter: TaskAdapter, backbone: Backbone | nn.Module, task: str = "the task") -> None:
    """Refuse an adapter trained on another backbone: width, depth or (when known) weights that differ."""
    model = backbone.model if isinstance(backbone, Backbone) else backbone
    width, depth = int(model.embed_dim), len(model.blocks)
    if adapter.dim != width:
        raise InCAError(
            f"the adapter of {task!r} reads width {adapter.dim} but the backbone has width {width}: "
            "use the backbone it was trained on"
        )
    if max(adapter.reads) >= depth:
        raise InCAError(f"the adapter of {task!r} reads layers {adapter.reads}; the backbone has {depth} blocks")
    record = adapter.metadata.get("backbone")
    recorded_hash = record.get("weights_hash") if isinstance(record, dict) else None
    if isinstance(backbone, Backbone) and recorded_hash and recorded_hash != backbone.weights_hash:
        raise InCAError(
            f"the adapter of {task!r} was trained on {record.get('name')} with other weights (hash "
            f"{recorded_hash}, these are {backbone.weights_hash}): pass the --weights it was trained with"
        )
