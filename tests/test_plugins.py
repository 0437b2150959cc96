"""Another package extends inca through entry points: a task source, a method and a probe, installed with pip
from a temporary directory, seen by ``inca-train``, ``inca-compare`` and ``inca-probe`` without editing inca."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import TINY_ARGS

pytestmark = pytest.mark.slow

PLUGIN = '''
"""inca extras: a ``stripes:K`` task source, the ``bitfit`` method and the ``centroid`` probe."""

from dataclasses import dataclass

import numpy as np

from inca import options as opt
from inca.config import hparam
from inca.errors import InCAError
from inca.methods import TrainConfig, register_method
from inca.probes import ProbeConfig, register_probe
from inca.tasks import register_task_source
from inca.tasks.base import ArraySource, Split, Task, make_splits
from inca.tasks.registry import TaskLoadConfig


@dataclass(frozen=True, kw_only=True)
class StripesConfig(TaskLoadConfig):
    width: int = hparam(2, help="stripe width in pixels", source="this plugin's own", check=opt.positive_int)


def load_stripes(spec, argument, settings):
    """K classes: stripes at K angles, in noise."""
    classes = int(argument)
    labels = np.arange(24 * classes) % classes
    rng = np.random.default_rng(settings.split_seed)
    y, x = np.mgrid[0:16, 0:16]
    images = []
    for label in labels:
        angle = np.pi * label / classes
        phase = (x * np.cos(angle) + y * np.sin(angle)) // settings.width
        images.append(np.clip(80 + 120 * (phase % 2) + rng.normal(0, 20, (16, 16)), 0, 255))
    split = Split(ArraySource(np.stack(images).astype(np.uint8), spec), np.arange(len(labels)), labels)
    return Task(spec, [f"angle{k}" for k in range(classes)], make_splits({"train": split}, seed=settings.split_seed),
                {"width": settings.width, "seed": settings.split_seed})


def check_stripes(spec, argument, settings):
    if not argument.isdigit() or int(argument) < 2:
        raise InCAError(f"give stripes:K with K >= 2, not {spec}")


register_task_source("stripes:", load=load_stripes, check=check_stripes, spec_form="stripes:K",
                     summary="stripes at K angles in noise", config=StripesConfig)


@dataclass(frozen=True, kw_only=True)
class BitFitConfig(TrainConfig):
    lr: float = hparam(1e-3, source="Zaken et al. 2022 (BitFit), Section 3")


def apply(model, config, context):
    from inca.adapters.common import head_parameters, set_trainable

    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    set_trainable(model, {id(p): p for p in biases + head_parameters(model)}.values())


def save(model, directory):
    from inca.adapters.common import named_tensors, write_adapter

    trained = [p for p in model.parameters() if p.requires_grad]
    write_adapter(directory, {"method": "bitfit"}, named_tensors(model, trained))


def load(model, directory):
    from inca.adapters.common import load_tensors, named_tensors, read_adapter

    _, tensors = read_adapter(directory, "bitfit")
    load_tensors(model, tensors, {k: v for k, v in named_tensors(model, model.parameters()).items() if k in tensors})


register_method("bitfit", BitFitConfig, "BitFit (Zaken et al., 2022): biases and the head train",
                apply=apply, save=save, load=load)


@dataclass(frozen=True, kw_only=True)
class CentroidConfig(ProbeConfig):
    shrink: float = hparam(0.0, help="pull class means toward the global mean", source="this plugin's own",
                           check=opt.non_negative_float)


def fit(features, labels, num_classes, config, run):
    """Nearest class mean (Mensink et al. 2013) on each layer's pooled features."""
    scores = {}
    for layer, train in features["train"].items():
        means = np.stack([train[labels["train"] == c].mean(0) for c in range(num_classes)])
        means = (1 - config.shrink) * means + config.shrink * train.mean(0)
        scores[layer] = {split: float((((features[split][layer][:, None] - means) ** 2).sum(-1).argmin(1)
                                       == labels[split]).mean()) for split in ("val", "test")}
    return scores


register_probe("centroid", CentroidConfig, "nearest class mean on pooled features", fit=fit, reads="pooled")
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The plugin package installed by pip (no network, no build isolation) into a directory of its own."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "inca_extras.py").write_text(PLUGIN, encoding="utf-8")
    (root / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "inca-extras"
        version = "0.1"

        [project.entry-points."inca.task_sources"]
        stripes = "inca_extras"
        [project.entry-points."inca.methods"]
        bitfit = "inca_extras"
        [project.entry-points."inca.probes"]
        centroid = "inca_extras"

        [tool.setuptools]
        py-modules = ["inca_extras"]
    """), encoding="utf-8")
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(root)], check=True, timeout=300)
    return site


def inca(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-m", "inca", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_an_installed_package_extends_every_command(plugin_site, tmp_path):
    help_text = inca(plugin_site, "train", "--help").stdout
    assert "stripes:K" in help_text and "--stripes-width" in help_text
    assert "bitfit" in inca(plugin_site, "compare", "--help").stdout
    probe_help = inca(plugin_site, "probe", "--help").stdout
    assert "centroid" in probe_help and "--centroid-shrink" in probe_help

    common = [*TINY_ARGS, "--tasks", "stripes:3", "--stripes-width", "3", "-q"]
    train = inca(plugin_site, "train", *common, "--layers", "-1", "--epochs", "2", "--out", str(tmp_path / "train"),
                 "--cache-dir", str(tmp_path / "cache"))
    assert train.returncode == 0, train.stderr
    results = json.loads((tmp_path / "train" / "results.json").read_text())
    (task,) = results["tasks"].values()
    assert task["classes"] == ["angle0", "angle1", "angle2"] and task["test_acc"] is not None

    compare = inca(plugin_site, "compare", *common, "--methods", "bitfit,linear", "--epochs", "1",
                   "--method-args", "bitfit.lr=0.01", "--out", str(tmp_path / "compare"))
    assert compare.returncode == 0, compare.stderr
    records = json.loads((tmp_path / "compare" / "compare.json").read_text())["results"]
    bitfit = next(r for r in records if r["method"] == "bitfit")
    assert bitfit["hparams"]["lr"] == 0.01 and bitfit["trainable_params"] > 0

    probe = inca(plugin_site, "probe", *common, "--probes", "centroid,linear", "--centroid-shrink", "0.5",
                 "--pool", "mean", "--layers", "0,-1", "--out", str(tmp_path / "probe"))
    assert probe.returncode == 0, probe.stderr
    report = json.loads((tmp_path / "probe" / "probe.json").read_text())
    (result,) = report["tasks"].values()
    assert set(result["results"]) == {"centroid/mean", "linear/mean"} and report["config"]["centroid_shrink"] == 0.5

    typo = inca(plugin_site, "train", *TINY_ARGS, "--tasks", "stripes:one", "--out", str(tmp_path / "typo"))
    assert typo.returncode == 2 and "stripes:K" in typo.stderr and len(typo.stderr.strip().splitlines()) == 1


def test_a_broken_plugin_is_one_line(tmp_path):
    """A package whose entry point fails to import names itself in one line, exit 2."""
    site = tmp_path / "site"
    info = site / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[inca.methods]\nbroken = broken_plugin\n")
    (site / "broken_plugin.py").write_text("raise ImportError('needs a library that is not installed')\n")
    result = inca(site, "compare", *TINY_ARGS, "--tasks", "digits", "--methods", "linear", "--out", str(tmp_path / "o"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("inca-compare: error: method plugin 'broken'") and "broken_plugin" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
