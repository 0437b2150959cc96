"""Bank training on in-memory activations: learns, resumes exactly, selects on validation only."""

import math

import numpy as np
import pytest
import torch

import inca.train.bank as bank_module
from inca.activations import LiveSource, TensorSource, open_source
from inca.adapters.inca import AdapterSpec, InCABank
from inca.errors import InCAError
from inca.train.bank import epoch_batches, evaluate_bank, evaluate_ensemble, select_best, top_adapters, train_bank
from inca.train.optim import cosine_schedule
from tests.conftest import subset_task

DIM, TOKENS, CLASSES = 32, 8, 4


def separable_source(n_train: int = 192, n_val: int = 96, seed: int = 0) -> TensorSource:
    """Layer 0 hides a class prototype in one random token among noise; layer 1 is pure noise."""
    return TensorSource(*separable_data(n_train, n_val, seed))


def separable_data(n_train: int, n_val: int, seed: int) -> tuple[dict, dict]:
    """The features and labels of :func:`separable_source`, by split."""
    g = torch.Generator().manual_seed(seed)
    prototypes = 3 * torch.randn(CLASSES, DIM, generator=g)

    def split(n: int) -> tuple[dict[int, torch.Tensor], np.ndarray]:
        y = torch.randint(0, CLASSES, (n,), generator=g)
        informative = torch.randn(n, TOKENS, DIM, generator=g)
        informative[torch.arange(n), torch.randint(0, TOKENS, (n,), generator=g)] += prototypes[y]
        noise = torch.randn(n, TOKENS, DIM, generator=g)
        return {0: informative.half(), 1: noise.half()}, y.numpy()  # fp16, like an activation cache

    (train, y_train), (val, y_val), (test, y_test) = split(n_train), split(n_val), split(n_val)
    return {"train": train, "val": val, "test": test}, {"train": y_train, "val": y_val, "test": y_test}


SPECS = [
    AdapterSpec(layer=1, num_heads=4, lr=3e-3),
    AdapterSpec(layer=0, num_heads=4, lr=3e-3, seed=1),
    AdapterSpec(layer=0, num_heads=2, num_queries=2, lr=1e-3, seed=2),
]


def test_train_bank_learns_a_separable_task_and_selects_on_validation():
    source = separable_source()
    bank = InCABank(SPECS, DIM, CLASSES)
    history = train_bank(bank, source, epochs=6, batch_size=32, eval_split="val", progress=False)
    assert len(history.train_loss) == 6 and len(history.val_accuracy) == 6
    assert history.train_loss[-1][1] < 0.5 * history.train_loss[0][1]
    best, accuracy = select_best(bank, source, split="val")
    assert best in (1, 2) and accuracy[best] >= 0.9
    assert accuracy[0] < 0.6  # the noise layer
    assert evaluate_bank(bank, source, "test")[best] >= 0.85
    with pytest.raises(InCAError, match="test split"):
        select_best(bank, source, split="test")


class Crash(RuntimeError):
    pass


class CrashingSource(TensorSource):
    """Dies in the middle of epoch ``epoch`` (0-based), like a killed run."""

    def __init__(self, source: TensorSource, epoch: int):
        self.__dict__.update(source.__dict__)
        self.calls, self.crash_at = 0, epoch

    def loader(self, split, batches):
        if split == "train":
            self.calls += 1
        for i, item in enumerate(super().loader(split, batches)):
            if split == "train" and self.calls == self.crash_at + 1 and i == 2:
                raise Crash
            yield item


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    source = separable_source(n_train=96, n_val=32)
    kwargs = dict(epochs=3, batch_size=16, seed=7, eval_split="val", progress=False)
    straight = InCABank(SPECS, DIM, CLASSES)
    expected = train_bank(straight, source, checkpoint_path=tmp_path / "a.safetensors", **kwargs)

    resumed = InCABank(SPECS, DIM, CLASSES)
    with pytest.raises(Crash):
        train_bank(resumed, CrashingSource(source, epoch=1), checkpoint_path=tmp_path / "b.safetensors", **kwargs)
    fresh = InCABank(SPECS, DIM, CLASSES)  # a new process: nothing kept but the checkpoint
    history = train_bank(fresh, source, checkpoint_path=tmp_path / "b.safetensors", **kwargs)
    assert history == expected
    for k, v in straight.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k

    # A checkpoint of another configuration (e.g. a run whose adapters all diverged, rerun with other settings)
    # never blocks: the new run starts from scratch and equals a run without any checkpoint.
    other = train_bank(InCABank(SPECS, DIM, CLASSES), source, checkpoint_path=tmp_path / "b.safetensors",
                       **kwargs | {"seed": 8})
    assert other == train_bank(InCABank(SPECS, DIM, CLASSES), source, **kwargs | {"seed": 8})


