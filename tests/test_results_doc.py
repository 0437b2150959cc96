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


# ----------------------------------------------------------------------------------------------------
# The equal-budget comparison and the benchmarks' --json figures: docs/results.md's sections and README's links
# ----------------------------------------------------------------------------------------------------

GENERATED = {"equal_budget": "budget_lines", "dtypes": "dtype_lines", "search": "search_lines"}


@pytest.mark.parametrize("key", GENERATED)
def test_results_md_states_the_benchmark_figures(results, figures, key):
    doc = (ROOT / "docs" / "results.md").read_text()
    assert "\n".join(getattr(results, GENERATED[key])(figures)).strip() in doc


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    import re

    return re.sub(r"[^\w\- ]", "", heading.lstrip("#").strip().lower()).replace(" ", "-")


def _anchors(lines) -> set[str]:
    return {_slug(line) for line in lines if line.startswith("#")}


def _record(task, method, test_acc, total, layer=None):
    """An inca-compare record, as far as the generator reads it (compare.json's schema)."""
    return {"task": task, "method": method, "test_acc": test_acc, "configurations": {"total": total, "axes": {}},
            "tuned": {"lr": 1e-3, **({"layer": layer} if layer is not None else {})}}


def _summary(records, equal):
    return {"protocol": {"lr_grid": 1, "equal_budget": equal}, "results": records}


@pytest.fixture(scope="module")
def bench_figures(results):
    """What tools/bench_search.py and tools/bench_activations.py write with --json, the former through its own
    task_figures, on train_inca_task-shaped results."""
    search = load_tool("bench_search")

    def result(wall, epochs, val, test, best=0, stopped=None):
        adapters = [{"layer": i, "lr": 1e-3, "num_queries": 1, "weight_decay": 1e-4, "stopped_rung": stopped,
                     "epochs_trained": 1, "val_acc": 0.5} for i in range(4)]
        return {"wall": wall, "adapter_epochs": epochs, "val_acc": val, "test_acc": test, "best": {"index": best},
                "adapters": adapters}

    tasks = [search.task_figures("digits", result(10.0, 36, 0.9, 0.8), result(3.0, 10, 0.9, 0.8)),
             search.task_figures("synth-count", result(20.0, 36, 0.7, 0.6), result(4.0, 10, 0.6, 0.5, 1, stopped=1))]
    settings = {"epochs": 9, "lr": [3e-3, 1e-3], "queries": [1], "weight_decay": [1e-4], "halving_rate": 3,
                "batch_size": 64, "repeats": 2}
    dtype = {"arguments": "--recipe recipes/demo.yaml", "threads": 1,
             "test_acc": {"digits": {"float16": 0.80, "bfloat16": 0.81, "int8": 0.79},
                          "synth-count": {"float16": 0.60, "bfloat16": 0.57, "int8": 0.60}}}
    default = _summary([_record("digits", "inca", 0.9, 6, 3), _record("digits", "lora", 0.8, 1)], equal=False)
    equal = _summary([_record("digits", "inca", 0.85, 1, 5), _record("digits", "lora", 0.8, 1)], equal=True)
    return {"search": {"settings": settings, "threads": 1, "backbones": {"demo": tasks, "proxy": tasks}},
            "dtypes": {"demo": dtype, "proxy": dtype}, "equal_budget": results.budget_figures(default, equal)}


def test_equal_budget_table_sets_each_methods_own_budget_beside_the_equal_one(results, bench_figures):
    budget = bench_figures["equal_budget"]
    assert budget["tasks"]["digits"]["inca"] == {"own": {"test_acc": 0.9, "configurations": 6, "layer": 3},
                                                 "equal": {"test_acc": 0.85, "configurations": 1, "layer": 5}}
    text = "\n".join(results.budget_lines(bench_figures))
    row = next(line for line in text.splitlines() if "| inca " in line)
    assert [c.strip() for c in row.strip("|").split("|")] == ["digits", "inca", "0.900 (6; layer 3)",
                                                            "0.850 (1; layer 5)", "-0.050"]
    with pytest.raises(SystemExit, match="without --equal-budget"):
        results.budget_figures(_summary([], False), _summary([], False))


def test_benchmark_sections_state_the_measured_figures(results, bench_figures):
    dtypes = "\n".join(results.dtype_lines(bench_figures))
    assert "0.810 (+1.0)" in dtypes and "0.570 (-3.0)" in dtypes  # points against float16
    assert "bfloat16 moves test accuracy by up to 3.0 points and int8 by up to 1.0" in dtypes
    search = "\n".join(results.search_lines(bench_figures))
    assert "0.23x" in search  # (3 + 4) / (10 + 20), the total wall time
    assert "10 of 36" in search and "-10.0" in search  # synth-count's adapter-epochs and points
    assert "pruned at rung 1" in search


