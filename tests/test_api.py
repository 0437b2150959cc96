"""The workflow API (inca.probe_task, probe_suite, train_suite, predict): what the commands run, from Python."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import inca
from inca.errors import InCAError

from .conftest import subset_task

SIZES = {"train": 60, "val": 30, "test": 30}


def test_the_workflow_is_exported_documented_and_light():
    code = ("import sys, inca, inca.prediction; names = [inca.probe_task, inca.probe_suite, inca.predict]; "
            "print(sorted({'probe_task', 'probe_suite', 'train_suite', 'predict'} - set(inca.__all__)), "
            "'torch' in sys.modules, 'matplotlib' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    # all exported; reaching them, or the prediction module (torch only once it predicts), imports no torch or plots
    assert result.stdout.split() == ["[]", "False", "False"]
    from inca import api

    assert all(len(getattr(api, name).__doc__) > 200 for name in api.__all__)


def test_no_exported_name_is_also_a_submodule():
    """Python binds a package's attribute to a submodule once it is imported, so an exported function named like a
    submodule would turn into that module: no name may be both, and importing every module changes no export."""
    import importlib
    import pkgutil

    from inca import api

    submodules = {m.name for m in pkgutil.iter_modules(inca.__path__)}
    assert not submodules & set(inca.__all__)
    for name in ("training", "prediction", "probe", "compare"):
        importlib.import_module(f"inca.{name}")
    assert all(getattr(inca, name) is getattr(api, name) for name in api.__all__)


def test_probe_task_is_the_command_s_probe(tiny_backbone):
    from inca.probe import probe_task
    from inca.probes import ProbeSuiteConfig

    task = subset_task("synth-count", SIZES)
    ours = inca.probe_task(tiny_backbone, task, layers=[1, 3], probes=["knn"], k=5)
    reference = probe_task(tiny_backbone, task, [1, 3], ProbeSuiteConfig(probes=["knn"], k=5))
    assert ours["results"] == reference["results"] and ours["rankings"] == reference["rankings"]
    with pytest.raises(InCAError, match="did you mean k"):
        inca.probe_task(tiny_backbone, task, kk=5)


def test_probe_train_predict_from_python(tiny_backbone, tmp_path):
    """The workflow end to end through the API, against the library functions the commands call."""
    from inca.inference import MultiTaskInCA
    from inca.prediction import predict_images

    tasks = [subset_task(spec, SIZES) for spec in ("synth-count", "synth-colour")]
    probed = inca.probe_suite(tiny_backbone, tasks, tmp_path / "probe", layers="all", probes=["knn"])
    assert probed == json.loads((tmp_path / "probe" / "probe.json").read_text())
    trained = inca.train_suite(tiny_backbone, tasks, tmp_path / "train", layers="best:1",
                               probe_report=tmp_path / "probe" / "probe.json", rank_by="knn", epochs=1, lr=[3e-3])
    assert trained == json.loads((tmp_path / "train" / "results.json").read_text())
    for task in tasks:
        result = trained["tasks"][task.spec]
        assert [result["best"]["layer"]] == probed["tasks"][task.spec]["rankings"]["knn"]["ranking"][:1]
    images = []
    for k in range(3):
        images.append(tmp_path / f"image{k}.png")
        tasks[1].splits["test"].image(k).save(images[-1])
    rows = inca.predict(tmp_path / "train", images, top_k=2, device="cpu")
    served = [str(tmp_path / "train" / r["serve_dir"]) for r in trained["tasks"].values()]
    expected = list(predict_images(MultiTaskInCA.from_saved(served), [str(p) for p in images], 2))
    assert rows == expected and all(set(r.labels) == {"synth-count", "synth-colour"} for r in rows)
    with pytest.raises(InCAError, match="no task"):  # a task the report lacks: refused before any training
        inca.train_suite(tiny_backbone, ["digits"], tmp_path / "other", layers="best:1",
                         probe_report=tmp_path / "probe" / "probe.json", rank_by="knn")
    assert not (tmp_path / "other").exists()
