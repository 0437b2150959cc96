"""Learning-rate schedules: every value against a closed form and Hugging Face's own schedules, each method's
default with its source, and the schedule reaching both trainers (end-to-end and the InCA bank)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import inca.train.bank as bank_module
from inca.activations import TensorSource
from inca.adapters.inca import AdapterSpec, InCABank
from inca.errors import InCAError
from inca.methods import METHODS, RunConfig, get_method
from inca.methods.run import _fit_config
from inca.train.config import SCHEDULES, InCATrainConfig
from inca.train.e2e import FitConfig, _optimisation
from inca.train.optim import lr_schedule

TOTAL, WARMUP = 20, 4


def reference(schedule: str, step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Written from the definitions, not from inca's code: warm-up (step + 1) / warmup, then a cosine, a straight
    line or a constant from 1 toward min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    remaining = (total - step) / (total - warmup)  # 1 at the end of the warm-up, 0 at the last step
    shape = {"cosine": (1 - math.cos(math.pi * max(remaining, 0.0))) / 2, "linear": max(remaining, 0.0),
             "constant": 1.0}[schedule]
    return shape if schedule == "constant" else min_ratio + (1 - min_ratio) * shape


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_each_schedule_matches_its_closed_form(schedule, min_ratio):
    multiplier = lr_schedule(schedule, TOTAL, WARMUP, min_ratio)
    assert [multiplier(s) for s in range(TOTAL + 3)] == pytest.approx(
        [reference(schedule, s, TOTAL, WARMUP, min_ratio) for s in range(TOTAL + 3)], abs=1e-12)


def test_hand_computed_values():
    linear, cosine, constant = (lr_schedule(name, 10, 2) for name in ("linear", "cosine", "constant"))
    assert [linear(s) for s in range(11)] == pytest.approx([0.5, 1, 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0])
    assert [cosine(s) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.5, 1, 1, 0.5, 0])
    assert cosine(4) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert [constant(s) for s in range(11)] == pytest.approx([0.5] + [1.0] * 10)
    assert lr_schedule("linear", 10, 0)(0) == 1.0  # no warm-up: the first update at the full rate


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_after_the_warm_up_each_schedule_is_hugging_faces(schedule):
    """transformers' get_*_schedule_with_warmup through torch's LambdaLR: the same multipliers after the warm-up;
    during it, inca's update s takes the value theirs gives update s + 1 (no zero-lr first update)."""
    transformers = pytest.importorskip("transformers")
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    hf = {"cosine": transformers.get_cosine_schedule_with_warmup,
          "linear": transformers.get_linear_schedule_with_warmup}.get(schedule)
    if hf is None:
        scheduler = transformers.get_constant_schedule_with_warmup(optimizer, WARMUP)
    else:
        scheduler = hf(optimizer, WARMUP, TOTAL)
    theirs = [scheduler.lr_lambdas[0](s) for s in range(TOTAL + 1)]
    ours = lr_schedule(schedule, TOTAL, WARMUP)
    assert [ours(s) for s in range(WARMUP, TOTAL + 1)] == pytest.approx(theirs[WARMUP:], abs=1e-12)
    assert [ours(s) for s in range(WARMUP)] == pytest.approx(theirs[1:WARMUP + 1], abs=1e-12)


def test_every_method_has_a_sourced_schedule_and_the_authors_defaults():
    expected = {"lora": "linear", "compacter": "linear", "compacter++": "linear", "lora-ga": "cosine",
                "full": "cosine", "linear": "cosine", "inca": "cosine"}
    for name, method in METHODS.items():
        if name in expected:
            assert method.config.default("schedule") == expected[name], name
            assert method.config.field_source("schedule"), name
    assert "microsoft/LoRA" in METHODS["lora"].config.field_source("schedule")
    assert "rabeehk/compacter" in METHODS["compacter"].config.field_source("schedule")
    assert "Outsider565/LoRA-GA" in METHODS["lora-ga"].config.field_source("schedule")
    assert "Outsider565/LoRA-GA" in METHODS["full"].config.field_source("schedule")


def test_a_bad_schedule_is_one_line():
    for name in ("lora", "inca"):
        with pytest.raises(InCAError, match=r"^[^\n]*expected one of cosine, linear, constant, got 'cosin'$"):
            get_method(name).make_config({"schedule": "cosin"})
    with pytest.raises(InCAError, match="cosine, linear, constant"):
        InCATrainConfig(schedule="step")
    with pytest.raises(InCAError, match="unknown learning-rate schedule 'step'"):
        lr_schedule("step", 10)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_end_to_end_trainer_follows_the_methods_schedule(schedule):
    config = _fit_config(get_method("lora").make_config({"schedule": schedule}), RunConfig(epochs=1), "lora")
    assert config.schedule == schedule
    model = nn.Linear(3, 2)
    params = list(model.parameters())
    optimizer, scheduler = _optimisation(model, params, FitConfig(lr=0.5, warmup_ratio=0.2, schedule=schedule), 10)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.5 * reference(schedule, s, 10, 2) for s in range(10)])


def test_the_bank_trains_with_its_schedule_and_inca_train_records_it_only_when_not_cosine(monkeypatch):
    scales = []
    step = bank_module.BatchedAdamW.step
    monkeypatch.setattr(bank_module.BatchedAdamW, "step",
                        lambda self, lr_scale=1.0, frozen=None: (scales.append(lr_scale), step(self, lr_scale, frozen)))
    g = torch.Generator().manual_seed(0)
    source = TensorSource({s: {0: torch.randn(16, 4, 8, generator=g)} for s in ("train", "val")},
                          {s: np.arange(16) % 2 for s in ("train", "val")})
    bank = InCABank([AdapterSpec(layer=0, num_heads=2)], 8, 2)
    bank_module.train_bank(bank, source, epochs=2, batch_size=4, warmup_ratio=0.25, schedule="linear", progress=False)
    assert scales == pytest.approx([reference("linear", s, 8, 2) for s in range(8)])
    recorded = InCATrainConfig.recorded
    assert "schedule" not in recorded(InCATrainConfig().to_dict())  # the configuration earlier reports recorded
    assert recorded(InCATrainConfig(schedule="linear").to_dict())["schedule"] == "linear"
