"""Command-line entry points. Argument parsing only: every action is a library call."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from .errors import InCAError

_logger = logging.getLogger("inca")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _run(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return main(args)
    except InCAError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; finished work is kept and a rerun resumes it", file=sys.stderr)
        return 130


def _add_backbone_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("backbone")
    group.add_argument("--backbone", required=required, help="timm model name, optionally with a pretrained tag")
    group.add_argument("--weights", default="pretrained",
                       help="pretrained | random | PATH (.safetensors, .pth, .npz); default: pretrained")
    group.add_argument("--model-kwargs", nargs="*", default=[], metavar="K=V",
                       help="timm create_model kwargs, e.g. img_size=32 patch_size=8 depth=4")
    group.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")


def _add_task_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data-root", help="root directory for tv:NAME datasets")
    group.add_argument("--download", action="store_true", help="allow torchvision to download tv: datasets")
    group.add_argument("--split-seed", type=int, default=0, help="seed of the val/test carving (default 0)")
    group.add_argument("--num-workers", type=int, default=None, help="image decoding workers (default: auto)")


def _backbone(args: argparse.Namespace):
    from .backbone import create_backbone, resolve_device

    return create_backbone(args.backbone, args.weights, args.model_kwargs, device=resolve_device(args.device))


def _load_task(args: argparse.Namespace, spec: str):
    from .tasks import load_task

    return load_task(spec, data_root=args.data_root, download=args.download, seed=args.split_seed)


def cache_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="inca-cache", description="Build, resume or verify an on-disk activation store.")
    _add_backbone_args(parser, required=False)
    _add_task_args(parser)
    parser.add_argument("--task", "--tasks", dest="tasks", help="task spec(s), comma-separated")
    parser.add_argument("--layers", default="all", help="all | -1 | 0,5,11 | last:K (default: all)")
    parser.add_argument("--cache-dir", help="store root (default: $INCA_CACHE or ~/.cache/inca)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--commit-seconds", type=float, default=10.0,
                        help="how often written rows are made durable for resume (default 10)")
    parser.add_argument("--verify", metavar="DIR", help="re-check a finished store instead of building")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _cache(args: argparse.Namespace) -> int:
    from .backbone import resolve_layers
    from .cache import build_cache, verify_cache
    from .tasks import parse_task_list

    if args.verify:
        summary = verify_cache(args.verify)
        print(f"ok: {summary['path']}: {summary['backbone']} on {summary['task']}, layers {summary['layers']}, "
              f"rows {summary['rows']}, {summary['files']} files match their checksums")
        return 0
    if not args.backbone:
        raise InCAError("--backbone is required to build a store (or pass --verify DIR)")
    specs = parse_task_list(args.tasks or [])
    backbone = _backbone(args)
    layers = resolve_layers(args.layers, backbone.num_blocks)
    for spec in specs:
        task = _load_task(args, spec)
        cache = build_cache(backbone, task, layers, args.cache_dir, args.batch_size, args.dtype,
                            args.num_workers, args.commit_seconds)
        print(f"{task.spec}: {cache.path} (layers {cache.layers}, rows {task.sizes()})")
    return 0


def cache_main(argv: Sequence[str] | None = None) -> int:
    return _run(_cache, cache_parser(), argv)
