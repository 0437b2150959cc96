"""The convergence measure against hand-computed values: one target per task (the worst final smoothed loss),
every method timed by its own first crossing, min-max over runs, and what is not measured (and why)."""

import numpy as np
import pytest

from inca.compare import _store, render_markdown
from inca.convergence import (
    FEATURES_ONLY,
    convergence_lines,
    convergence_table,
    crossings,
    smoothed_loss,
    steps_to_reach,
)


def record(task, method, curve, steps=None, diverged=None):
    return {"task": task, "method": method, "loss_curve": curve, "steps": len(curve) if steps is None else steps,
            "diverged_at_step": diverged}


def summary(seed, results):
    return {"config": {"seed": seed}, "results": results}


def test_trailing_mean_and_first_crossing_by_hand():
    curve = [4.0, 2.0, 3.0, 1.0, 1.0]
    assert smoothed_loss(curve, 2) == pytest.approx([4.0, 3.0, 2.5, 2.0, 1.0])
    assert smoothed_loss(curve, 3) == pytest.approx([4.0, 3.0, 3.0, 2.0, 5 / 3])
    assert steps_to_reach(curve, 2.5, 2) == 3 and steps_to_reach(curve, 0.5, 2) is None


def test_the_target_is_the_worst_final_loss_and_each_method_crosses_it_on_its_own():
    slow = [2.0, 1.6, 1.2, 1.0, 0.9, 0.8]  # window 2: 2, 1.8, 1.4, 1.1, 0.95, 0.85
    fast = [1.0, 0.8, 0.6, 0.5, 0.5, 0.5]  # window 2: 1, 0.9, 0.7, 0.55, 0.5, 0.5
    target, steps = crossings({"slow": slow, "fast": fast}, window=2)
    assert target == pytest.approx(0.85)
    assert steps == {"slow": 6, "fast": 3}  # the slow one at its own last step, never "total steps"


def test_table_ratios_spread_over_seeds_and_what_is_not_measured():
    runs = [
        summary(0, [record("t", "lora", [2.0, 1.6, 1.2, 1.0, 0.9, 0.8]), record("t", "lora-ga", [1.0, 0.8, 0.6, 0.5]),
                    record("t", "inca", [1.0, 0.5], steps=6), record("t", "full", [1.0, 9.0], steps=2, diverged=2)]),
        summary(1, [record("t", "lora", [2.0, 1.0, 1.0, 1.0]), record("t", "lora-ga", [1.5, 1.0, 0.5, 0.4]),
                    record("t", "inca", [1.0, 0.5], steps=6), record("t", "full", [1.0, 0.5])]),
    ]
    table = convergence_table(runs, window=2)
    task = table["tasks"]["t"]
    # seed 0: lora smoothed 2, 1.8, 1.4, 1.1, .95, .85; lora-ga 1, .9, .7, .55 -> target .85: lora 6, lora-ga 3
    # seed 1: lora 2, 1.5, 1, 1; lora-ga 1.5, 1.25, .75, .45 -> target 1: lora 3, lora-ga 3
    assert task["target"] == pytest.approx([0.85, 1.0])
    assert task["reference"] == "lora"
    assert task["methods"]["lora"] == {"steps": [3, 6], "steps_run": [4, 6], "ratio": [1.0, 1.0]}
    assert task["methods"]["lora-ga"]["steps"] == [3, 3]
    assert task["methods"]["lora-ga"]["ratio"] == pytest.approx([1.0, 2.0])
    assert task["not_measured"] == {"inca": "its trainer records one loss per epoch, not per step",
                                    "full": "diverged at step 2"}
    assert table["seeds"] == [0, 1]
    text = "\n".join(convergence_lines(table))
    assert "min-max over 2 runs (seeds 0, 1)" in text
    assert "| t    | 0.8500-1.0000 | lora    | 3-6 " in text and "| lora-ga | 3 " in text and "1.00-2.00" in text
    assert "Not measured: inca on t (its trainer records one loss per epoch, not per step); full on t (diverged" in text
    assert convergence_table(runs, window=2, reference="lora-ga")["tasks"]["t"]["methods"]["lora"]["ratio"] == \
        pytest.approx([0.5, 1.0])


def test_a_head_trained_on_frozen_features_sets_no_target():
    # window 2: lora 1, .9, .7, .5; full 1.2, 1.1, .9, .7; linear 1, 1, 1, 1. With linear's final 1.0 as the
    # target, lora would be there at step 1 and full at step 3; without it the target is full's .7: lora 3, full 4
    runs = [summary(0, [record("t", "lora", [1.0, 0.8, 0.6, 0.4]), record("t", "full", [1.2, 1.0, 0.8, 0.6]),
                        record("t", "linear", [1.0, 1.0, 1.0, 1.0])])]
    task = convergence_table(runs, window=2)["tasks"]["t"]
    assert task["target"] == pytest.approx([0.7, 0.7])
    assert {m: f["steps"] for m, f in task["methods"].items()} == {"lora": [3, 3], "full": [4, 4]}
    assert task["not_measured"] == {"linear": FEATURES_ONLY}
    assert f"Not measured: linear on t ({FEATURES_ONLY})." in convergence_lines(convergence_table(runs, window=2))


def test_compare_json_and_md_carry_the_table_for_one_seed():
    report = {"config": {"seed": 7, "backbone": "b", "weights": "random", "epochs": 1, "batch_size": 2,
                         "device": "cpu"}, "backbone_params": 10, "memory": "m", "results": []}
    for method, curve in (("lora", [1.0, 0.9, 0.8]), ("lora-ga", [0.9, 0.7, 0.6])):
        _store(report, method, {**record("digits", method, curve), "test_acc": 0.5, "val_acc": 0.5,
                                "best_epoch": 1, "tuned": {}, "trainable_params": 1, "trainable_pct": 10.0,
                                "seconds": 1.0, "peak_memory_mb": None, "hparams": {}, "key": method,
                                "task_info": {"classes": 2, "sizes": {"train": 6}, "fingerprint": "f"}})
    figures = report["convergence"]["tasks"]["digits"]
    # trailing means (every step so far, under the default 10): lora 1, .95, .9; lora-ga .9, .8, .73 -> target .9
    assert np.isclose(figures["target"][0], 0.9)
    assert figures["methods"]["lora"]["steps"] == [3, 3] and figures["methods"]["lora-ga"]["steps"] == [1, 1]
    markdown = render_markdown(report)
    assert "## Convergence" in markdown and "one seed (7): no spread" in markdown
