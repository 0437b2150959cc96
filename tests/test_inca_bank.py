"""InCABank equals E separate InCA modules; per-adapter AdamW; divergence isolation."""

import numpy as np
import pytest
import torch

from inca.activations import TensorSource
from inca.adapters.inca import (
    AdapterSpec,
    InCA,
    InCABank,
    join_qkv,
    split_qkv,
    uses_weight_decay,
)
from inca.adapters.saved import TaskAdapter, load_adapter, save_adapter
from inca.errors import InCAError
from inca.train.bank import train_bank
from inca.train.optim import BatchedAdamW
from tests.conftest import assert_rel, randomise, tokens

DIM, CLASSES = 32, 5
# Interleaved layers and shapes: three stacks, two layers, output order != stack order.
SPECS = [
    AdapterSpec(layer=3, num_heads=4, seed=0, lr=1e-3),
    AdapterSpec(layer=1, num_heads=2, num_queries=3, seed=1, lr=3e-3, weight_decay=0.0),
    AdapterSpec(layer=1, num_heads=4, seed=2, lr=1e-2, weight_decay=0.1),
    AdapterSpec(layer=3, num_heads=2, num_queries=3, seed=3),
    AdapterSpec(layer=1, num_heads=4, num_queries=2, mlp_ratio=2.0, seed=4, lr=2e-3),
    AdapterSpec(layer=3, num_heads=4, seed=5, lr=1e-2, weight_decay=0.1),
]


def features(b: int = 4, t: int = 9) -> dict[int, torch.Tensor]:
    return {1: tokens(b, t, DIM, seed=10), 3: tokens(b, t, DIM, seed=11)}


def make_bank(specs=SPECS) -> InCABank:
    return randomise(InCABank(specs, DIM, CLASSES))


def test_initial_weights_equal_separately_built_adapters():
    bank = InCABank(SPECS, DIM, CLASSES)
    for i, s in enumerate(SPECS):
        alone = InCA(DIM, CLASSES, s.num_heads, s.num_queries, s.mlp_ratio, seed=s.seed).state_dict()
        got = bank.adapter(i).state_dict()
        assert alone.keys() == got.keys()
        assert all(torch.equal(alone[k], got[k]) for k in alone)
    assert len(bank.stacks) == 3 and bank.layers == [1, 3]


def test_bank_equals_separate_adapters_forward_and_backward():
    bank = make_bank()
    feats = features()
    separate = [bank.adapter(i) for i in range(len(SPECS))]
    logits = bank(feats)
    assert logits.shape == (len(SPECS), 4, CLASSES)
    weights = torch.randn(logits.shape)
    (logits * weights).sum().backward()
    for i, (spec, adapter) in enumerate(zip(SPECS, separate)):
        out = adapter(feats[spec.layer])
        assert_rel(logits[i], out, 1e-5)
        (out * weights[i]).sum().backward()
        stack, row = bank.locate(i)
        grads = split_qkv({name: p.grad for name, p in adapter.named_parameters()})
        for name, p in stack.params().items():
            if name == "attn.b_k":  # cancels in softmax: no gradient
                assert p.grad is None and grads[name].abs().max() == 0
            else:
                assert_rel(p.grad[row], grads[name], 1e-5)


def test_adapter_round_trip_through_save_load(tmp_path):
    bank = make_bank()
    feats = features()
    logits = bank(feats)
    for i in (1, 4):
        save_adapter(TaskAdapter.from_bank(bank, [i], [str(c) for c in range(bank.num_classes)]), tmp_path / str(i))
        adapter = load_adapter(tmp_path / str(i))
        assert adapter.layers == [SPECS[i].layer]
        assert_rel(adapter(feats), logits[i], 1e-5)