def test_non_finite_activations_are_reported_as_corrupt_data():
    features, labels = separable_data(n_train=32, n_val=16, seed=0)
    features["train"][0][3, 2, 5] = float("nan")
    source = TensorSource(features, labels)
    with pytest.raises(InCAError, match=r"layer\(s\) \[0\] hold NaN or infinity.*inca-cache --rebuild"):
        train_bank(InCABank(SPECS, DIM, CLASSES), source, epochs=1, batch_size=16, progress=False)


def test_select_best_skips_diverged_and_fails_when_all_diverged():
    source = separable_source(n_train=32, n_val=32)
    bank = InCABank(SPECS, DIM, CLASSES)
    train_bank(bank, source, epochs=2, batch_size=16, progress=False)
    bank.diverged[1:] = True
    best, accuracy = select_best(bank, source)
    assert best == 0 and math.isnan(accuracy[1]) and math.isnan(accuracy[2])
    bank.diverged[:] = True
    with pytest.raises(InCAError, match="all 3 adapters diverged"):
        select_best(bank, source)


def test_bad_labels_and_layers_are_one_line_errors():
    source = separable_source(n_train=16, n_val=8)
    with pytest.raises(InCAError, match="lacks layers"):
        train_bank(InCABank([AdapterSpec(layer=5, num_heads=2)], DIM, CLASSES), source, epochs=1, batch_size=4)
    with pytest.raises(InCAError, match="labels outside"):
        train_bank(InCABank([AdapterSpec(layer=0, num_heads=2)], DIM, 2), source, epochs=1, batch_size=4)


def test_epoch_batches_are_sorted_deterministic_permutations():
    batches = epoch_batches(50, 16, seed=3, epoch=2)
    assert [len(b) for b in batches] == [16, 16, 16, 2]
    assert all((np.diff(b) > 0).all() for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(50))
    assert all(np.array_equal(a, b) for a, b in zip(batches, epoch_batches(50, 16, seed=3, epoch=2)))
    assert not np.array_equal(np.concatenate(batches), np.concatenate(epoch_batches(50, 16, seed=3, epoch=3)))


