"""The README's library snippets: each runs alone, as written, and prints its result."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def library_snippets() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Use it as a library", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


# What each snippet prints: each pattern matches the start of a line of its output.
EXPECTED = [
    [r"synth-count: layers ranked on val \[\d, \d, \d, \d\]",
     r"synth-colour: layer [0-3], test accuracy [01]\.\d\d \(chance 0\.\d\d\), serving synth-colour-[0-9a-f]{8}/"
     r"(adapter|ensemble)",
     r"image0\.png \{'synth-count': \['\w+'\], 'synth-colour': \['\w+'\]\}"],
    [r"knn: layers best first \[\d, \d, \d, \d\], val accuracy \{.*\}", r"linear: layers best first .*"],
    [r"epoch 2: last batch's loss \d+\.\d{3}"],
    [r"best of 4: layer [13], lr 0\.00[13], val accuracy [01]\.\d\d"],
    [r"digits \(8, 10\) \['\d'", r"synth-count \(8, 5\) \['\w+'"],
]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(EXPECTED)))
def test_readme_library_snippet_runs_alone(index, tmp_path):
    """Each snippet runs in a fresh interpreter with nothing but its own imports and inputs, and prints its result."""
    import os
    import subprocess
    import sys

    snippets = library_snippets()
    assert len(snippets) == len(EXPECTED)
    assert len(snippets[index].strip().splitlines()) <= 25
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INCA_CACHE": str(tmp_path / "cache"), "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", snippets[index]], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for pattern in EXPECTED[index]:
        assert any(re.match(pattern, line) for line in lines), f"no line matches {pattern!r} in:\n{result.stdout}"


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
