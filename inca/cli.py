"""Command-line entry points. Argument parsing only: every action is a library call."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from collections.abc import Callable, Sequence

from . import options as opt
from .errors import InCAError, first_line
from .progress import command_units, set_quiet, unit_done

# Each command's name: its parser's prog, and what its errors start with (even one raised while its parser is built).
CACHE, COMPARE, PREDICT, PROBE, TRAIN = "inca-cache", "inca-compare", "inca-predict", "inca-probe", "inca-train"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit 2) instead of usage + error, shows defaults in
    ``--help``; every command takes ``-v``. ``options`` maps each option's dest to its action (a recipe's keys
    are checked against them), recorded as options are added to the parser or any of its groups, when each
    option's help also gets its default. A flag must be spelled in full: an abbreviation (``--epoch``) is refused
    rather than read as the one flag it happens to begin today."""

    def __init__(self, **kwargs) -> None:
        self.options: dict[str, argparse.Action] = {}
        super().__init__(allow_abbrev=False, **kwargs)
        self.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        self.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress")

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        return self._record(super().add_argument(*args, **kwargs))

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument

        def add_and_record(*names, **options) -> argparse.Action:
            return self._record(add(*names, **options))

        group.add_argument = add_and_record
        return group

    def _record(self, action: argparse.Action) -> argparse.Action:
        """Record ``action`` in :attr:`options`; its help shows its default (argparse fills ``%(default)s`` in when
        help is printed, so a recipe's default shows too), unless the text says it already or there is none."""
        self.options[action.dest] = action
        text, default = action.help or "", action.default
        nothing = default is None or default is False or default in ([], argparse.SUPPRESS)  # (0 is shown)
        if text and text != argparse.SUPPRESS and "default" not in text and not nothing:
            action.help = f"{text} (default: %(default)s)"
        return action

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _run(prog: str, main: Callable[[argparse.Namespace], int], make_parser: Callable[[], _Parser],
         argv: Sequence[str] | None, check: Callable[[argparse.Namespace], argparse.Namespace] | None = None) -> int:
    """Parse ``argv`` with ``make_parser()`` and run ``main``; ``prog`` (the parser's own) names the command in an
    error raised while the parser is built. ``check`` gets the arguments (recipe applied) first and returns them
    checked: it imports no torch, so bad input is one line within a second of the start, before any work."""
    try:  # a parser lists the registered extensions: an installed plugin that fails to load is one line
        parser = make_parser()
    except InCAError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    # Other libraries speak at WARNING (their INFO lines, e.g. font caches or SIMD builds, are noise here);
    # inca itself at INFO, DEBUG with -v, WARNING with --quiet (which also silences progress reports).
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format=f"%(asctime)s {_rank_prefix()}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("inca").setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    set_quiet(quiet)
    try:
        if getattr(args, "recipe", None):
            args = _with_recipe(parser, argv, args)
        if check is not None:
            args = check(args)
        from .distributed import launch  # the input is good: now torch

        world = launch()  # joins torchrun's process group; a world of one otherwise
        # Only rank 0 prints the final tables: the other ranks' stdout goes nowhere (their logs still show).
        silenced = contextlib.nullcontext() if world.is_main else contextlib.redirect_stdout(io.StringIO())
        with silenced:
            return main(args)
    except InCAError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; finished work is kept and a rerun resumes it", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not _is_out_of_memory(exc):
            raise
        batch = getattr(args, "batch_size", None)
        advice = f"lower --batch-size (now {batch})" if batch else "use a smaller model or fewer adapters"
        print(f"{parser.prog}: error: out of memory ({first_line(exc, 80)}): {advice}; finished work is kept and "
              "a rerun resumes it", file=sys.stderr)
        return 2