def test_cosine_schedule_with_warmup():
    f = cosine_schedule(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == 1.0 and f(10) == 1.0
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_ensemble_accuracy_is_the_argmax_of_mean_probabilities_and_top_adapters_rank_by_val():
    source = separable_source()
    bank = InCABank(SPECS, DIM, CLASSES)
    train_bank(bank, source, epochs=2, batch_size=32, progress=False)
    inputs, _ = next(iter(source.loader("test", [np.arange(source.num_rows("test"))])))  # every row, in order
    features = {layer: inputs[layer] for layer in (0, 1)}
    with torch.no_grad():
        probabilities = bank(features)[[1, 2]].float().softmax(-1).mean(0)
    expected = (probabilities.argmax(-1).numpy() == source.labels("test")).mean()
    assert evaluate_ensemble(bank, source, [1, 2], "test", batch_size=40) == pytest.approx(expected)
    accuracy = torch.tensor([0.5, math.nan, 0.7, 0.5])
    assert top_adapters(accuracy, 3) == [2, 0, 3]
    assert top_adapters(accuracy, 9) == [2, 0, 3]


def scripted_evaluation(monkeypatch, script: list[list[float]]) -> list[dict[int, dict]]:
    """``evaluate_bank`` returns the next row of ``script`` and records each adapter's weights at that moment."""
    seen = []

    def fake(bank, source, split, batch_size=256):
        seen.append({i: {k: v.clone() for k, v in bank.adapter(i).state_dict().items()} for i in range(len(bank))})
        return torch.tensor(script.pop(0))

    monkeypatch.setattr(bank_module, "evaluate_bank", fake)
    return seen


def test_each_adapter_ends_at_its_best_validation_epoch_and_resume_keeps_it(monkeypatch, tmp_path):
    source = separable_source(n_train=64, n_val=16)
    script = [[0.5, 0.1, 0.5], [0.8, 0.2, 0.5], [0.6, 0.3, 0.4], [0.7, 0.4, math.nan]]
    kwargs = dict(epochs=4, batch_size=16, seed=1, eval_split="val", progress=False)
    seen = scripted_evaluation(monkeypatch, [row[:] for row in script])
    bank = InCABank(SPECS, DIM, CLASSES)
    history = train_bank(bank, source, **kwargs)
    assert history.best_epoch == [2, 4, 1]  # ties keep the earlier epoch; NaN never wins
    for i, epoch in enumerate(history.best_epoch):
        for k, v in bank.adapter(i).state_dict().items():
            assert torch.equal(v, seen[epoch - 1][i][k]), (i, k)

    # Killed after epoch 2, resumed in a fresh process: the same weights at the end.
    path = tmp_path / "ckpt.safetensors"
    scripted_evaluation(monkeypatch, [row[:] for row in script[:2]])
    with pytest.raises(Crash):
        train_bank(InCABank(SPECS, DIM, CLASSES), CrashingSource(source, epoch=2), checkpoint_path=path, **kwargs)
    scripted_evaluation(monkeypatch, [row[:] for row in script[2:]])
    resumed = InCABank(SPECS, DIM, CLASSES)
    assert repr(train_bank(resumed, source, checkpoint_path=path, **kwargs)) == repr(history)  # NaN != NaN
    for k, v in bank.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_augmented_training_streams_live_views_and_evaluation_does_not(tiny_backbone):
    task = subset_task("synth-shapes", {"train": 4, "val": 4, "test": 4})
    augment = tiny_backbone.train_transform
    source = open_source(tiny_backbone, task, [0], epochs=5, cache="always", train_transform=augment)
    assert isinstance(source, LiveSource)
    batch = [np.arange(4)]
    torch.manual_seed(0)
    (first, _), (second, _) = (next(iter(source.loader("train", batch))) for _ in range(2))
    assert not torch.equal(first[0], second[0])  # new views each time
    (a, _), (b, _) = (next(iter(source.loader("val", batch))) for _ in range(2))
    assert torch.equal(a[0], b[0])


def test_micro_batches_train_as_the_whole_batch():
    """What bank training falls back to when a batch runs out of CUDA memory: the same losses and weights, up to
    rounding, with unequal micro-batches (16 rows in 5) and a last batch of fewer rows than micro-batches."""
    source = separable_source(n_train=35, n_val=8)
    runs = []
    for micro_batches in (1, 5):
        bank = InCABank(SPECS, DIM, CLASSES)
        history = train_bank(bank, source, epochs=2, batch_size=16, micro_batches=micro_batches, progress=False)
        runs.append((history, bank.state_dict()))
    (whole, weights), (split, split_weights) = runs
    assert not any(split.diverged)
    np.testing.assert_allclose(split.train_loss, whole.train_loss, rtol=1e-5)
    for name, value in weights.items():
        torch.testing.assert_close(split_weights[name], value, rtol=1e-4, atol=1e-6, msg=name)
