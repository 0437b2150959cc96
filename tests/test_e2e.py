"""The end-to-end training loop through the registry: what each method trains, selection on val, determinism."""

import numpy as np
import pytest
import torch

import inca.train.e2e as e2e
from inca.activations import ImageBatches, TensorBatches
from inca.adapters.lora import lora_layers
from inca.errors import InCAError
from inca.methods import RunConfig, train_e2e
from inca.tasks import SPLITS, Task
from inca.train.e2e import FitConfig, fit, trainable_copy
from tests.conftest import subset_task

SETTINGS = RunConfig(epochs=1, batch_size=16, seed=3, progress=False)
SIZES = {"train": 96, "val": 32, "test": 32}


@pytest.fixture(scope="module")
def small_task() -> Task:
    return subset_task("synth-shapes", SIZES)


def initial_model(backbone, task: Task, seed: int, pool: str | None = None) -> torch.nn.Module:
    """The copy a method starts from: the head is the first draw after seeding, as in train_e2e."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return trainable_copy(backbone, task.num_classes, pool)


def test_full_fine_tuning_changes_every_parameter(tiny_backbone, small_task):
    start = initial_model(tiny_backbone, small_task, SETTINGS.seed)
    model, result = train_e2e("full", tiny_backbone, small_task, {}, SETTINGS)
    before = dict(start.named_parameters())
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []
    assert all(p.requires_grad for p in model.parameters())
    assert result.steps == len(result.loss_curve) == SIZES["train"] // SETTINGS.batch_size
    assert 0.0 <= result.test_acc <= 1.0 and result.best_epoch == 1


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_linear_probe_changes_only_the_head(tiny_backbone, small_task, pool):
    start = initial_model(tiny_backbone, small_task, SETTINGS.seed, pool)
    model, result = train_e2e("linear", tiny_backbone, small_task, {"pool": pool}, SETTINGS)
    before = dict(start.named_parameters())
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {"head.weight", "head.bias"}
    assert model.global_pool == {"cls": "token", "mean": "avg"}[pool]
    # The head trained on features computed once scores the same through the whole model.
    logits = model.eval()(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, small_task.num_classes)
    assert result.steps == SIZES["train"] // SETTINGS.batch_size


def test_same_seed_same_result_other_seed_differs(tiny_backbone, small_task):
    runs = [train_e2e("lora", tiny_backbone, small_task, {}, SETTINGS) for _ in range(2)]
    (model_a, a), (model_b, b) = runs
    assert a.loss_curve == b.loss_curve and a.test_acc == b.test_acc and a.val_curve == b.val_curve
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), name
    _, c = train_e2e("lora", tiny_backbone, small_task, {}, RunConfig(epochs=1, batch_size=16, seed=4, progress=False))
    assert c.loss_curve != a.loss_curve


def test_lora_ga_initialises_from_the_gradient(tiny_backbone, small_task):
    model, result = train_e2e("lora-ga", tiny_backbone, small_task, {"rank": 2}, SETTINGS)
    layers = lora_layers(model)
    assert layers and all(layer.shifted and layer.rslora for layer in layers.values())
    assert np.isfinite(result.loss_curve).all()


def test_best_epoch_is_chosen_on_val_and_test_is_evaluated_once(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    data = TensorBatches({s: torch.randn(8, 4) for s in SPLITS}, {s: torch.randint(0, 3, (8,)) for s in SPLITS})
    scripted_val = iter([0.5, 0.8, 0.8, 0.6])  # the tie at epoch 3 keeps epoch 2
    calls, snapshots = [], []

    def fake_evaluate(module, batches, split, batch_size):
        calls.append(split)
        snapshots.append(module.weight.detach().clone())
        return next(scripted_val) if split == "val" else 0.25

    monkeypatch.setattr(e2e, "evaluate", fake_evaluate)
    result = fit(model, data, FitConfig(epochs=4, batch_size=4, lr=0.1, progress=False))
    assert calls == ["val"] * 4 + ["test"]
    assert result.best_epoch == 2 and result.val_acc == 0.8 and result.val_curve == [0.5, 0.8, 0.8, 0.6]
    assert torch.equal(snapshots[-1], snapshots[1])  # test saw epoch 2's weights
    assert not torch.equal(snapshots[-1], snapshots[3])
    assert result.test_acc == 0.25 and result.steps == 8


def test_bad_pool_is_an_error(tiny_backbone, small_task):
    with pytest.raises(InCAError, match="linear.pool: expected one of auto, cls, mean, got 'max'"):
        train_e2e("linear", tiny_backbone, small_task, {"pool": "max"}, SETTINGS)


def test_gradients_are_clipped_to_max_grad_norm(monkeypatch):
    clipped = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        clipped.append(max_norm)
        return clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    data = TensorBatches({s: torch.randn(8, 4) for s in SPLITS}, {s: torch.randint(0, 3, (8,)) for s in SPLITS})
    fit(torch.nn.Linear(4, 3), data, FitConfig(epochs=1, batch_size=4, max_grad_norm=0.5, progress=False))
    assert clipped == [0.5, 0.5]
    fit(torch.nn.Linear(4, 3), data, FitConfig(epochs=1, batch_size=4, max_grad_norm=0.0, progress=False))
    assert clipped == [0.5, 0.5]  # 0: no clipping
    with pytest.raises(InCAError, match="max_grad_norm"):
        fit(torch.nn.Linear(4, 3), data, FitConfig(max_grad_norm=-1.0, progress=False))


def test_augmentation_changes_training_views_only(tiny_backbone, small_task):
    data = ImageBatches(small_task, tiny_backbone, augment=True)
    batch = [np.arange(8)]
    torch.manual_seed(0)
    (first, _), (second, _) = (next(iter(data.loader("train", batch))) for _ in range(2))
    assert not torch.equal(first, second)
    (a, _), (b, _) = (next(iter(data.loader("val", batch))) for _ in range(2))
    plain = next(iter(ImageBatches(small_task, tiny_backbone).loader("val", batch)))[0]
    assert torch.equal(a, b) and torch.equal(a, plain)