def _rank_prefix() -> str:
    """``[rank R/N] `` before each log line of a rank torchrun started (from its RANK and WORLD_SIZE, so the log
    is set up before torch is imported), else nothing."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}/{size}] " if size > 1 else ""


def _is_out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: ``MemoryError``, ``torch.OutOfMemoryError``, or the ``RuntimeError`` torch's CPU
    allocator raises ("DefaultCPUAllocator: can't allocate memory", "not enough memory"); torch.OutOfMemoryError's
    text says "out of memory"."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in ("out of memory", "not enough memory", "can't allocate memory",
                                             "defaultcpuallocator"))


def _add_backbone_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backbone")
    group.add_argument("--backbone", help="timm model name, optionally with a pretrained tag")
    group.add_argument("--weights", default="pretrained",
                       help="pretrained | random | PATH (.safetensors, .pth, .npz); default: pretrained")
    group.add_argument("--model-kwargs", nargs="*", default=[], metavar="K=V",
                       help="timm create_model kwargs, e.g. img_size=32 patch_size=8 depth=4")
    group.add_argument("--device", type=opt.device, default="auto", help="auto | cpu | cuda[:N]")


def _add_task_args(parser: argparse.ArgumentParser) -> None:
    """The data flags: the loading settings every task source shares (dests named as TaskLoadConfig's fields),
    the decoding workers, and each source's own settings (``--{source}-{setting}``)."""
    from .config import add_config_flags
    from .tasks import TaskLoadConfig, add_task_source_flags

    group = parser.add_argument_group("data")
    add_config_flags(group, TaskLoadConfig, where="data")
    group.add_argument("--num-workers", type=opt.non_negative_int, default=None,
                       help="image decoding workers (default: auto)")
    add_task_source_flags(group)


def _tasks_help() -> str:
    from .tasks import task_sources_help

    return f"task spec(s), comma-separated: {task_sources_help()}".replace("%", "%%")


def _suite_parser(prog: str, description: str, out: str, out_help: str) -> argparse.ArgumentParser:
    """A multi-task command: backbone and data flags, ``--tasks``, ``--out`` and a ``--recipe`` of them all."""
    parser = _Parser(prog=prog, description=description)
    _add_backbone_args(parser)
    _add_task_args(parser)
    parser.add_argument("--tasks", "--task", dest="tasks", type=opt.names, help=_tasks_help())
    parser.add_argument("--out", default=out, help=out_help)
    parser.add_argument("--recipe", help="YAML file of these options (keys as the flags); flags override it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace results of another configuration in --out (a rerun of the same one resumes)")
    return parser


def _backbone(args: argparse.Namespace):
    from .backbone import create_backbone
    from .devices import resolve_device

    return create_backbone(args.backbone, args.weights, args.model_kwargs, device=resolve_device(args.device),
                           final_norm=getattr(args, "final_norm", False))


def _add_final_norm(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--final-norm", action="store_true",
                        help="pass the last block's tokens through the backbone's final norm, as DINO's linear "
                             "evaluation reads them (recorded in the report)")


def _load_task(args: argparse.Namespace, spec: str):
    from .tasks import load_task, task_settings

    return load_task(spec, settings=task_settings(args, spec))


def cache_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=CACHE, description="Build, resume or verify an on-disk activation store.")
    _add_backbone_args(parser)
    _add_task_args(parser)
    parser.add_argument("--task", "--tasks", dest="tasks", type=opt.names, help=_tasks_help())
    parser.add_argument("--layers", type=opt.layer_spec, default="all",
                        help="all | -1 | 0,5,11 | last:K (default: all)")
    parser.add_argument("--cache-dir", help="store root (default: $INCA_CACHE or ~/.cache/inca)")
    parser.add_argument("--batch-size", type=opt.positive_int, default=opt.BATCH_SIZE,
                        help="images per backbone pass")
    parser.add_argument("--dtype", default="float16", choices=opt.CACHE_DTYPES,
                        help="element type of the store: float16 and bfloat16 take 2 bytes a value, int8 0.54x "
                             "float16's bytes (per-token scales over channel groups, each token's largest values "
                             "kept in float16)")
    parser.add_argument("--commit-seconds", type=opt.non_negative_float, default=10.0,
                        help="how often written rows are made durable for resume (default 10)")
    parser.add_argument("--verify", metavar="DIR", help="re-check a finished store instead of building")
    parser.add_argument("--rebuild", action="store_true",
                        help="delete this backbone's store of each task first and build it anew")
    return parser


