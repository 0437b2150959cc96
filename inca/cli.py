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
from .progress import set_quiet


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, unless its text already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, [], False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit 2) instead of usage + error, shows defaults in
    ``--help``; every command takes ``-v``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(formatter_class=_HelpFormatter, **kwargs)
        self.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        self.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress")

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _run(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    from .distributed import launch  # after parsing: --help and usage errors need no torch

    world = launch()  # joins torchrun's process group; a world of one otherwise
    # Other libraries speak at WARNING (their INFO lines, e.g. font caches or SIMD builds, are noise here);
    # inca itself at INFO, DEBUG with -v, WARNING with --quiet (which also silences progress reports).
    where = f"[{world.describe()}] " if world.is_distributed else ""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format=f"%(asctime)s {where}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("inca").setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    set_quiet(quiet)
    try:
        if getattr(args, "recipe", None):
            args = _with_recipe(parser, argv, args)
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


def _is_out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: ``MemoryError``, ``torch.OutOfMemoryError``, or the ``RuntimeError`` torch's CPU
    allocator raises ("DefaultCPUAllocator: can't allocate memory", "not enough memory")."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
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
    group = parser.add_argument_group("data")
    group.add_argument("--data-root", help="root directory for tv:NAME datasets")
    group.add_argument("--download", action="store_true", help="allow torchvision to download tv: datasets")
    group.add_argument("--skip-bad-images", action="store_true",
                       help="drop unreadable image files of folder: tasks (counted in the results) instead of stopping")
    group.add_argument("--split-seed", type=opt.seed, default=0,
                       help="seed of the val/test carving (default 0)")
    group.add_argument("--num-workers", type=opt.non_negative_int, default=None,
                       help="image decoding workers (default: auto)")


def _suite_parser(prog: str, description: str, out: str, out_help: str) -> argparse.ArgumentParser:
    """A multi-task command: backbone and data flags, ``--tasks``, ``--out`` and a ``--recipe`` of them all."""
    parser = _Parser(prog=prog, description=description)
    _add_backbone_args(parser)
    _add_task_args(parser)
    parser.add_argument("--tasks", "--task", dest="tasks", type=opt.names,
                        help=f"task spec(s), comma-separated: {opt.TASK_SPEC_FORMS}")
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
    from .tasks import load_task

    return load_task(spec, data_root=args.data_root, download=args.download, seed=args.split_seed,
                     skip_bad_images=args.skip_bad_images)


def cache_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="inca-cache", description="Build, resume or verify an on-disk activation store.")
    _add_backbone_args(parser)
    _add_task_args(parser)
    parser.add_argument("--task", "--tasks", dest="tasks", type=opt.names,
                        help=f"task spec(s), comma-separated: {opt.TASK_SPEC_FORMS}")
    parser.add_argument("--layers", type=opt.layer_spec, default="all",
                        help="all | -1 | 0,5,11 | last:K (default: all)")
    parser.add_argument("--cache-dir", help="store root (default: $INCA_CACHE or ~/.cache/inca)")
    parser.add_argument("--batch-size", type=opt.positive_int, default=64)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
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
        print(f"ok: {summary['path']}: {summary['backbone']} on {summary['task']}, layers {summary['layers']}, "
              f"rows {summary['rows']}, {summary['files']} files match their checksums")
        return 0
    if not args.backbone:
        raise InCAError("--backbone is required to build a store (or pass --verify DIR)")
    specs = _task_specs(args)
    backbone = _backbone(args)
    layers = resolve_layers(args.layers, backbone.num_blocks)
    for spec in specs:
        task = _load_task(args, spec)
        cache = build_cache(backbone, task, layers, args.cache_dir, args.batch_size, args.dtype,
                            args.num_workers, args.commit_seconds, rebuild=args.rebuild)
        print(f"{task.spec}: {cache.path} (layers {cache.layers}, rows {task.sizes()})")
    return 0


def cache_main(argv: Sequence[str] | None = None) -> int:
    return _run(_cache, cache_parser(), argv)


