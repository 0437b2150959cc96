"""The README's library snippets run as written, in order, in one namespace."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def library_snippets() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Use it as a library", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_readme_library_snippets_run(tmp_path, monkeypatch):
    snippets = library_snippets()
    assert len(snippets) == 3
    assert all(len(s.strip().splitlines()) < 25 for s in snippets)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, str(README), "exec"), namespace)
    assert namespace["loss"].item() < 2.0  # (a) trained below log(10) = 2.30
    assert namespace["val_accuracy"].max() > 0.3  # (b) the bank learned synth-count (5 classes)
    logits = namespace["logits"]
    assert {k: tuple(v.shape) for k, v in logits.items()} == {"digits": (8, 10), "synth-count": (8, 5)}
    assert all(len(p) == 8 for p in namespace["predicted"].values())


@pytest.mark.slow
@pytest.mark.parametrize("module", ["inca", "inca.probe", "inca.compare", "inca.report"])
def test_imports_do_not_switch_the_matplotlib_backend(module):
    import subprocess
    import sys

    code = (f"import matplotlib; before = matplotlib.get_backend(); import {module}; "
            "assert 'matplotlib.pyplot' not in __import__('sys').modules; print(before == matplotlib.get_backend())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"MPLBACKEND": "svg"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "True"
