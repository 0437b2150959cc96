"""A task's trained InCA adapter as it is saved, loaded and served: which layers it reads, its classes,
where it came from, and one or several members (several: a parallel ensemble).

The InCA paper (Dukler et al., 2023) trains many adapters on one backbone pass and then *selects* one or
*combines* several. A :class:`TaskAdapter` is either: one member gives that adapter's logits; K members give
``log(mean_k softmax(logits_k))``, whose softmax is the averaged probability (and whose argmax is the
ensemble's prediction), so callers treat both the same way.

On disk it is the format every inca method shares (:func:`inca.adapters.common.write_adapter`):
``adapter_config.json`` (``method: "inca"``, the members' layers and shapes, classes, provenance, and the
SHA-256 of the weights file) plus ``adapter.safetensors`` (``members.<k>.<InCA parameter>``, and in its header
the config it was saved with). A config edited by hand (two class names swapped) is refused on load, naming
what changed; :func:`resign_adapter` accepts a deliberate edit.

Every other method's trained model is saved in the same format by that method's ``save`` (its trainable or
changed tensors, and the config its ``load`` rebuilds it from), its config given, in that one save, the keys an
InCA adapter records for serving: ``classes``, ``task``, ``backbone`` (name, weights, weights hash, model kwargs,
preprocessing), the accuracies and how it was trained (:func:`inca.inference.save_end_to_end`). So one loader,
:meth:`inca.inference.MultiTaskInCA.from_saved`, serves both kinds, reading each config's ``method``.
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
from inca.errors import InCAError, first_line

__all__ = ["TaskAdapter", "load_adapter", "resign_adapter", "save_adapter"]

METHOD = "inca"
_SHAPE = ("dim", "num_classes", "num_heads", "num_queries", "mlp_ratio")
MAX_MLP_RATIO = 64  # inca's own bound on a loaded config (ViTs use 4): refuses absurd sizes before building
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
    """Read what :func:`save_adapter` wrote (on CPU), refusing a config edited since it was saved, values that
    cannot describe an adapter, and damaged, mismatched or non-finite weights, each in one line."""
    config, tensors = common.read_adapter(directory, METHOD)
    return _build(directory, config, tensors)


def resign_adapter(directory: str | os.PathLike) -> list[str]:
    """Accept a deliberate edit of a saved adapter's ``adapter_config.json`` (say, renamed classes) so that it
    loads again; returns what changed. An InCA adapter must still load (valid values, weights that fit);
    other methods' adapters are re-signed as they are. Same as ``inca-predict --resign DIR``."""

    def check(config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        if config.get("method") == METHOD:
            _build(directory, config, tensors)

    return common.resign_adapter(directory, check)


def _build(directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, Tensor]) -> TaskAdapter:
    """The adapter ``config`` describes, with ``tensors`` loaded: every value and shape is checked before
    anything is allocated (a config asking for 10^10 queries is refused, not attempted)."""
    members_info, classes = config.get("members"), config.get("classes")
    if not isinstance(members_info, list) or not members_info or not isinstance(classes, list):
        raise InCAError(f"{directory}: adapter_config.json lacks its members or classes; save the adapter again")
    if not classes or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise InCAError(f"{directory}: adapter_config.json's classes must be distinct strings, got {classes[:5]}")
    backbone = config.get("backbone") if isinstance(config.get("backbone"), dict) else {}
    shapes, layers, states = [], [], []
    for k, info in enumerate(members_info):
        shape, layer = _member_shape(directory, k, info, len(classes), backbone)
        prefix = f"members.{k}."
        state = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
        _check_member_tensors(directory, k, shape, state)
        shapes.append(shape)
        layers.append(layer)
        states.append(state)
    strays = sorted(n for n in tensors if not n.startswith(tuple(f"members.{k}." for k in range(len(shapes)))))
    if strays:
        raise InCAError(f"{directory}: adapter.safetensors holds tensors of no member ({strays[:3]}); save it again")
    members = []
    for shape, state in zip(shapes, states):
        member = InCA(**shape, seed=0)
        member.load_state_dict(state)
        members.append(member)
    extra = [{key: value for key, value in info.items() if key not in (*_SHAPE, "layer")} for info in members_info]
    metadata = {key: value for key, value in config.items() if key not in _RESERVED}
    return TaskAdapter(members, layers, classes, metadata, extra)


def _member_shape(
    directory: str | os.PathLike, k: int, info: Any, num_classes: int, backbone: Mapping[str, Any]
) -> tuple[dict[str, Any], int]:
    """Member ``k``'s InCA arguments and layer, each of the right type and range for its recorded backbone."""
    if not isinstance(info, dict) or any(key not in info for key in (*_SHAPE, "layer")):
        raise InCAError(f"{directory}: member {k} of adapter_config.json is incomplete; save it again")
    where = f"{directory}: member {k} of adapter_config.json"

    def integer(key: str, low: int, high: int | None = None) -> int:
        value = info[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low or high is not None and value > high:
            allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
            raise InCAError(f"{where} has {key}={value!r}; expected {allowed}")
        return value

    depth, width = backbone.get("num_blocks"), backbone.get("width")
    layer = integer("layer", 0, depth - 1 if isinstance(depth, int) else None)
    dim = integer("dim", 1)
    if isinstance(width, int) and dim != width:
        raise InCAError(f"{where} has dim={dim} but its backbone {backbone.get('name')} has width {width}")
    num_heads = integer("num_heads", 1, dim)
    if dim % num_heads:
        raise InCAError(f"{where} has num_heads={num_heads}, which does not divide its width {dim}")
    if integer("num_classes", 1) != num_classes:
        raise InCAError(f"{where} has a head of {info['num_classes']} classes but the config lists {num_classes} "
                        "class names; save the adapter again")
    ratio = info["mlp_ratio"]
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio <= MAX_MLP_RATIO:
        raise InCAError(f"{where} has mlp_ratio={ratio!r}; expected a number in [0, {MAX_MLP_RATIO}]")
    shape = {"dim": dim, "num_classes": num_classes, "num_heads": num_heads,
             "num_queries": integer("num_queries", 1), "mlp_ratio": ratio}
    return shape, layer


def _check_member_tensors(
    directory: str | os.PathLike, k: int, shape: dict[str, Any], state: dict[str, Tensor]
) -> None:
    """Names and shapes from a member built on the meta device (nothing allocated), then finiteness."""
    try:
        with torch.device("meta"):
            expected = InCA(**shape).state_dict()
    except (RuntimeError, OverflowError, TypeError, ValueError) as exc:  # a size beyond what torch can index
        raise InCAError(f"{directory}: member {k} of adapter_config.json has an impossible shape {shape} "
                        f"({first_line(exc)})") from None
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{n} {tuple(state[n].shape)} (expected {tuple(t.shape)})"
             for n, t in expected.items() if n in state and state[n].shape != t.shape]
    if missing or unexpected or wrong:
        raise InCAError(
            f"{directory}: adapter.safetensors does not fit member {k} of adapter_config.json: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}; save the adapter again"
        )
    bad = [n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise InCAError(f"{directory}: adapter weights {bad[:3]} hold NaN or infinity; retrain or restore them")
