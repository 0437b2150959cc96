"""``python -m inca <command> ...``: the console scripts without installing them."""

from __future__ import annotations

import sys

from . import cli

COMMANDS = {
    "cache": cli.cache_main,
    "compare": cli.compare_main,
    "predict": cli.predict_main,
    "probe": cli.probe_main,
    "train": cli.train_main,
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m inca {{{','.join(COMMANDS)}}} [args...]", file=sys.stderr)
        return 2
    return COMMANDS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
