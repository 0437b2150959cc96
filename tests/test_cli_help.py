"""Every command's ``--help``: built without importing torch (a typo or a look at the options costs no torch
import), and every option that has a default shows it."""

import re
import subprocess
import sys

import pytest

from inca import cli

COMMANDS = ["cache", "train", "predict", "compare", "probe"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_imports_no_torch(command):
    script = (f"import sys\nfrom inca.cli import {command}_parser\n{command}_parser().format_help()\n"
              "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", f"inca-{command} --help imports torch"


def _option_entries(help_text: str) -> dict[str, str]:
    """Each option's entry in ``--help`` (its flags, metavars and help, wrapped lines joined), by each flag."""
    entries: dict[str, str] = {}
    flags: list[str] = []
    for line in help_text.splitlines():
        if line.startswith("  -"):  # an entry's first line: "  -v, --verbose   help" or "  --lr FLOAT ..."
            flags = re.findall(r"(?:^|, )(-[\w-]+)", line.strip().split("  ")[0])
            entries.update({flag: line.strip() for flag in flags})
        elif flags and line.startswith("   "):  # its help, wrapped (indented deeper than an entry)
            entries.update({flag: f"{entries[flag]} {line.strip()}" for flag in flags})
        else:
            flags = []
    return entries


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    parser = getattr(cli, f"{command}_parser")()
    entries = _option_entries(parser.format_help())
    flags = [action.option_strings[0] for action in parser.options.values()  # not a positional, a switch or None
             if action.option_strings and action.nargs != 0 and action.default not in (None, [], "==SUPPRESS==")]
    assert set(flags) <= set(entries), entries
    hidden = [entries[flag] for flag in flags if "default" not in entries[flag]]
    assert not hidden, f"inca-{command} --help hides the default of: " + "; ".join(hidden)


@pytest.mark.parametrize("command", COMMANDS)
def test_abbreviated_flags_are_refused(command, capsys):
    """``--epoch`` is not silently ``--epochs``: a later flag sharing the prefix would change what it means."""
    parser = getattr(cli, f"{command}_parser")()
    flag = next(f for a in parser.options.values() for f in a.option_strings if f.startswith("--") and len(f) > 6)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([flag[:-2], "1"])
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_a_clean_exit_leaves_no_lock_file(tmp_path):
    from inca.errors import InCAError
    from inca.io import LOCK_FILE, directory_lock

    with directory_lock(tmp_path, "the output directory"):
        assert (tmp_path / LOCK_FILE).is_file()
    assert not (tmp_path / LOCK_FILE).exists()
    with pytest.raises(InCAError, match="in use"), directory_lock(tmp_path, "out"), directory_lock(tmp_path, "out"):
        pass
    with pytest.raises(RuntimeError), directory_lock(tmp_path, "out"):
        raise RuntimeError("a failed run")
    with directory_lock(tmp_path, "out"):  # a lock file left by a failed or killed run is simply taken over
        pass
    assert not (tmp_path / LOCK_FILE).exists()
