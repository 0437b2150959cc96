"""Devices and mixed precision: one rule for every model that runs on the backbone's activations."""

from __future__ import annotations

import contextlib

import torch

from .distributed import launched
from .errors import InCAError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; an explicit CUDA device without CUDA is a user error. Under
    ``torchrun``, ``auto`` and ``cuda`` mean this process's GPU (its local rank's)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InCAError(f"--device {device} was asked for but CUDA is not available: use --device cpu or auto")
    _check_available(device)
    if device in ("auto", "cuda"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        world = launched()
        return torch.device("cuda", world.local_rank % torch.cuda.device_count()) if world.is_distributed \
            else torch.device("cuda")
    return torch.device(device)


def _check_available(device: str) -> None:
    """An explicit MPS device, or a CUDA index beyond the GPUs there are, is refused before any model moves."""
    if device == "mps" and not torch.backends.mps.is_available():
        raise InCAError("--device mps was asked for but MPS (Apple GPUs) is not available: use --device cpu or auto")
    index = device.partition(":")[2]
    if device.startswith("cuda:") and int(index) >= torch.cuda.device_count():
        raise InCAError(f"--device {device} was asked for but this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1}): use one of them or auto")


def autocast(device: str | torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing elsewhere, so CPU runs stay exact fp32 (and match cached activations)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
