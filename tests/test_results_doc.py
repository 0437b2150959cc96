"""README's results block and docs/results.md say what docs/results.json holds (tools/proxy_results.py renders all
three from the same figures), and the generator's measures are the ones the documents describe. No training."""

from pathlib import Path

import pytest

from tests.conftest import load_tool

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def results():
    return load_tool("proxy_results")


@pytest.fixture(scope="module")
def figures():
    import json

    return json.loads((ROOT / "docs" / "results.json").read_text())


def test_readme_block_is_the_one_rendered_from_the_figures(results, figures):
    readme = (ROOT / "README.md").read_text()
    assert readme.count(results.README_BEGIN) == 1 and readme.count(results.README_END) == 1
    assert results.readme_block_of(readme) == results.readme_block(figures), \
        "README's results block was edited by hand or is stale: rerun python tools/proxy_results.py"


def test_results_md_states_the_same_figures(results, figures):
    doc = (ROOT / "docs" / "results.md").read_text()
    for section in (results.claims_lines(figures), results.independent_lines(figures)):
        assert "\n".join(section).strip() in doc, "docs/results.md disagrees with docs/results.json"


def test_the_old_convergence_claim_is_gone():
    readme = (ROOT / "README.md").read_text()
    assert "fewer steps" not in readme and "below the last on 4 of 5" not in readme


def test_a_layer_tied_with_the_last_is_not_below_it(results):
    def scores(*vals):
        return {str(i): {"val": v, "test": v} for i, v in enumerate(vals)}

    assert results.layer_verdict(scores(0.90, 0.95, 0.95))["verdict"] == "tie"
    assert results.layer_verdict(scores(0.90, 0.95, 0.95))["best_layers"] == [1, 2]
    below = results.layer_verdict(scores(0.90, 0.95, 0.93))
    assert below["verdict"] == "below" and below["last_val_gap"] == pytest.approx(0.02)
    assert results.layer_verdict(scores(0.90, 0.95, 0.96))["verdict"] == "last"


def test_convergence_ratios_are_inca_convergences_where_it_separates_the_methods(results, figures):
    from inca.convergence import FEATURES_ONLY, convergence_table

    def record(task, method, curve):
        return {"task": task, "method": method, "loss_curve": curve, "steps": len(curve)}

    # window 2, by hand. a: both at the target 1.0 from step 1, so a is left out. b: lora 2, 2, 1.5, 1 and
    # lora-ga 2, 1.5, 1, 1 -> target 1.0, steps 4 and 3; linear (3 throughout) would have made the target 3,
    # reached by both at step 1, had it been measured
    table = convergence_table([{"config": {"seed": 0}, "results": [
        record("a", "lora", [1.0] * 4), record("a", "lora-ga", [1.0] * 4),
        record("b", "lora", [2.0, 2.0, 1.0, 1.0]), record("b", "lora-ga", [2.0, 1.0, 1.0, 1.0]),
        record("b", "linear", [3.0] * 4)]}], window=2, reference="lora")
    assert results._ratios(table, "lora-ga") == {"b": pytest.approx([4 / 3, 4 / 3])}
    assert all(e["not_measured"]["linear"] == FEATURES_ONLY for e in figures["convergence"]["tasks"].values())


def test_readme_block_is_replaced_in_place_and_required(results):
    readme = f"intro\n{results.README_BEGIN}\nold\ntext\n{results.README_END}\noutro\n"
    expected = f"intro\n{results.README_BEGIN}\nnew\n{results.README_END}\noutro\n"
    assert results.readme_with_block(readme, "new") == expected
    with pytest.raises(SystemExit, match="one results block"):
        results.readme_with_block("no markers\n", "new")


def test_fixes_md_says_for_each_ablation_whether_the_demo_can_show_it():
    ablate = load_tool("ablate_fixes")
    doc = (ROOT / "docs" / "fixes.md").read_text()
    assert ablate.blind_spots() in doc
    for fix in [*ablate.FIXES, ablate.EVERY_FIX]:
        assert f"### {fix.name}\n\n{fix.what}. {ablate.shows(fix)}\n" in doc, fix.name
