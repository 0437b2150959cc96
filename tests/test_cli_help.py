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
