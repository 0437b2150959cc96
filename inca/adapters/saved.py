"""A task's trained InCA adapter as it is saved, loaded and served: which layers it reads, its classes,
where it came from, and one or several members (several: a parallel ensemble).

The InCA paper (Dukler et al., 2023) trains many adapters on one backbone pass and then *selects* one or
*combines* several. A :class:`TaskAdapter` is either: one member gives that adapter's logits; K members give
``log(mean_k softmax(logits_k))``, whose softmax is the averaged probability (and whose argmax is the
ensemble's prediction), so callers treat both the same way.

On disk it is the format every inca method shares (:func:`inca.adapters.common.write_adapter`):
``adapter_config.json`` (``method: "inca"``, the members' layers and shapes, classes, provenance, and the
SHA-256 of the weights) plus ``adapter.safetensors`` (``members.<k>.<InCA parameter>``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from inca.adapters import common
from inca.adapters.inca import InCA, InCABank
from inca.errors import InCAError

__all__ = ["TaskAdapter", "load_adapter", "save_adapter"]

METHOD = "inca"
_SHAPE = ("dim", "num_classes", "num_heads", "num_queries", "mlp_ratio")
_RESERVED = frozenset({"method", "classes", "members", "format_version", "weights_sha256"})


class TaskAdapter(nn.Module):
    """One task's adapter: ``features {layer: tokens [B, T, D]} -> logits [B, C]``.

    ``members[k]`` reads block ``layers[k]``; ``metadata`` records provenance (backbone description, task
    spec, hyper-parameters, accuracies) and travels with the saved files.
    """

    def __init__(
        self,
        members: Sequence[InCA],
        layers: Sequence[int],
        classes: Sequence[str],
        metadata: Mapping[str, Any] | None = None,
        member_info: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        if not members or len(members) != len(layers):
            raise InCAError(
                f"a TaskAdapter needs one layer per member, got {len(members)} members and {len(layers)} layers"
            )
        classes = [str(c) for c in classes]
        for k, member in enumerate(members):
            if member.num_classes != len(classes) or member.dim != members[0].dim:
                raise InCAError(
                    f"member {k} has {member.num_classes} classes of width {member.dim}; every member needs "
                    f"the {len(classes)} classes given and width {members[0].dim}"
                )
        self.members = nn.ModuleList(members)
        self.layers = [int(layer) for layer in layers]
        self.classes = classes
        self.metadata = dict(metadata or {})
        self.member_info = [dict(info) for info in member_info] if member_info else [{} for _ in members]
        clash = sorted(_RESERVED & set(self.metadata))
        if clash:
            raise InCAError(f"TaskAdapter metadata may not set {clash}: those keys describe the adapter itself")

    @classmethod
    def from_bank(
        cls, bank: InCABank, members: Sequence[int], classes: Sequence[str], metadata: Mapping[str, Any] | None = None
    ) -> TaskAdapter:
        """Adapters ``members`` of a trained bank (one: that adapter; several: their ensemble), copied, each
        recording its spec (layer, shape, learning rate, weight decay, seed)."""
        specs = [bank.specs[i] for i in members]
        info = [{k: v for k, v in asdict(spec).items() if k not in ("layer", "num_heads", "num_queries", "mlp_ratio")}
                for spec in specs]
        return cls([bank.adapter(i) for i in members], [s.layer for s in specs], classes, metadata, info)

    @property
    def dim(self) -> int:
        return self.members[0].dim

    @property
    def reads(self) -> list[int]:
        """The distinct backbone blocks this adapter needs, ascending."""
        return sorted(set(self.layers))

    def forward(self, features: Mapping[int, Tensor]) -> Tensor:
        missing = [layer for layer in self.reads if layer not in features]
        if missing:
            raise InCAError(f"features lack layers {missing} that this adapter reads; extract {self.reads}")
        logits = [member(features[layer]) for member, layer in zip(self.members, self.layers)]
        if len(logits) == 1:
            return logits[0]
        log_probs = torch.stack([x.float().log_softmax(-1) for x in logits])
        return torch.logsumexp(log_probs, 0) - math.log(len(logits))


def save_adapter(adapter: TaskAdapter, directory: str | os.PathLike) -> None:
    """Write ``adapter`` to ``directory`` (atomic files; the config records the weights' checksum)."""
    members = [
        {"layer": layer, **{key: getattr(member, key) for key in _SHAPE}, **info}
        for member, layer, info in zip(adapter.members, adapter.layers, adapter.member_info)
    ]
    config = {**adapter.metadata, "method": METHOD, "classes": adapter.classes, "members": members}
    tensors = {f"members.{k}.{name}": t for k, m in enumerate(adapter.members) for name, t in m.state_dict().items()}
    common.write_adapter(directory, config, tensors)


def load_adapter(directory: str | os.PathLike) -> TaskAdapter:
    """Read what :func:`save_adapter` wrote (on CPU), refusing damaged, mismatched or non-finite weights."""
    config, tensors = common.read_adapter(directory, METHOD)
    members_info = config.get("members")
    classes = config.get("classes")
    if not isinstance(members_info, list) or not members_info or not isinstance(classes, list):
        raise InCAError(f"{directory}: adapter_config.json lacks its members or classes; save the adapter again")
    members, layers, extra = [], [], []
    for k, info in enumerate(members_info):
        try:
            shape = {key: info[key] for key in _SHAPE}
            layers.append(int(info["layer"]))
        except (KeyError, TypeError, ValueError):
            raise InCAError(f"{directory}: member {k} of adapter_config.json is incomplete; save it again") from None
        if shape["num_classes"] != len(classes):
            raise InCAError(
                f"{directory}: member {k} has a head of {shape['num_classes']} classes but the config lists "
                f"{len(classes)} class names; save the adapter again"
            )
        member = InCA(**shape, seed=0)
        prefix = f"members.{k}."
        _load_member(directory, member, {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)})
        members.append(member)
        extra.append({key: value for key, value in info.items() if key not in (*_SHAPE, "layer")})
    metadata = {key: value for key, value in config.items() if key not in _RESERVED}
    return TaskAdapter(members, layers, classes, metadata, extra)


def _load_member(directory: str | os.PathLike, member: InCA, state: dict[str, Tensor]) -> None:
    expected = member.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{n} {tuple(state[n].shape)} (expected {tuple(t.shape)})"
             for n, t in expected.items() if n in state and state[n].shape != t.shape]
    if missing or unexpected or wrong:
        raise InCAError(
            f"{directory}: adapter.safetensors does not fit adapter_config.json: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}; save the adapter again"
        )
    bad = [n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise InCAError(f"{directory}: adapter weights {bad[:3]} hold NaN or infinity; retrain or restore them")
    member.load_state_dict(state)
