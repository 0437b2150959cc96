"""tools/profile_int8.py: it times every step of both standardisations, and refuses a batch its rows cannot fill."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).parents[1] / "tools" / "profile_int8.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_a_small_profile_prints_every_step_and_the_ratio():
    run = subprocess.run([sys.executable, str(TOOL), "--dim", "64", "--tokens", "5", "--batch", "4", "--rows", "8",
                          "--repeats", "2"], capture_output=True, text=True, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    for step in ("gather float16", "gather int8", "float16 -> float32", "int8 dequantise", "int8 x scale, two kernels",
                 "int8 x scale, one mixed op", "LayerNorm", "standardise float16 (all)", "standardise int8 (all)"):
        assert f"  {step} " in run.stdout, step
    assert "int8 / float16, whole standardisation:" in run.stdout


@pytest.mark.slow
def test_a_batch_larger_than_its_rows_is_one_line_and_exit_2():
    run = subprocess.run([sys.executable, str(TOOL), "--batch", "9", "--rows", "8"], capture_output=True, text=True,
                         env=ENV)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines()[-1] == ("profile_int8.py: error: --batch 9 exceeds --rows 8: a batch is "
                                                   "gathered from those rows")
    assert "Traceback" not in run.stderr