def test_readme_links_point_at_generated_sections(results, bench_figures):
    import re

    readme = (ROOT / "README.md").read_text()
    written = _anchors([*results.budget_lines(bench_figures), *results.dtype_lines(bench_figures),
                        *results.search_lines(bench_figures)])
    performance = _anchors((ROOT / "docs" / "performance.md").read_text().splitlines())
    linked = re.findall(r"\(docs/(results|performance)\.md#([\w-]+)\)", readme)
    assert {"equal-tuning-budgets", "store-element-types", "successive-halving-against-the-grid"} <= \
        {anchor for doc, anchor in linked if doc == "results"}
    for doc, anchor in linked:
        assert anchor in (written if doc == "results" else performance), f"docs/{doc}.md#{anchor}"


def test_readme_quotes_no_benchmark_figure(results):
    readme = (ROOT / "README.md").read_text()
    for typed in ("0.8615", "+0.43", "0.25x the grid", "49-70 s", "614 tests", "16.6x ViT-S", "7.6 s", "55.1 s"):
        assert typed not in readme, typed
    performance = (ROOT / "docs" / "performance.md").read_text()
    assert "16.6x ViT-S" in performance and "7.6 s" in performance


def test_a_missing_run_stops_the_generator_naming_it(results, bench_figures, tmp_path):
    import json

    with pytest.raises(SystemExit, match="bench-search-demo.json is missing"):
        results.search_figures(tmp_path)
    search = bench_figures["search"]
    for name in ("demo", "proxy"):  # each file holds the other backbone only
        other = "proxy" if name == "demo" else "demo"
        part = {**search, "backbones": {other: search["backbones"][other]}}
        (tmp_path / results.SEARCH_RUNS[name]).write_text(json.dumps(part))
    with pytest.raises(SystemExit, match="holds no run on the demo backbone"):
        results.search_figures(tmp_path)
    for name in ("demo", "proxy"):
        part = {**search, "backbones": {name: search["backbones"][name]}}
        (tmp_path / results.SEARCH_RUNS[name]).write_text(json.dumps(part))
    assert results.search_figures(tmp_path) == search
    slower = {**search, "threads": 2, "backbones": {"proxy": search["backbones"]["proxy"]}}
    (tmp_path / results.SEARCH_RUNS["proxy"]).write_text(json.dumps(slower))
    with pytest.raises(SystemExit, match="different settings or threads"):
        results.search_figures(tmp_path)


@pytest.mark.slow
def test_bench_search_json_is_what_the_generator_reads(results, tmp_path, monkeypatch):
    """A tiny real run of tools/bench_search.py --json (demo backbone only: no proxy here)."""
    import json
    import sys

    search = load_tool("bench_search")
    out = tmp_path / results.SEARCH_RUNS["demo"]
    monkeypatch.setattr(sys, "argv", ["bench_search.py", "--tasks", "synth-colour", "--epochs", "3", "--lr",
                                      "3e-3,1e-3", "--queries", "1", "--weight-decay", "1e-4", "--skip-proxy",
                                      "--json", str(out)])
    search.main()
    written = json.loads(out.read_text())
    with pytest.raises(SystemExit, match="bench-search-proxy.json is missing"):
        results.search_figures(tmp_path)
    (tmp_path / results.SEARCH_RUNS["proxy"]).write_text(json.dumps(
        {**written, "backbones": {"proxy": written["backbones"]["demo"]}}))
    text = "\n".join(results.search_lines({"search": results.search_figures(tmp_path)}))
    assert "| synth-colour" in text and "of 24" in text  # 8 adapters x 3 epochs in the grid


def test_a_linear_probe_tied_on_val_counts_the_mean_of_the_tied_not_the_first_listed(results):
    """Block 2's CLS and block 5's mean pool share the best val accuracy: neither the pool listed first nor the
    shallower layer decides the figure, and the text names both."""
    result = {"results": {"linear/cls": {"2": {"val": 0.7, "test": 0.6}, "5": {"val": 0.5, "test": 0.9}},
                          "linear/mean": {"2": {"val": 0.6, "test": 0.5}, "5": {"val": 0.7, "test": 0.8}}}}
    assert results.best_linear_probe(result) == pytest.approx(0.7)
    cells = [{"pool": p, "layer": int(layer), "test": s["test"]} for p, layer, s in results.best_linear_cells(result)]
    assert cells == [{"pool": "cls", "layer": 2, "test": 0.6}, {"pool": "mean", "layer": 5, "test": 0.8}]
    text = " ".join(results.tie_lines({"random": cells}))
    assert "block 2 (cls pool, test 0.600) and block 5 (mean pool, test 0.800)" in text
    assert results.tie_lines({}) == []