def compare_parser() -> argparse.ArgumentParser:
    import textwrap

    from .methods import HEAD_INITS, METHODS, PEFT_DIR, methods_help

    parser = _suite_parser(
        "inca-compare",
        textwrap.fill(f"Compare methods ({', '.join(METHODS)}) on the same backbone, splits, batches and seed; "
                      "writes compare.json/.md and two plots.", 78),
        out="compare", out_help="output directory; a rerun skips finished pairs",
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the method table's layout
    parser.epilog = methods_help(78)
    parser.add_argument("--methods", type=opt.names, help=f"comma-separated, default all: {','.join(METHODS)}")
    parser.add_argument("--method-args", nargs="*", action="extend", default=[], metavar="METHOD.KEY=VALUE",
                        help="override a method's default hyper-parameter, e.g. lora.rank=4 linear.pool=mean "
                             "(repeatable; later values win, flags over the recipe's; see the list below)")
    parser.add_argument("--epochs", type=opt.positive_int, default=10, help="epochs for every method (default 10)")
    parser.add_argument("--batch-size", type=opt.positive_int, default=32,
                        help="batch size for every method (default 32)")
    parser.add_argument("--seed", type=opt.seed, default=0,
                        help="seed of heads, adapters and batch order (default 0)")
    exporters = ", ".join(name for name, method in METHODS.items() if method.export is not None)
    parser.add_argument("--export-peft", action="store_true",
                        help=f"also write each trained {exporters} model as a PEFT LoRA adapter, to "
                             f"OUT/runs/<task>-<hash>/<method>/{PEFT_DIR}/ (pairs a rerun skips are not re-exported)")
    protocol = parser.add_argument_group("protocol (the same for every method; recorded in compare.json)")
    protocol.add_argument("--head-init", choices=HEAD_INITS, default="linear-probe",
                          help="how the new head of the end-to-end methods starts: fitted on frozen features first "
                               "(linear-probe-then-fine-tune), timm's random draw, or zeros (then no gradient "
                               "reaches the backbone at step 0 and LoRA-GA has nothing to approximate)")
    protocol.add_argument("--augment", action="store_true",
                          help="timm's training augmentation (create_transform(is_training=True)) on the train "
                               "split of every method that sees images; InCA then streams live activations")
    protocol.add_argument("--lr-grid", type=opt.positive_int, default=1, metavar="K",
                          help="tune each method's learning rate over K values x3 apart around its default, "
                               "selected on val (Compacter also over its reduction factor); 1: no tuning")
    _add_final_norm(protocol)
    return parser


def _with_recipe(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                 args: argparse.Namespace) -> argparse.Namespace:
    """Recipe values become the parser's defaults, so flags given on the command line override them."""
    from .recipe import load_recipe

    actions = {action.dest: action for action in parser._actions if action.dest not in ("help", "recipe")}
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


def _suite(args: argparse.Namespace):
    """The task specs and the loaded backbone of a multi-task command (flags or recipe)."""
    if not args.backbone:
        raise InCAError("--backbone is required (on the command line or as backbone: in the --recipe)")
    from .io import check_directory

    check_directory(args.out, "--out")  # before anything loads
    return _task_specs(args), _backbone(args)


def _task_specs(args: argparse.Namespace) -> list[str]:
    """The task specs of ``--tasks``, each checked before anything is loaded."""
    from .tasks import check_task_spec, parse_task_list

    specs = parse_task_list(args.tasks or [])
    for spec in specs:
        check_task_spec(spec, args.data_root)
    return specs


def _compare(args: argparse.Namespace) -> int:
    from .compare import REPORT_FILE, render_markdown, run_comparison
    from .methods import METHODS, RunSettings, resolve_methods

    methods = resolve_methods(args.methods or list(METHODS), args.method_args)
    specs, backbone = _suite(args)
    settings = RunSettings(args.epochs, args.batch_size, args.seed, args.num_workers, export_peft=args.export_peft,
                           head_init=args.head_init, augment=args.augment, lr_grid=args.lr_grid)
    summary = run_comparison(backbone, specs, methods, settings, args.out, load=lambda spec: _load_task(args, spec),
                             overwrite=args.overwrite)
    print(render_markdown(summary), end="")
    print(f"\nwritten to {args.out}/ ({REPORT_FILE}, compare.json, compare_accuracy_vs_params.png, compare_loss.png)")
    return 0


def compare_main(argv: Sequence[str] | None = None) -> int:
    return _run(_compare, compare_parser(), argv)


def train_parser() -> argparse.ArgumentParser:
    parser = _suite_parser(
        "inca-train",
        "Train grids of InCA adapters in parallel on frozen-backbone activations, task after task.",
        out="runs/train", out_help="output directory (default runs/train)",
    )
    parser.add_argument("--layers", type=opt.layer_spec, default="all",
                        help="all | -1 | 0,5,11 | last:K | best:K with --probe-report (default: all)")
    parser.add_argument("--probe-report", help="probe.json written by inca-probe, for --layers best:K")
    grid = parser.add_argument_group("adapter grid (comma-separated or repeated values; the cross product is trained)")
    grid.add_argument("--lr", nargs="+", type=opt.grid(opt.positive_float), default=["1e-3"],
                      help="learning rates (default 1e-3)")
    grid.add_argument("--weight-decay", nargs="+", type=opt.grid(opt.non_negative_float), default=["1e-4"],
                      help="weight decays (default 1e-4)")
    grid.add_argument("--queries", nargs="+", type=opt.grid(opt.positive_int), default=["1"],
                      help="learned queries per adapter (default 1)")
    grid.add_argument("--heads", nargs="+", type=opt.grid(opt.positive_int), default=[],
                      help="attention heads (default: the backbone's)")
    grid.add_argument("--mlp-ratio", nargs="+", type=opt.grid(opt.non_negative_float), default=["0"],
                      help="adapter MLP ratio, 0 = none (default 0)")
    grid.add_argument("--adapter-seeds", nargs="+", type=opt.grid(opt.seed), default=["0"],
                      help="adapter init seeds (default 0)")
    run = parser.add_argument_group("training")
    run.add_argument("--epochs", type=opt.positive_int, default=10)
    run.add_argument("--batch-size", type=opt.positive_int, default=64)
    run.add_argument("--warmup-ratio", type=opt.ratio, default=0.1)
    run.add_argument("--seed", type=opt.seed, default=0, help="seed of the batch order (default 0)")
    run.add_argument("--cache", default="auto", choices=["auto", "always", "never", "reuse"],
                     help="auto: reuse or build a store when it pays off, else stream live activations; "
                          "reuse: read a store only if one exists")
    run.add_argument("--cache-dir", help="store root (default: $INCA_CACHE or ~/.cache/inca)")
    run.add_argument("--cache-dtype", default="float16", choices=["float16", "bfloat16"])
    run.add_argument("--cache-max-gb", type=opt.non_negative_float, default=64.0,
                     help="largest store --cache auto builds")
    run.add_argument("--verify-cache", action="store_true",
                     help="re-hash every file of an existing activation store (inca-cache --verify) before training")
    run.add_argument("--ensemble", type=opt.positive_int, default=1, metavar="K",
                     help="also report and save (OUT/<task>-<hash>/ensemble) the average of the top-K adapters by val "
                          "(default 1: the best adapter only)")
    run.add_argument("--augment", action="store_true",
                     help="timm's training augmentation on the train split (streams live activations, never a store)")
    return parser


def _train(args: argparse.Namespace) -> int:
    from .probe import layers_from_report
    from .recipe import as_list
    from .suite import render_results, run_train_suite
    from .train.runner import InCAOptions

    options = InCAOptions(
        lr=[float(v) for v in as_list(args.lr)],
        weight_decay=[float(v) for v in as_list(args.weight_decay)],
        queries=[int(v) for v in as_list(args.queries)],
        heads=[int(v) for v in as_list(args.heads)],
        mlp_ratio=[float(v) for v in as_list(args.mlp_ratio)],
        adapter_seeds=[int(v) for v in as_list(args.adapter_seeds)],
        epochs=args.epochs, batch_size=args.batch_size, warmup_ratio=args.warmup_ratio, seed=args.seed,
        cache=args.cache, cache_dir=args.cache_dir, cache_dtype=args.cache_dtype, cache_max_gb=args.cache_max_gb,
        num_workers=args.num_workers, ensemble=args.ensemble, verify_cache=args.verify_cache, augment=args.augment,
    )
    specs, backbone = _suite(args)
    layers_for = layers_from_report(str(args.layers), backbone.num_blocks, args.probe_report)
    results = run_train_suite(backbone, specs, layers_for, str(args.layers), options, args.out,
                              load_task=lambda spec: _load_task(args, spec), overwrite=args.overwrite)
    print(render_results(results).split("\n## ")[0], end="")
    print(f"\nwritten to {args.out}/ (results.json, results.md, <task>-<fingerprint>/adapter/)")
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    return _run(_train, train_parser(), argv)


def predict_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="inca-predict",
        description="Classify images with adapters saved by inca-train: every task from one backbone pass per batch. "
                    "Exit code 0: every image predicted; 1: some images could not be read (each is named) and the "
                    "rows of all the others are written; 2: bad input, nothing written.",
    )
    parser.add_argument("--adapter", action="append", metavar="[NAME=]DIR",
                        help="an adapter or ensemble directory (OUT/<task>-<hash>/adapter); repeat for more tasks")
    parser.add_argument("--images", nargs="+", help="image files or directories")
    parser.add_argument("--weights", help="backbone weights if not the recorded ones (must be identical)")
    parser.add_argument("--device", type=opt.device, default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--top-k", type=opt.positive_int, default=1, help="classes reported per task (default 1)")
    parser.add_argument("--batch-size", type=opt.positive_int, default=64)
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
    from .predict import check_output_file, expand_images, format_predictions, predict_images

    if args.resign:
        for directory in args.resign:
            changed = resign_adapter(directory)
            print(f"{directory}: signed ({'; '.join(changed)})" if changed else f"{directory}: unchanged")
        return 0
    if not args.adapter or not args.images:
        raise InCAError("--adapter and --images are required (or --resign DIR to accept an edited adapter config)")
    pairs = [item.partition("=") if "=" in item and not os.path.exists(item) else ("", "", item)
             for item in args.adapter]
    named = {name: directory for name, _, directory in pairs if name}
    if named and len(named) != len(pairs):
        raise InCAError("--adapter: name every adapter (NAME=DIR, names distinct) or none")
    adapters = named or [directory for _, _, directory in pairs]
    if args.output:
        check_output_file(args.output)
    files = expand_images(args.images)
    model = MultiTaskInCA.from_saved(adapters, args.weights, resolve_device(args.device))
    fmt = args.format or ("jsonl" if str(args.output or "").endswith((".json", ".jsonl")) else "csv")
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


def predict_main(argv: Sequence[str] | None = None) -> int:
    return _run(_predict, predict_parser(), argv)


def probe_parser() -> argparse.ArgumentParser:
    parser = _suite_parser(
        "inca-probe", "Which layers hold the most useful representations for a task?",
        out="runs/probe", out_help="output directory (default runs/probe)",
    )
    parser.add_argument("--probes", type=opt.names, default="linear,knn,inca",
                        help="some of linear,knn,inca (default: all)")
    parser.add_argument("--layers", type=opt.layer_spec, default="all",
                        help="all | -1 | 0,5,11 | last:K (default: all)")
    parser.add_argument("--pool", type=opt.names, default="cls,mean",
                        help="pooling for linear and knn: cls, mean (default both)")
    parser.add_argument("--k", type=opt.positive_int, default=20, help="kNN neighbours (default 20)")
    parser.add_argument("--temperature", type=opt.positive_float, default=0.07,
                        help="kNN vote temperature (default 0.07)")
    parser.add_argument("--linear-c", type=opt.grid(opt.positive_float), default="0.01,0.1,1,10",
                        help="C grid of the linear probe, tuned on val")
    parser.add_argument("--inca-epochs", type=opt.positive_int, default=5, help="epochs of the InCA probe (default 5)")
    parser.add_argument("--inca-lr", type=opt.positive_float, default=3e-3, help="learning rate of the InCA probe")
    parser.add_argument("--batch-size", type=opt.positive_int, default=32)
    parser.add_argument("--seed", type=opt.seed, default=0)
    parser.add_argument("--memory-budget-gb", type=opt.non_negative_float, default=8.0,
                        help="keep streamed tokens in memory up to this size so later InCA epochs skip the backbone")
    parser.add_argument("--cache-dir", help="read a matching activation store from here when one exists")
    _add_final_norm(parser)
    return parser


def _probe(args: argparse.Namespace) -> int:
    from .probe import REPORT_JSON, ProbeOptions, run_probe_suite, summary_lines
    from .recipe import as_list

    options = ProbeOptions(
        probes=[str(p) for p in as_list(args.probes)], pools=[str(p) for p in as_list(args.pool)], k=args.k,
        temperature=args.temperature, linear_c=[float(c) for c in as_list(args.linear_c)], inca_lr=args.inca_lr,
        inca_epochs=args.inca_epochs, batch_size=args.batch_size, seed=args.seed,
        memory_budget_gb=args.memory_budget_gb, cache_dir=args.cache_dir, num_workers=args.num_workers,
    )
    specs, backbone = _suite(args)
    report = run_probe_suite(backbone, specs, str(args.layers), options, args.out,
                             load_task=lambda spec: _load_task(args, spec), overwrite=args.overwrite)
    print("\n".join(summary_lines(report)))
    print(f"\nwritten to {args.out}/ ({REPORT_JSON}, probe.md, PNG plots); "
          f"train on the best layers with: inca-train --layers best:K --probe-report {args.out}/{REPORT_JSON}")
    return 0


def probe_main(argv: Sequence[str] | None = None) -> int:
    return _run(_probe, probe_parser(), argv)