def test_one_step_equals_torch_adamw_per_adapter():
    """Given the same gradients (the bank's), BatchedAdamW moves every adapter as torch's AdamW moves it alone.

    Adam divides by the gradients' scale, so it would turn the last-bit differences between two computations
    of the gradients into visible ones; their agreement is the forward-and-backward test's.
    """
    bank = make_bank()
    separate = [bank.adapter(i) for i in range(len(SPECS))]
    optimizer = BatchedAdamW(bank.optimizer_groups())
    torch_opts = []
    for spec, adapter in zip(SPECS, separate):
        named = list(adapter.named_parameters())
        groups = [
            {"params": [p for n, p in named if uses_weight_decay(n)], "weight_decay": spec.weight_decay},
            {"params": [p for n, p in named if not uses_weight_decay(n)], "weight_decay": 0.0},
        ]
        torch_opts.append(torch.optim.AdamW(groups, lr=spec.lr))
    for step in range(3):
        feats, target = features(), torch.randint(0, CLASSES, (4,), generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(bank(feats).flatten(0, 1), target.repeat(len(SPECS))).backward()
        optimizer_grads = [bank_grads(bank, i) for i in range(len(SPECS))]
        optimizer.step(lr_scale=0.5 + step)
        for spec, adapter, opt, grads in zip(SPECS, separate, torch_opts, optimizer_grads):
            for name, p in adapter.named_parameters():
                p.grad = grads[name]
            for group in opt.param_groups:
                group["lr"] = spec.lr * (0.5 + step)
            opt.step()
    for i, adapter in enumerate(separate):
        stack, row = bank.locate(i)
        for name, value in stack.state_of(row).items():
            torch.testing.assert_close(value, adapter.get_parameter(name), rtol=1e-6, atol=1e-6)


def bank_grads(bank: InCABank, i: int) -> dict[str, torch.Tensor]:
    """Adapter ``i``'s gradients in the bank, under InCA names (zero where the bank has none: ``attn.b_k``)."""
    stack, row = bank.locate(i)
    grads = {n: torch.zeros_like(p[row]) if p.grad is None else p.grad[row].clone() for n, p in stack.params().items()}
    return join_qkv(grads)


def test_frozen_rows_are_untouched_by_the_optimizer():
    w = torch.randn(3, 4, 5, requires_grad=True)
    optimizer = BatchedAdamW([{"params": [w], "lr": [0.1] * 3, "weight_decay": [0.1] * 3, "adapters": [2, 0, 1]}])
    before = w.detach().clone()
    w.grad = torch.randn(3, 4, 5)
    optimizer.step(frozen=[False, False, True])  # adapter 2 = row 0
    assert torch.equal(w[0], before[0]) and torch.equal(w.grad[0], torch.zeros(4, 5))
    assert not torch.equal(w[1], before[1]) and not torch.equal(w[2], before[2])
    state = optimizer.state_dict()
    assert state["0.0.step"].tolist() == [0.0, 1.0, 1.0]
    assert state["0.0.exp_avg"][0].abs().sum() == 0 and state["0.0.exp_avg"][1].abs().sum() > 0


def test_nan_in_one_adapter_freezes_it_and_leaves_the_others_exactly_unchanged():
    n = 8
    data = {"train": {1: tokens(n, 9, DIM, seed=20), 3: tokens(n, 9, DIM, seed=21)}}
    source = TensorSource(data, {"train": np.arange(n) % CLASSES})
    clean, poisoned = make_bank(), make_bank()
    with torch.no_grad():
        stack, row = poisoned.locate(2)
        stack.head_bias[row, 0] = float("nan")
    before = poisoned.adapter(2).state_dict()
    hist_clean = train_bank(clean, source, epochs=2, batch_size=4, warmup_steps=0, progress=False)
    hist = train_bank(poisoned, source, epochs=2, batch_size=4, warmup_steps=0, progress=False)
    assert hist.diverged == [False, False, True, False, False, False] and not any(hist_clean.diverged)
    assert poisoned.diverged.tolist() == hist.diverged
    assert np.isnan(hist.train_loss[-1][2]) and np.isfinite(np.delete(hist.train_loss[-1], 2)).all()
    for name, value in poisoned.adapter(2).state_dict().items():  # frozen: its parameters stopped changing
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True)
    for i in (0, 1, 3, 4, 5):
        trained, reference = poisoned.adapter(i).state_dict(), clean.adapter(i).state_dict()
        assert all(torch.equal(trained[k], reference[k]) for k in trained), i
        assert not torch.equal(trained["query"], make_bank().adapter(i).query)  # it did train


def test_missing_layer_is_a_one_line_error():
    bank = make_bank()
    with pytest.raises(InCAError, match="lack layers"):
        bank({1: tokens(2, 5, DIM)})
