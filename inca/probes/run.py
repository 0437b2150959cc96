"""Running the chosen probes on every layer of a task, from one backbone pass per batch.

A :class:`~inca.activations.RecordingSource` wraps the activation source (a matching store when one exists, else
the live backbone; probing never builds a store) and, the first time it serves a split's rows, records what the
probes need: pooled features (CLS token, mean of patch tokens) for the probes on pooled features (linear, kNN),
and, within a memory budget, the tokens themselves so that further epochs of a probe training on tokens (InCA)
cost no backbone pass. ``inca-probe``'s reports (:mod:`inca.probe`) and the layer ranking of a comparison
(:func:`inca.probes.ranking.rank_on_val`) both run probes through :func:`run_probes`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from inca.errors import InCAError
from inca.probes.registry import ProbeSuiteConfig, Scores, get_probe

if TYPE_CHECKING:
    from inca.backbone import Backbone
    from inca.tasks import Task

__all__ = ["ProbeRun", "run_probes", "usable_pools"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeRun:
    """What :func:`run_probes` found: per report key (``NAME`` for a token probe, ``NAME/POOL`` for a pooled one)
    each layer's scores, where the activations came from and how many backbone passes it took."""

    results: dict[str, Scores]
    activations: str
    backbone_forward_calls: int


def run_probes(backbone: Backbone, task: Task, layers: list[int], options: ProbeSuiteConfig) -> ProbeRun:
    """Every chosen probe on every layer of ``task``. Probes training on tokens run first (their passes over the
    data also record the pooled features), then the probes on pooled features, once per pooling."""
    from inca.activations import CachedSource, LiveSource, RecordingSource, open_source
    from inca.cache import store_bytes
    from inca.tasks import SPLITS

    run = options.run
    pools = usable_pools(backbone, options)
    if len(pools) < len(run.pools):
        logger.info("%s has no CLS token: the cls pool is skipped", backbone.name)
    # epochs only weighs building a store, which "reuse" never does; a store of any dtype is read as it is.
    source = open_source(backbone, task, layers, epochs=1, cache="reuse", cache_dir=run.cache_dir, dtype=None,
                         num_workers=run.num_workers)
    # Tokens are kept as float16, exactly the size of a float16 store of these layers.
    keep = isinstance(source, LiveSource) and store_bytes(backbone, task, layers) <= run.memory_budget_gb * 1e9
    probes = [get_probe(name) for name in options.probes]
    token_probes = [probe for probe in probes if probe.reads == "tokens"]
    pooled_probes = [probe for probe in probes if probe.reads == "pooled"]
    probe_source = RecordingSource(source, pools if pooled_probes else [], backbone.num_prefix_tokens,
                                   keep_tokens=keep)
    results: dict[str, Scores] = {}
    for probe in token_probes:
        results[probe.name] = probe.fit(probe_source, backbone, task, layers, options.configs[probe.name], run)
    if pooled_probes:
        features = {pool: {split: {layer: probe_source.pooled(split, layer, pool) for layer in layers}
                           for split in SPLITS} for pool in pools}
        labels = {split: task.splits[split].labels for split in SPLITS}
        for probe in pooled_probes:
            for pool in pools:
                scores = probe.fit(features[pool], labels, task.num_classes, options.configs[probe.name], run)
                results[f"{probe.name}/{pool}"] = {layer: scores[layer] for layer in layers}
    return ProbeRun(results, "cache" if isinstance(source, CachedSource) else "live",
                    source.forward_calls if isinstance(source, LiveSource) else 0)


def usable_pools(backbone: Backbone, options: ProbeSuiteConfig) -> list[str]:
    """The requested pools the backbone has tokens for (without a class token there is no cls pool); refused in
    one line when the pooled probes asked for would be left with none."""
    pools = [p for p in options.run.pools if p != "cls" or backbone.token_layout["cls_token"]]
    pooled = [name for name in options.probes if get_probe(name).reads == "pooled"]
    if not pools and pooled:
        raise InCAError(f"{backbone.name} has no class token, so the {', '.join(pooled)} probe(s) cannot pool it: "
                        "use --pool mean (or --probes with token probes only, such as inca)")
    return pools
