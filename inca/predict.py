"""Classify image files with a saved InCA adapter and the backbone its metadata names."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from .adapters.inca import InCA, load_adapter
from .backbone import Backbone, create_backbone
from .errors import InCAError
from .tasks import Split, image_loader, sequential_batches
from .tasks.folder import FileSource


@dataclass
class Prediction:
    path: str
    labels: list[str]  # top-k class names, best first
    probabilities: list[float]


@dataclass
class Predictor:
    adapter: InCA
    backbone: Backbone
    layer: int
    classes: list[str]

    def predict(self, paths: Sequence[str], top_k: int = 1, batch_size: int = 64) -> list[Prediction]:
        files = expand_images(paths)
        split = Split(FileSource(files), np.arange(len(files)), np.zeros(len(files), dtype=np.int64))
        return list(self._predict(split, files, top_k, batch_size))

    def _predict(self, split: Split, files: list[str], top_k: int, batch_size: int) -> Iterator[Prediction]:
        top_k = max(1, min(top_k, len(self.classes)))
        self.adapter.to(self.backbone.device).eval()
        batches = sequential_batches(0, len(split), batch_size)
        for rows, (images, _) in zip(batches, image_loader(split, self.backbone.transform, batches)):
            tokens = self.backbone.extract(images, [self.layer])[self.layer].float()
            with torch.inference_mode():
                probs = self.adapter(tokens).softmax(-1)
            values, indices = probs.topk(top_k, dim=-1)
            for row, vals, idx in zip(rows, values.tolist(), indices.tolist()):
                yield Prediction(files[row], [self.classes[i] for i in idx], vals)


def load_predictor(
    adapter_dir: str | os.PathLike, weights: str | None = None, device: str | torch.device = "cpu"
) -> Predictor:
    """The adapter plus its backbone (``weights`` overrides the recorded ones; they must be the same)."""
    adapter, metadata = load_adapter(adapter_dir)
    recorded = metadata.get("backbone")
    if not isinstance(recorded, dict) or "name" not in recorded:
        raise InCAError(f"{adapter_dir} does not record its backbone; it was not saved by inca-train")
    backbone = create_backbone(recorded["name"], weights or recorded["weights"], recorded["model_kwargs"], device)
    check_adapter_fits(adapter, metadata, backbone)
    return Predictor(adapter, backbone, int(metadata["layer"]), list(metadata["classes"]))


def check_adapter_fits(adapter: InCA, metadata: dict, backbone: Backbone) -> None:
    """Refuse an adapter trained on another backbone: width, depth or weights that differ."""
    if adapter.dim != backbone.width:
        raise InCAError(
            f"the adapter reads width {adapter.dim} but {backbone.name} has width {backbone.width}: "
            "use the backbone it was trained on"
        )
    if not 0 <= int(metadata["layer"]) < backbone.num_blocks:
        raise InCAError(f"the adapter reads layer {metadata['layer']}; {backbone.name} has {backbone.num_blocks}")
    recorded = metadata["backbone"].get("weights_hash")
    if recorded and recorded != backbone.weights_hash:
        raise InCAError(
            f"the adapter was trained on {metadata['backbone']['name']} with other weights "
            f"(hash {recorded}, these are {backbone.weights_hash}): pass the --weights it was trained with"
        )


def expand_images(paths: Sequence[str]) -> list[str]:
    """Image files given directly or found (recursively, sorted) in given directories."""
    files: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS))
        elif path.is_file():
            files.append(str(path))
        else:
            raise InCAError(f"image {path} does not exist")
    if not files:
        raise InCAError(f"no images found in {', '.join(map(str, paths))} (extensions: {', '.join(IMG_EXTENSIONS)})")
    return files


__all__ = ["Prediction", "Predictor", "check_adapter_fits", "expand_images", "load_predictor"]