def _cache(args: argparse.Namespace) -> int:
    from .backbone import resolve_layers
    from .cache import build_cache, verify_cache

    if args.verify:
        summary = verify_cache(args.verify)
        scheme = f" ({summary['scheme']})" if summary["scheme"] else ""
        print(f"ok: {summary['path']}: {summary['backbone']} on {summary['task']}, layers {summary['layers']}, "
              f"{summary['dtype']}{scheme}, rows {summary['rows']}, {summary['files']} files match their checksums")
        return 0
    specs = args.tasks
    backbone = _backbone(args)
    layers = resolve_layers(args.layers, backbone.num_blocks)
    with command_units(len(specs)):  # redirected logs: progress lines per tenth of all the stores
        for spec in specs:
            task = _load_task(args, spec)
            cache = build_cache(backbone, task, layers, args.cache_dir, args.batch_size, args.dtype,
                                args.num_workers, args.commit_seconds, rebuild=args.rebuild)
            print(f"{task.name}: {cache.path} ({cache.dtype}, layers {cache.layers}, rows {task.sizes()})")
            unit_done()
    return 0


def _check_cache(args: argparse.Namespace) -> argparse.Namespace:
    """A store to build needs a backbone and good task specs (``--verify`` needs neither)."""
    if args.verify:
        return args
    if not args.backbone:
        raise InCAError("--backbone is required to build a store (or pass --verify DIR)")
    return _with_task_specs(args)


def cache_main(argv: Sequence[str] | None = None) -> int:
    return _run(CACHE, _cache, cache_parser, argv, _check_cache)


