"""LoRA-GA: initialise LoRA from the gradient of the loss so the first steps follow full fine-tuning.

Follows the authors' code (Wang et al., 2024, github.com/Outsider565/LoRA-GA), not PEFT's variant: the
gradient ``G`` of every target base weight is averaged over the given batches; ``U, S, V =
svd_lowrank(G, q=min(4r, min(G.shape)), niter=4)``; direction "ArB2r" takes ``A = V[:, :r]^T`` and
``B = U[:, r:2r]`` so ``G A^T A + B B^T G`` is the best rank-2r approximation of ``G``; "stable" scaling
multiplies both by ``d_out^(1/4) / sqrt(gamma)``; then ``W0 <- W0 - s * (B @ A)`` keeps the output at step 0.
The paper's configuration uses rsLoRA: ``apply_lora(model, rslora=True)``.

Memory: only the target base weights require grad during the estimate, and a post-accumulate hook moves each
gradient into an fp32 accumulator (on the CPU, whatever the model's device) and frees ``p.grad`` at once, so
at most one layer's gradient is alive on the device; ``requires_grad`` flags are restored afterwards.
The randomised SVD runs on those CPU accumulators under a fixed seed, so the result is deterministic.

Saving: the modified base weight is NOT stored. Each layer keeps the ``A0``, ``B0`` it was shifted by
(:meth:`~inca.adapters.lora.LoRALinear.shift_base`, persistent buffers ``lora_A0``/``lora_B0``), and
:func:`~inca.adapters.lora.save_lora` writes them next to the trained ``lora_A``/``lora_B`` and the head.
:func:`~inca.adapters.lora.load_lora` on the original backbone re-applies the shift through the same fp32
function (bitwise-identical weight on the same device and library) and then loads the trained weights, so the
reloaded model's outputs equal the trained one's exactly, at twice the size of a plain LoRA file.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from inca.adapters.lora import LoRALinear, lora_layers
from inca.distributed import current
from inca.errors import InCAError

__all__ = ["DIRECTIONS", "SCALES", "estimate_gradients", "init_lora_ga"]

logger = logging.getLogger(__name__)

DIRECTIONS = ("ArB2r", "ArBr", "A2rBr", "random")
SCALES = ("stable", "gd", "unit", "weight_svd")


def estimate_gradients(
    model: nn.Module,
    layers: dict[str, LoRALinear],
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Mean over ``batches`` of dL/dW for each layer's base weight, as fp32 CPU tensors.

    Runs in train mode (dropout, drop-path as in training), as the authors' ``estimate_gradient`` and PEFT's
    LoRA-GA do (both call ``model.train()``); the model's mode is restored afterwards. Nothing but those
    weights requires grad meanwhile. A gradient that is zero everywhere (e.g. a zero-initialised head) has no
    direction to take and is an error.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    sums: dict[str, torch.Tensor] = {}

    def accumulate(name: str) -> Callable[[torch.Tensor], None]:
        def hook(weight: torch.Tensor) -> None:
            grad = weight.grad.detach().to("cpu", torch.float32, copy=True)
            if name in sums:
                sums[name] += grad
            else:
                sums[name] = grad
            weight.grad = None

        return hook

    handles = []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for name, layer in layers.items():
            layer.weight.requires_grad_(True)
            handles.append(layer.weight.register_post_accumulate_grad_hook(accumulate(name)))
        n_batches = 0
        model.train()
        with torch.enable_grad():
            for batch in batches:
                loss_fn(model, batch).backward()
                n_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training
    if n_batches == 0:
        raise InCAError("LoRA-GA needs at least one batch to estimate the gradient; pass a non-empty one")
    missing = [name for name in layers if name not in sums]
    if missing:
        raise InCAError(f"the loss does not depend on {missing[0]!r}; LoRA-GA needs a gradient for every "
                        f"LoRA layer, so target only layers the forward pass uses")
    if not any(bool(total.any()) for total in sums.values()):
        raise InCAError("the loss gradient is zero for every LoRA layer, so LoRA-GA has nothing to approximate "
                        "(a zero-initialised head sends no gradient back); start the head from a linear probe")
    world = current()  # data-parallel: each rank estimated on its shards; every rank gets the mean over all
    return {name: world.all_reduce_(sums[name] / n_batches) / world.size for name in layers}


def _svd_lowrank(matrix: torch.Tensor, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.svd_lowrank`` with its random projection drawn from a fixed seed (CPU RNG only)."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return torch.svd_lowrank(matrix, q=q, niter=4)


def _lora_ga_factors(
    grad: torch.Tensor,
    layer: LoRALinear,
    gamma: float,
    direction: str,
    scale: str,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) in fp32 for one layer, as in the authors' ``lora_ga_init``."""
    r = layer.rank
    U, _, V = _svd_lowrank(grad, q=min(4 * r, min(grad.shape)), seed=seed)
    Vt = V.T
    if direction == "ArB2r":
        A, B = Vt[:r], U[:, r : 2 * r]
    elif direction == "A2rBr":
        A, B = Vt[r : 2 * r], U[:, :r]
    elif direction == "ArBr":
        A, B = Vt[1 : 2 * r : 2], U[:, 0 : 2 * r : 2]
    else:  # "random": r of the top 2r singular directions for A, the other r for B
        order = random.Random(seed).sample(range(2 * r), 2 * r)
        A, B = Vt[order[:r]], U[:, order[r:]]
    if scale == "stable":
        factor = grad.shape[0] ** 0.25 / math.sqrt(gamma)  # d_out^(1/4) / sqrt(gamma)
        A, B = A * factor, B * factor
    elif scale == "gd":
        A, B = A / layer.scaling, B / layer.scaling
    elif scale == "weight_svd":
        weight = layer.weight.detach().to("cpu", torch.float32)
        _, S, _ = _svd_lowrank(weight, q=min(4 * r, min(weight.shape)), seed=seed)
        factor = (S[:r] / layer.scaling).sqrt().mean()
        A, B = A * factor, B * factor
    return A.contiguous(), B.contiguous()


