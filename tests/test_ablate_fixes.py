"""tools/ablate_fixes.py: every revert is one a user could run (valid flags), reinstates the old behaviour,
and leaves the library as it was afterwards."""

import numpy as np
import pytest
import torch
from torch import nn

import inca.adapters.compacter as compacter
import inca.probes.knn as probe
import inca.train.bank as bank
from inca.adapters.inca import AdapterSpec, InCABank
from inca.adapters.lora import LoRALinear
from inca.cli import compare_parser
from inca.errors import InCAError
from inca.methods import METHODS, resolve_methods
from tests.conftest import load_tool


@pytest.fixture(scope="module")
def ablate():
    return load_tool("ablate_fixes")


def test_every_fix_reverts_through_valid_flags_and_names_real_methods(ablate):
    for fix in [*ablate.FIXES, ablate.EVERY_FIX]:
        assert set(fix.methods) <= set(METHODS), fix.name
        assert fix.method_args or fix.flags or fix.code, f"{fix.name} reverts nothing"
        resolved = resolve_methods(fix.methods, fix.method_args)  # unknown keys or bad values raise
        for arg in fix.method_args:
            target, value = arg.split("=")
            method, key = target.split(".")
            assert str(resolved[method][key]) in {value, str(float(value))}
        compare_parser().parse_args([*fix.flags, "--methods", ",".join(fix.methods)])


def test_old_code_is_reinstated_for_the_run_only(ablate):
    originals = (compacter.FACTOR_INIT_GAIN, compacter.CompacterAdapter.__init__, compacter.bottleneck_width,
                 bank.BestEpochs, probe.knn_predict, ablate.lora_ga.estimate_gradients)
    rule = torch.ones(4, 1, 1)
    with ablate.compacter_plain_xavier_exact_gelu():
        assert compacter.FACTOR_INIT_GAIN == 1.0
        assert compacter.CompacterAdapter(192, 32, rule, 1).act.approximate == "none"
    assert compacter.CompacterAdapter(192, 32, rule, 1).act.approximate == "tanh"
    with ablate.compacter_strict_bottleneck(), pytest.raises(InCAError, match="not a positive multiple"):
        compacter.bottleneck_width(192, 32, 4)
    assert compacter.bottleneck_width(192, 32, 4) == 8

    adapters = InCABank([AdapterSpec(layer=0, num_heads=2), AdapterSpec(layer=1, num_heads=2)], 8, 3)
    with ablate.inca_last_epoch():
        tracker = bank.BestEpochs(adapters)
        tracker.improved([0.9, 0.5], 1)
        assert tracker.improved([0.1, 0.6], 2) == [0, 1] and tracker.epoch == [2, 2]  # last epoch, worse or not
    tracker = bank.BestEpochs(adapters)
    tracker.improved([0.9, 0.5], 1)
    assert tracker.improved([0.1, 0.6], 2) == [1] and tracker.epoch == [1, 2]

    modes = []
    model = nn.Sequential(nn.Linear(2, 2), nn.Identity())  # records the mode the estimate runs in
    model[1].register_forward_hook(lambda module, *_: modes.append(module.training))
    layers = {"0": LoRALinear(model[0], rank=1, alpha=1.0)}
    model[0] = layers["0"]
    batches = [torch.ones(1, 2)]
    with ablate.lora_ga_gradient_in_eval_mode():
        ablate.lora_ga.estimate_gradients(model.train(), layers, batches, lambda m, x: m(x).sum())
    ablate.lora_ga.estimate_gradients(model.eval(), layers, batches, lambda m, x: m(x).sum())
    assert modes == [False, True] and not model.training and "train" not in vars(model)
    features = np.ones((4, 3), dtype=np.float32)
    with ablate.knn_in_place():
        probe.knn_predict(features, np.zeros(4, dtype=np.int64), features[:2].copy(), 2, 2, 0.07)
    assert np.allclose(np.linalg.norm(features, axis=1), 1)  # the old bug: the caller's features normalised
    features = np.ones((4, 3), dtype=np.float32)
    probe.knn_predict(features, np.zeros(4, dtype=np.int64), features[:2].copy(), 2, 2, 0.07)
    assert np.all(features == 1)
    assert originals == (compacter.FACTOR_INIT_GAIN, compacter.CompacterAdapter.__init__, compacter.bottleneck_width,
                         bank.BestEpochs, probe.knn_predict, ablate.lora_ga.estimate_gradients)
