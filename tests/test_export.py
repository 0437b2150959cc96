"""ONNX export: an InCAClassifier and a two-task MultiTaskInCA (through ``inca-predict --export-onnx``) run in
onnxruntime on a batch of another size than the trace's and give PyTorch's logits."""

import json

import pytest
import torch

from inca import InCA, InCAClassifier, MultiTaskInCA, TaskAdapter, save_adapter
from inca.cli import predict_main
from inca.export import ONNX_INPUT, export_onnx

from .conftest import randomise

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def batch(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))


def run_onnx(path, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    outputs = session.run(names, {ONNX_INPUT: images.numpy()})
    return dict(zip(names, map(torch.from_numpy, outputs))), session.get_modelmeta().custom_metadata_map


def test_classifier_exports_with_a_dynamic_batch(tmp_path, tiny_backbone, monkeypatch):
    monkeypatch.setattr("inca.export.SINGLE_FILE_BYTES", 0)  # weights beside the graph, as a large model's are
    model = InCAClassifier(tiny_backbone, layer=2, adapter=randomise(InCA(tiny_backbone.width, 5, num_heads=3)))
    assert export_onnx(model, tmp_path / "classifier.onnx", batch(1)) == ["logits"]  # traced on one image
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier.onnx", "classifier.onnx.data"]
    x = batch(5)
    outputs, _ = run_onnx(tmp_path / "classifier.onnx", x)
    with torch.no_grad():
        torch.testing.assert_close(outputs["logits"], model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_predict_exports_every_task_as_one_model(tmp_path, tiny_backbone):
    classes = {"digits": list("abc"), "shapes": list("wxyz")}
    members = {"digits": ([1], 1), "shapes": ([3, 2], 2)}  # one adapter; an ensemble of two layers
    for task, (layers, seed) in members.items():
        adapters = [randomise(InCA(tiny_backbone.width, len(classes[task]), 3), seed=seed + layer) for layer in layers]
        metadata = {"backbone": tiny_backbone.describe(), "task": task}
        save_adapter(TaskAdapter(adapters, layers, classes[task], metadata), tmp_path / task)
    file = tmp_path / "tasks.onnx"
    assert predict_main(["--adapter", str(tmp_path / "digits"), "--adapter", str(tmp_path / "shapes"),
                         "--device", "cpu", "--export-onnx", str(file)]) == 0  # traced on two images
    x = batch(3)
    outputs, metadata = run_onnx(file, x)
    model = MultiTaskInCA.from_saved([tmp_path / "digits", tmp_path / "shapes"])
    with torch.no_grad():
        expected = model(x)
    assert list(outputs) == ["digits", "shapes"]
    for task in classes:
        torch.testing.assert_close(outputs[task], expected[task], atol=1e-4, rtol=1e-4)
    assert json.loads(metadata["inca:classes"]) == classes
    assert json.loads(metadata["inca:preprocessing"]) == tiny_backbone.preprocessing