def compare_parser() -> argparse.ArgumentParser:
    import textwrap

    from .config import add_config_flags
    from .methods import METHODS, RunConfig, methods_help

    parser = _suite_parser(
        COMPARE,
        textwrap.fill(f"Compare methods ({', '.join(METHODS)}) on the same backbone, splits, batches and seed; "
                      "writes compare.json/.md and plots.", 78),
        out="compare", out_help="output directory; a rerun skips finished pairs",
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the method table's layout
    parser.epilog = methods_help(78)
    parser.add_argument("--methods", type=opt.names, help=f"comma-separated, default all: {','.join(METHODS)}")
    parser.add_argument("--method-args", nargs="*", action="extend", default=[], metavar="METHOD.KEY=VALUE",
                        help="override a method's default hyper-parameter, e.g. lora.rank=4 linear.pool=mean "
                             "(repeatable; later values win, flags over the recipe's; see the list below)")
    # --num-workers is the data group's; progress follows --quiet.
    add_config_flags(parser, RunConfig, where=COMPARE, exclude=(*RunConfig.PROTOCOL, "num_workers", "progress"))
    protocol = parser.add_argument_group("protocol (the same for every method; recorded in compare.json)")
    add_config_flags(protocol, RunConfig, where=COMPARE,
                     exclude=tuple(key for key in RunConfig.fields() if key not in RunConfig.PROTOCOL))
    _add_final_norm(protocol)
    protocol.add_argument("--equal-budget", action="store_true",
                          help="every method trains --lr-grid configurations per task: its learning rates (a "
                               "method's other tuned axes at their defaults), InCA's on the layer a linear probe run "
                               "on train and val ranks best (inca.layers=best:1, inca.rank_by=linear)")
    _add_log_dir(parser, "method")
    return parser


def _add_log_dir(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--log-dir", metavar="DIR",
                        help=f"also write each {what}'s training loss, validation accuracy and learning rate per epoch "
                             "as TensorBoard runs under DIR, as they train (view: tensorboard --logdir DIR; needs pip "
                             "install inca[tensorboard]; default: none)")


def _training_log(args: argparse.Namespace):
    """The TensorBoard log of ``--log-dir`` (None without it), checked before any work starts."""
    if args.log_dir is None:
        return None
    from .training_log import TrainingLog

    return TrainingLog(args.log_dir)


def _with_recipe(parser: _Parser, argv: Sequence[str] | None,
                 args: argparse.Namespace) -> argparse.Namespace:
    """Recipe values become the parser's defaults, so flags given on the command line override them."""
    from .recipe import load_recipe

    actions = {dest: action for dest, action in parser.options.items() if dest not in ("help", "recipe")}
    recipe = load_recipe(args.recipe, set(actions))
    for key, value in recipe.items():
        if key in ("model_kwargs", "method_args") and isinstance(value, dict):
            continue  # mappings, checked by their own parsers
        try:
            recipe[key] = opt.check_value(actions[key], value)
        except argparse.ArgumentTypeError as exc:
            raise InCAError(f"recipe {args.recipe}: {key}: {exc}") from None
    if isinstance(recipe.get("method_args"), dict):  # {lora: {rank: 4}}: flags extend the list after it
        recipe["method_args"] = [recipe["method_args"]]
    parser.set_defaults(**recipe)
    return parser.parse_args(argv)


def _check_suite(args: argparse.Namespace) -> argparse.Namespace:
    """A multi-task command's input (flags or recipe) before torch: a backbone named, ``--out`` usable, every task
    spec good."""
    if not args.backbone:
        raise InCAError("--backbone is required (on the command line or as backbone: in the --recipe)")
    from .io import check_directory

    check_directory(args.out, "--out")
    return _with_task_specs(args)


def _with_task_specs(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``tasks`` the list of ``--tasks``' specs, each checked, one per task (as typed)."""
    from .tasks import check_task_specs, parse_task_list, task_settings

    specs = check_task_specs(parse_task_list(args.tasks or []), lambda spec: task_settings(args, spec))
    return argparse.Namespace(**{**vars(args), "tasks": specs})


def _suite(args: argparse.Namespace):
    """The task specs (checked by :func:`_check_suite`) and the loaded backbone of a multi-task command."""
    return args.tasks, _backbone(args)


def _compare(args: argparse.Namespace) -> int:
    from .compare import render_markdown, run_comparison, written_files
    from .config import config_from_args
    from .methods import RunConfig

    log = _training_log(args)
    specs, backbone = _suite(args)
    settings = config_from_args(RunConfig, args, progress=RunConfig.default("progress"))
    summary = run_comparison(backbone, specs, args.methods, settings, args.out,
                             load=lambda spec: _load_task(args, spec), overwrite=args.overwrite, log=log,
                             equal_budget=args.equal_budget)
    print(render_markdown(summary), end="")
    print(f"\nwritten to {args.out}/ ({', '.join(written_files(args.out, summary))})")
    _print_log_dir(args)
    return 0


def _check_compare(args: argparse.Namespace) -> argparse.Namespace:
    """The suite's input, with ``methods`` resolved once (a method or its argument mistyped is one line): each
    method's name mapped to its full hyper-parameters."""
    from .methods import METHODS, resolve_methods

    methods = resolve_methods(args.methods or list(METHODS), args.method_args)
    return _check_suite(argparse.Namespace(**{**vars(args), "methods": methods}))


def compare_main(argv: Sequence[str] | None = None) -> int:
    return _run(COMPARE, _compare, compare_parser, argv, _check_compare)


def train_parser() -> argparse.ArgumentParser:
    parser = _suite_parser(
        TRAIN,
        "Train grids of InCA adapters in parallel on frozen-backbone activations, task after task.",
        out="runs/train", out_help="output directory (default runs/train)",
    )
    parser.add_argument("--layers", type=opt.layer_spec, default="all",
                        help="all | -1 | 0,5,11 | last:K | best:K with --probe-report (default: all)")
    parser.add_argument("--probe-report", help="probe.json written by inca-probe, for --layers best:K")
    _add_rank_by(parser)
    from .config import add_config_flags
    from .train.config import InCATrainConfig

    axes = InCATrainConfig.grid_axes()
    grid = parser.add_argument_group("adapter grid (comma-separated or repeated values; the cross product is trained)")
    add_config_flags(grid, InCATrainConfig, exclude=tuple(k for k in InCATrainConfig.fields() if k not in axes))
    add_config_flags(parser.add_argument_group("training"), InCATrainConfig, exclude=(*axes, "num_workers"))
    _add_log_dir(parser, "adapter")
    return parser


def _train(args: argparse.Namespace) -> int:
    from .api import train_suite
    from .config import config_from_args
    from .train.config import InCATrainConfig
    from .training import render_summary, written_files

    config = config_from_args(InCATrainConfig, args)  # --num-workers: the data group's flag
    log = _training_log(args)
    specs, backbone = _suite(args)
    results = train_suite(backbone, specs, args.out, str(args.layers), probe_report=args.probe_report,
                          rank_by=args.rank_by, overwrite=args.overwrite, config=config,
                          load_task=lambda spec: _load_task(args, spec), log=log)
    print(render_summary(results), end="")
    print(f"\nwritten to {args.out}/ ({', '.join(written_files(results))})")
    _print_log_dir(args)
    return 0


def _print_log_dir(args: argparse.Namespace) -> None:
    if args.log_dir is not None:
        print(f"TensorBoard runs in {args.log_dir}/ (view: tensorboard --logdir {args.log_dir})")


def _add_rank_by(parser: argparse.ArgumentParser) -> None:
    from .probes import PROBES
    from .probes.ranking import RANK_BY, RANK_BY_SOURCE, check_rank_by

    parser.add_argument("--rank-by", type=check_rank_by, default=RANK_BY, metavar="PROBE",
                        help=f"the probe whose val ranking --layers best:K follows, one of {', '.join(PROBES)} "
                             f"[{RANK_BY_SOURCE}]")


def _check_train(args: argparse.Namespace) -> argparse.Namespace:
    """The suite's input and, for ``--layers best:K``, a probe report holding every task."""
    from .probe_report import check_probe_report
    from .probes.ranking import best_count

    args = _check_suite(args)
    if best_count(str(args.layers)) is not None:
        if not args.probe_report:
            raise InCAError(f"--layers {args.layers} needs --probe-report OUT/probe.json (written by inca-probe)")
        report = check_probe_report(args.probe_report, args.tasks)  # read once: train_suite takes it as read
        args = argparse.Namespace(**{**vars(args), "probe_report": report})
    return args


def train_main(argv: Sequence[str] | None = None) -> int:
    return _run(TRAIN, _train, train_parser, argv, _check_train)


def predict_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PREDICT,
        description="Classify images with the models inca-train and inca-compare saved: InCA adapters and ensembles "
                    "(every task from one backbone pass per batch) and LoRA, LoRA-GA, Compacter, full fine-tuning "
                    "and linear-probe models (each runs its own forward pass), together. One row per image, a "
                    "column per task (several models of one task: TASK@METHOD, TASK@adapter, TASK@ensemble, ... as "
                    "the log says). Exit code 0: every image predicted; 1: some images could not be read (each is "
                    "named on stderr) and the rows of all the others are written; 2: bad input, nothing written.",
    )
    parser.add_argument("--adapter", nargs="+", action="extend", metavar="[NAME=]DIR",
                        help="saved adapters or models: OUT/<task>-<hash>/adapter (or /ensemble) of inca-train, "
                             "OUT/runs/<task>-<hash>/<method>/adapter of inca-compare; several after one flag (a "
                             "shell glob such as OUT/*/adapter) or the flag repeated; an output directory is read "
                             "as --run")
    parser.add_argument("--run", nargs="+", action="extend", metavar="DIR",
                        help="output directories: of inca-train (each task's best adapter on val, or see --use), of "
                             "inca-compare (every trained model of every task)")
    parser.add_argument("--use", choices=["adapter", "ensemble"], default="adapter",
                        help="what --run serves of each inca-train task: its best adapter, or its ensemble where "
                             "results.json offers one (saved with --ensemble K and better on val than the best "
                             "adapter; else the best adapter, logged)")
    todo = parser.add_mutually_exclusive_group()
    todo.add_argument("--images", nargs="+", help="image files or directories")
    todo.add_argument("--export-onnx", metavar="FILE",
                      help="instead of predicting, export the adapters and their backbone as one ONNX model "
                           "(preprocessed images in, one output per task, any batch size)")
    parser.add_argument("--weights", help="backbone weights if not the recorded ones (must be identical)")
    parser.add_argument("--device", type=opt.device, default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--top-k", type=opt.positive_int, default=1, help="classes reported per task (default 1)")
    parser.add_argument("--batch-size", type=opt.positive_int, default=opt.BATCH_SIZE,
                        help="images per backbone pass")
    parser.add_argument("--format", choices=["csv", "jsonl"], help="default: from --output's suffix, else csv")
    parser.add_argument("--output", help="write the rows to this file (atomically) instead of stdout")
    parser.add_argument("--resign", nargs="+", metavar="DIR",
                        help="accept a deliberate edit of these saved adapters' adapter_config.json (say, renamed "
                             "classes): sign each as it is now, print what changed, and exit")
    return parser


def _predict(args: argparse.Namespace) -> int:
    from .adapters.saved import resign_adapter
    from .devices import resolve_device
    from .inference import MultiTaskInCA
    from .io import atomic_write_text
    from .prediction import adapter_paths, format_predictions, output_format, predict_images

    if args.resign:
        for directory in args.resign:
            changed = resign_adapter(directory)
            print(f"{directory}: signed ({'; '.join(changed)})" if changed else f"{directory}: unchanged")
        return 0
    adapters = adapter_paths(args.adapter or [], args.run or [], args.use)
    if args.export_onnx:
        from .export import export_onnx

        model = MultiTaskInCA.from_saved(adapters, args.weights, resolve_device(args.device))
        export_onnx(model, args.export_onnx)
        print(f"ONNX model of {', '.join(model.tasks)} written to {args.export_onnx}", file=sys.stderr)
        return 0
    files = args.images  # the image files, found by _check_predict
    model = MultiTaskInCA.from_saved(adapters, args.weights, resolve_device(args.device))
    fmt = output_format(args.format, args.output)
    bad: list[str] = []

    def skip(path: str, reason: str) -> None:
        bad.append(path)
        print(f"inca-predict: skipped {path}: {reason}", file=sys.stderr)

    rows = list(predict_images(model, files, args.top_k, args.batch_size, on_bad_image=skip))
    text = format_predictions(rows, model.tasks, fmt)
    if args.output:
        atomic_write_text(args.output, text)
        print(f"predictions for {len(rows)} images and {len(model.tasks)} tasks written to {args.output}",
              file=sys.stderr)
    else:
        print(text, end="")
    if bad:
        print(f"inca-predict: {len(bad)} of {len(files)} images could not be read (named above); the rows of the "
              f"other {len(rows)} are written", file=sys.stderr)
        return 1
    return 0


def _check_predict(args: argparse.Namespace) -> argparse.Namespace:
    """The saved models and runs, the images and the files to write (``--resign`` is checked as it signs)."""
    if args.resign:
        return args
    from .prediction import check_predict_input

    files = check_predict_input(args.adapter or [], args.run or [], args.images, args.output, args.export_onnx)
    return argparse.Namespace(**{**vars(args), "images": files})


def predict_main(argv: Sequence[str] | None = None) -> int:
    return _run(PREDICT, _predict, predict_parser, argv, _check_predict)


def probe_parser() -> argparse.ArgumentParser:
    from .config import add_config_flags
    from .probes import PROBES, ProbeRunConfig

    parser = _suite_parser(
        PROBE, "Which layers hold the most useful representations for a task?",
        out="runs/probe", out_help="output directory (default runs/probe)",
    )
    parser.add_argument("--probes", type=opt.names, default=",".join(PROBES),
                        help=f"comma-separated, some of {','.join(PROBES)} (default: all; see each probe's group)")
    parser.add_argument("--layers", type=opt.layer_spec, default="all",
                        help="all | -1 | 0,5,11 | last:K (default: all)")
    pools = ProbeRunConfig.default("pools")
    parser.add_argument("--pool", type=opt.names, default=",".join(pools),
                        help=f"{ProbeRunConfig.field_help('pools')} (default: {','.join(pools)}) "
                             f"[{ProbeRunConfig.field_source('pools')}]")
    # --num-workers is the data group's; --pool above keeps its singular name.
    add_config_flags(parser, ProbeRunConfig, where="inca-probe", exclude=("pools", "num_workers"))
    for probe in PROBES.values():
        group = parser.add_argument_group(f"{probe.name} probe", probe.summary)
        add_config_flags(group, probe.config, prefix=probe.prefix, where=probe.name)
    _add_final_norm(parser)
    return parser


def _probe(args: argparse.Namespace) -> int:
    from .probe import REPORT_JSON, run_probe_suite, summary_lines, written_files
    from .probes import ProbeSuiteConfig
    from .probes.ranking import RANK_BY

    config = ProbeSuiteConfig.from_args(args)
    specs, backbone = _suite(args)
    report = run_probe_suite(backbone, specs, str(args.layers), config, args.out,
                             load_task=lambda spec: _load_task(args, spec), overwrite=args.overwrite)
    print("\n".join(summary_lines(report)))
    print(f"\nwritten to {args.out}/ ({', '.join(written_files(args.out, report))}); "
          f"train on the best layers with: inca-train --layers best:K --probe-report {args.out}/{REPORT_JSON} "
          f"(ranked by the {RANK_BY} probe's val accuracy; --rank-by PROBE for another)")
    return 0


def probe_main(argv: Sequence[str] | None = None) -> int:
    return _run(PROBE, _probe, probe_parser, argv, _check_suite)