@torch.no_grad()
def _initialise(layer: LoRALinear, A: torch.Tensor, B: torch.Tensor) -> None:
    A = A.to(layer.lora_A.device, layer.lora_A.dtype)
    B = B.to(layer.lora_B.device, layer.lora_B.dtype)
    layer.lora_A.copy_(A)
    layer.lora_B.copy_(B)
    layer.shift_base(A, B)


def init_lora_ga(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    gamma: float = 16.0,
    direction: str = "ArB2r",
    scale: str = "stable",
    seed: int = 0,
) -> None:
    """Initialise every LoRA layer of ``model`` (freshly made by ``apply_lora``) with LoRA-GA.

    ``loss_fn(model, batch)`` returns the scalar loss of one batch; the authors average over 8 samples (their
    conf/init/gradient.yaml: batches of 1, 8 iterations), their PEFT example over 64 batches of 2.
    ``direction`` is one of ``DIRECTIONS`` and ``scale`` one of ``SCALES`` ("weight_svd" is the authors'
    "weightS"). ``seed`` fixes the randomised SVD (and the "random" direction).
    """
    if direction not in DIRECTIONS:
        raise InCAError(f"LoRA-GA direction {direction!r} is unknown; use one of {', '.join(DIRECTIONS)}")
    if scale not in SCALES:
        raise InCAError(f"LoRA-GA scale {scale!r} is unknown; use one of {', '.join(SCALES)}")
    if not gamma > 0:
        raise InCAError(f"LoRA-GA gamma must be positive, got {gamma!r}")
    layers = lora_layers(model)
    if not layers:
        raise InCAError("the model has no LoRA layers; call apply_lora(model) before init_lora_ga")
    for name, layer in layers.items():
        if layer.merged or layer.shifted or bool(layer.lora_B.any()):
            raise InCAError(f"LoRA layer {name!r} is not fresh (merged, trained or already initialised); "
                            f"init_lora_ga needs a model just made by apply_lora")
        if 2 * layer.rank > min(layer.in_features, layer.out_features):
            raise InCAError(f"LoRA-GA takes 2r = {2 * layer.rank} singular directions but {name!r} is "
                            f"{layer.out_features}x{layer.in_features}; use a smaller rank")
    grads = estimate_gradients(model, layers, batches, loss_fn)
    for name, layer in layers.items():
        A, B = _lora_ga_factors(grads.pop(name), layer, gamma, direction, scale, seed)
        _initialise(layer, A, B)
    logger.info("LoRA-GA initialised %d layers (direction %s, scale %s)", len(layers), direction, scale)
