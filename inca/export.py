"""ONNX export of inca's inference modules (:class:`~inca.inference.InCAClassifier`,
:class:`~inca.inference.MultiTaskInCA`, or any module ``images -> logits | {name: logits}``).

torch's ``torch.export``-based ONNX exporter (``torch.onnx.export(..., dynamo=True)``, which needs onnxscript)
traces the module once; the TorchScript exporter cannot (InCA's head count is read from a tensor shape). The
graph takes preprocessed images ``[batch, 3, H, W]`` under any batch size and returns one output per task
(``logits`` for a single classifier). A :class:`MultiTaskInCA` records each task's classes and the backbone's
preprocessing in the model's metadata (``inca:classes``, ``inca:preprocessing``: JSON strings).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from timm.layers import to_2tuple
from torch import Tensor, nn

from inca.errors import InCAError
from inca.io import atomic_write

__all__ = ["ONNX_INPUT", "export_onnx"]

logger = logging.getLogger(__name__)

ONNX_INPUT = "images"
SINGLE_OUTPUT = "logits"
# Weights above this go to ``<file>.data`` beside the graph: protobuf refuses a message of 2 GiB or more, and the
# graph itself needs room (inca's own margin).
SINGLE_FILE_BYTES = 2**31 - 2**27
# onnxscript's optimizer warns of every fold it skips (a ViT block's Split and LayerNormalization): nothing the
# user can act on, and the graph is correct without them.
FOLDING_LOGGER = "onnxscript.optimizer._constant_folding"


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_images: Tensor | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Export ``model`` (in eval mode) to the ONNX file ``path``; returns the output names.

    ``example_images``: a batch the trace runs on (default: two random images of the backbone's input size);
    the batch dimension stays dynamic whatever its size. ``metadata``: extra string entries of the model's
    metadata. Weights over about 2 GiB are written to ``path`` + ``.data`` beside the graph.
    """
    try:
        import onnx_ir
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise InCAError("ONNX export needs onnx and onnxscript: pip install 'inca[onnx]'") from None
    model.eval()
    images = _example(model) if example_images is None else example_images
    if images.dim() != 4:
        raise InCAError(f"example images must be a batch [B, C, H, W], got shape {tuple(images.shape)}")
    if len(images) < 2:  # torch.export specialises a batch of one to a fixed size
        images = images.expand(2, *images.shape[1:])
    images = images.to(next(model.parameters()).device)
    with torch.no_grad():
        outputs = model(images)
    names = list(outputs) if isinstance(outputs, Mapping) else [SINGLE_OUTPUT]
    with _quiet(FOLDING_LOGGER):
        program = torch.onnx.export(
            model, (images,), input_names=[ONNX_INPUT], output_names=names, dynamo=True, verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )  # fmt: skip
    program.model.metadata_props.update({**_inca_metadata(model), **(metadata or {})})
    initializers = program.model.graph.initializers.values()
    size = sum(value.const_value.nbytes for value in initializers if value.const_value is not None)
    path = Path(path)
    external = f"{path.name}.data" if size > SINGLE_FILE_BYTES else None
    atomic_write(path, lambda tmp: onnx_ir.save(program.model, tmp, external_data=external))
    logger.info("ONNX model with outputs %s written to %s%s", names, path, f" + {external}" if external else "")
    return names


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Only errors from logger ``name`` inside the block."""
    quieted = logging.getLogger(name)
    level = quieted.level
    quieted.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quieted.setLevel(level)


def _example(model: nn.Module) -> Tensor:
    """Two random images of the input size of ``model.backbone`` (a timm ViT)."""
    embed = getattr(getattr(model, "backbone", None), "patch_embed", None)
    if embed is None or getattr(embed, "img_size", None) is None:
        raise InCAError(f"{type(model).__name__} has no timm backbone of fixed input size; pass example_images")
    channels = embed.proj.in_channels
    return torch.randn(2, channels, *to_2tuple(embed.img_size), generator=torch.Generator().manual_seed(0))


def _inca_metadata(model: nn.Module) -> dict[str, str]:
    """What a user of the ONNX file needs besides the graph: each output's classes, the preprocessing."""
    metadata = {}
    tasks = getattr(model, "tasks", None)
    if tasks is not None:
        metadata["inca:classes"] = json.dumps({task: model.classes(task) for task in tasks})
    preprocessing = getattr(model, "preprocessing", None)
    if preprocessing is not None:
        metadata["inca:preprocessing"] = json.dumps(preprocessing)
    return metadata
