"""Shared fixtures: tiny random-weight ViTs built through timm, offline hub settings."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TINY_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 4}
TINY_ARGS = ["--backbone", "vit_tiny_patch16_224", "--weights", "random",
             "--model-kwargs", "img_size=32", "patch_size=8", "depth=4"]


@pytest.fixture(scope="session")
def tiny_backbone():
    from inca.backbone import create_backbone

    return create_backbone("vit_tiny_patch16_224", "random", TINY_KWARGS)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache/inca from tests."""
    monkeypatch.setenv("INCA_CACHE", str(tmp_path / "inca-cache"))
