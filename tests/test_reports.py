"""What the commands report: one batch size everywhere, ensemble rules, results.md's legend, split sizes and chance
levels, progress lines in a redirected log, and one trainable-share figure."""

from __future__ import annotations

import inspect

from inca import cli
from inca import options as opt


def test_every_command_and_library_default_uses_one_batch_size():
    from inca.activations import open_source
    from inca.cache import build_cache
    from inca.predict import predict_images
    from inca.train.e2e import FitConfig

    parsers = (cli.cache_parser, cli.compare_parser, cli.train_parser, cli.probe_parser, cli.predict_parser)
    assert {make().options["batch_size"].default for make in parsers} == {opt.BATCH_SIZE}
    defaults = {inspect.signature(f).parameters["batch_size"].default for f in (open_source, build_cache,
                                                                                 predict_images)}
    assert defaults | {FitConfig().batch_size} == {opt.BATCH_SIZE}
