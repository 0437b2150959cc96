"""tools/gpu_check.sh runs in its quick CPU mode and prints every row of its table, none failed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_quick_cpu_prints_every_row_and_none_fails(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    from gpu_check import CHECKS

    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--quick", "--device", "cpu"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]  # after the header
    labels = [row.split("|")[1].strip() for row in rows]
    assert labels == [label for _, expected in CHECKS.values() for label in expected], result.stdout
    assert not [row for row in rows if "FAIL" in row], result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
