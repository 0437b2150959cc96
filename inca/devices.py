"""Devices and mixed precision: one rule for every model that runs on the backbone's activations."""

from __future__ import annotations

import contextlib

import torch

from .errors import InCAError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; an explicit CUDA device without CUDA is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InCAError(f"--device {device} was asked for but CUDA is not available: use --device cpu or auto")
    return torch.device(device)


def autocast(device: str | torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing elsewhere, so CPU runs stay exact fp32 (and match cached activations)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
