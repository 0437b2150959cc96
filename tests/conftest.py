"""Shared fixtures: tiny random-weight ViTs built through timm, offline hub settings."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TINY_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 4}
TINY_ARGS = ["--backbone", "vit_tiny_patch16_224", "--weights", "random",
             "--model-kwargs", "img_size=32", "patch_size=8", "depth=4"]


def pytest_configure(config) -> None:
    """Under pytest-xdist, one thread per worker (``-n auto`` starts one worker per core), and the commands a
    test starts inherit it; an explicit ``OMP_NUM_THREADS`` wins."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def subset_task(spec: str, sizes: dict[str, int]):
    """The first ``sizes[split]`` rows of each split of task ``spec``: a task small enough for a test."""
    import numpy as np

    from inca.tasks import Task, load_task

    task = load_task(spec)
    splits = {name: task.splits[name].subset(np.arange(n)) for name, n in sizes.items()}
    return Task(task.spec, task.classes, splits, task.identity)


def load_tool(name: str):
    """``tools/<name>.py`` as a module: the tools are scripts, not a package. Registered in sys.modules (a
    dataclass resolves its annotations through its module)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_backbone():
    from inca.backbone import create_backbone

    return create_backbone("vit_tiny_patch16_224", "random", TINY_KWARGS)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.cache/inca from tests (nor put a cache inside a test's own data folder)."""
    monkeypatch.setenv("INCA_CACHE", str(tmp_path_factory.mktemp("inca-cache")))


# Tensors shared by the adapter tests.


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere, LayerNorm affines included (identity LNs would hide fold errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            elif p.dim() == 1 or name.endswith("query"):
                p.copy_(0.3 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return module


def tokens(b: int, t: int, d: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Per-token offsets and scales, as in real ViT activations: standardisation must matter.
    z = torch.randn(b, t, d, generator=g) * (0.5 + torch.rand(b, t, 1, generator=g) * 3)
    return (z + torch.randn(b, t, 1, generator=g)).to(dtype)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= tol * max(scale, 1e-12), f"max error {err:.3g} vs scale {scale:.3g}"
