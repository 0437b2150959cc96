"""Optimisation for adapter banks: AdamW with a learning rate and weight decay per stacked row; and the one family
of learning-rate schedules (linear warm-up, then cosine, linear or constant) every inca trainer uses."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw
from torch.torch_version import TorchVersion

from inca.errors import InCAError
from inca.train.config import SCHEDULES

__all__ = ["BatchedAdamW", "cosine_schedule", "fused_adamw", "lr_schedule"]

_FUSED_CPU = TorchVersion(torch.__version__) >= "2.4"  # torch's fused AdamW kernel runs on CPU from 2.4


def fused_adamw(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for ``device`` (one kernel for every parameter: the fastest
    update, and the one every inca trainer asks for where it exists)."""
    return device.type == "cuda" or (device.type == "cpu" and _FUSED_CPU)


class BatchedAdamW:
    """AdamW over parameters stacked along dim 0, row ``e`` of every tensor belonging to one adapter.

    ``torch.optim.AdamW`` takes one learning rate per parameter group, a bank needs one per row. Each
    step hands torch's own AdamW kernel (fused where the device has one, foreach otherwise) the rows as
    views, one call per distinct (lr, weight decay), so a row is updated exactly as torch's AdamW would
    update that adapter alone; the state (``exp_avg``, ``exp_avg_sq``, ``step``) is kept per row. Rows
    marked ``frozen`` are left out of the call: their parameters and state are untouched and their
    gradients zeroed.

    Each group is a dict with ``params`` (tensors ``[E, ...]``, one E per group), ``lr`` and
    ``weight_decay`` (E floats), and optionally ``adapters`` (E ids that ``frozen`` is indexed by;
    default ``0..E-1``). ``betas`` and ``eps`` default to ``torch.optim.AdamW``'s.
    """

    def __init__(
        self, groups: Sequence[Mapping[str, Any]], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.betas, self.eps = betas, eps
        self.groups = []
        for g in groups:
            params = list(g["params"])
            rows = params[0].shape[0]
            if any(p.shape[0] != rows for p in params) or len(g["lr"]) != rows or len(g["weight_decay"]) != rows:
                raise InCAError(f"a BatchedAdamW group needs {rows} rows in every tensor, lr and weight_decay")
            self.groups.append(
                {
                    "params": params,
                    "lr": [float(x) for x in g["lr"]],
                    "weight_decay": [float(x) for x in g["weight_decay"]],
                    "adapters": list(g.get("adapters", range(rows))),
                    "exp_avg": [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params],
                    "exp_avg_sq": [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params],
                    "step": [torch.zeros(rows, dtype=torch.float32, device=p.device) for p in params],
                }
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients, or zero them in place: keeping the buffers of large stacks avoids
        re-faulting fresh memory on every step."""
        for g in self.groups:
            for p in g["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self, lr_scale: float = 1.0, frozen: Sequence[bool] | Tensor | None = None) -> None:
        """One update with learning rates ``lr * lr_scale``; ``frozen[adapter_id]`` rows are skipped."""
        frozen = frozen.tolist() if isinstance(frozen, Tensor) else frozen
        for g in self.groups:
            live = [i for i, p in enumerate(g["params"]) if p.grad is not None]
            if not live:
                continue
            device = g["params"][live[0]].device
            skip = {r for r, a in enumerate(g["adapters"]) if frozen is not None and frozen[a]}
            if skip:
                index = torch.tensor(sorted(skip), device=device)
                for i in live:
                    g["params"][i].grad.index_fill_(0, index, 0.0)
            buckets: dict[tuple[float, float], list[int]] = {}
            for r, key in enumerate(zip(g["lr"], g["weight_decay"])):
                if r not in skip:
                    buckets.setdefault(key, []).append(r)
            tensors = [(g["params"][i], g["exp_avg"][i], g["exp_avg_sq"][i], g["step"][i]) for i in live]
            rows_of = [[t.unbind(0) for t in (p, p.grad, m, v, s)] for p, m, v, s in tensors]
            fused = fused_adamw(device)
            for (lr, wd), rows in buckets.items():
                params, grads, exp_avgs, exp_avg_sqs, steps = (
                    [views[k][r] for views in rows_of for r in rows] for k in range(5)
                )
                adamw(
                    params, grads, exp_avgs, exp_avg_sqs, [], steps,
                    foreach=not fused, fused=fused, amsgrad=False, beta1=self.betas[0], beta2=self.betas[1],
                    lr=lr * lr_scale, weight_decay=wd, eps=self.eps, maximize=False,
                )  # fmt: skip

    def state_of(self, param: Tensor) -> dict[str, Tensor]:
        """The state of stacked parameter ``param``, ``{"exp_avg", "exp_avg_sq": [E, ...], "step": [E]}``: the
        tensors themselves, so writing a row sets that adapter's state (as ``torch.optim.Optimizer.state[param]``)."""
        for g in self.groups:
            for i, p in enumerate(g["params"]):
                if p is param:
                    return {key: g[key][i] for key in ("exp_avg", "exp_avg_sq", "step")}
        raise InCAError("this parameter is not optimised by this BatchedAdamW")

    def state_dict(self) -> dict[str, Tensor]:
        """Flat ``{"<group>.<param>.<exp_avg|exp_avg_sq|step>": tensor}``: safetensors-ready."""
        return {
            f"{gi}.{pi}.{key}": g[key][pi]
            for gi, g in enumerate(self.groups)
            for pi in range(len(g["params"]))
            for key in ("exp_avg", "exp_avg_sq", "step")
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        own = self.state_dict()
        if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
            raise InCAError("optimizer state does not match these parameters; it was saved for another bank")
        for k, t in own.items():
            t.copy_(state[k])


def lr_schedule(
    schedule: str, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0
) -> Callable[[int], float]:
    """Learning-rate multiplier of update ``step`` (0-based) under ``schedule`` (one of
    :data:`~inca.train.config.SCHEDULES`): a linear warm-up from ``1/warmup_steps`` to 1, then

    * ``cosine``: ``0.5 (1 + cos(pi p))``, ``p`` the fraction of the steps after the warm-up done;
    * ``linear``: ``1 - p`` (Hugging Face Trainer's default, ``get_linear_schedule_with_warmup``);
    * ``constant``: 1,

    the decays scaled to end at ``min_ratio`` at ``total_steps``. After the warm-up these are the Hugging Face
    Trainer's ``get_{cosine,linear,constant}_schedule_with_warmup``; during it, update ``step`` takes the value
    theirs gives update ``step + 1`` (no zero-lr first step: it would be a wasted update)."""
    if schedule not in SCHEDULES:
        raise InCAError(f"unknown learning-rate schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * decay

    return multiplier


def cosine_schedule(total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> Callable[[int], float]:
    """:func:`lr_schedule`'s ``cosine``: what an InCA bank trains with by default."""
    return lr_schedule("cosine", total_steps, warmup_steps, min_ratio)
