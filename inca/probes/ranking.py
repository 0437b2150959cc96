"""Ranking a task's layers by one probe's validation accuracy: which layers ``--layers best:K`` trains on.

The ranking probe is chosen with ``--rank-by`` (:data:`RANK_BY` by default, the most reliable on the demo tasks:
see the README, "Choosing layers"). A probe with several poolings (``linear/cls``, ``linear/mean``) scores a layer
by its best pooling's val accuracy. Layers whose scores are equal are ties, reported as such (``3 > 0 = 1 > 2``);
a tie is broken by the probe's mean val accuracy over its poolings, then by the shallower layer (the backbone pass
that feeds the adapters stops at the deepest layer read, so a shallower layer costs less). Test accuracy never
enters a ranking.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inca.errors import InCAError
from inca.probes.registry import PROBES

if TYPE_CHECKING:
    from inca.backbone import Backbone
    from inca.probes.base import ProbeRunConfig
    from inca.tasks import Task

__all__ = ["RANK_BY", "RANK_BY_SOURCE", "LayerRanking", "best_count", "check_rank_by", "layer_scores", "probe_keys",
           "rank_by_probe", "rank_layers", "rank_on_val", "ranking_text", "tied_with_best"]

logger = logging.getLogger(__name__)

RANK_BY = "inca"
RANK_BY_SOURCE = ("inca's own choice, measured (tools/measure_layer_choice.py; README, Choosing layers): on the demo's "
                  "tasks, with the demo's random ViT and with the pretrained proxy, the InCA probe's val ranking found "
                  "the layers of best trained InCA test accuracy more often than the linear and kNN probes'")

Score = tuple[float, float]  # (best pooling's val accuracy, mean val accuracy over the poolings)


def probe_keys(results: Mapping[str, Any], probe: str) -> list[str]:
    """The report keys of ``probe`` in a task's results: ``NAME`` (token probe) or ``NAME/POOL`` (pooled)."""
    return [key for key in results if key == probe or key.startswith(f"{probe}/")]


def layer_scores(results: Mapping[str, Mapping[Any, Mapping[str, float]]], probe: str) -> dict[int, Score]:
    """Each layer's score by ``probe`` (see the module docstring) from a task's results, as ``probe.json`` holds
    them (layers as text) or as the probes return them; a NaN val accuracy (a diverged adapter) ranks last."""
    keys = probe_keys(results, probe)
    if not keys:
        raise KeyError(probe)
    scores = {}
    for layer in results[keys[0]]:
        vals = [_finite(results[key][layer]["val"]) for key in keys]
        scores[int(layer)] = (max(vals), sum(vals) / len(vals))
    return scores


def _finite(value: float) -> float:
    return -math.inf if value is None or math.isnan(value) else float(value)


def rank_layers(scores: Mapping[int, Sequence[float]]) -> list[int]:
    """Layers best first by their scores, compared in order; equal scores: the shallower layer first."""
    return sorted(scores, key=lambda layer: (*(-s for s in scores[layer]), layer))


def ranking_text(scores: Mapping[int, Score], ranking: Sequence[int]) -> str:
    """The ranking with its ties shown: ``3 > 0 = 1 > 2``, ``=`` joining layers of equal val accuracy (their order
    is the tie-break's)."""
    text = str(ranking[0])
    for before, layer in zip(ranking, ranking[1:]):
        text += f" {'=' if scores[layer][0] == scores[before][0] else '>'} {layer}"
    return text


def tied_with_best(by_layer: Mapping[Any, Mapping[str, float]]) -> list[int]:
    """The layers whose val accuracy equals the best one's (one layer when there is no tie)."""
    best = max(_finite(score["val"]) for score in by_layer.values())
    return [int(layer) for layer, score in by_layer.items() if _finite(score["val"]) == best]


@dataclass(frozen=True)
class LayerRanking:
    """A task's layers ranked by ``probe`` on val: the order, each layer's score, and the order with its ties."""

    probe: str
    ranking: list[int]
    scores: dict[int, Score]

    @property
    def text(self) -> str:
        return ranking_text(self.scores, self.ranking)

    def best(self, count: int) -> list[int]:
        """The ``count`` best-ranked layers, in block order."""
        return sorted(self.ranking[:count])

    def to_dict(self) -> dict[str, Any]:
        """What a report records: the probe, the order and the val accuracy behind it."""
        return {"rank_by": self.probe, "ranking": self.ranking, "ranked": self.text,
                "val": {str(layer): self.scores[layer][0] for layer in self.ranking}}


def rank_by_probe(results: Mapping[str, Mapping[Any, Mapping[str, float]]], probe: str) -> LayerRanking:
    """The ranking of a task's probe results by ``probe`` (which must be among them)."""
    scores = layer_scores(results, probe)
    return LayerRanking(probe, rank_layers(scores), scores)


def check_rank_by(value: Any) -> str:
    """A registered probe's name (a flag's and a config field's check: :class:`argparse.ArgumentTypeError`)."""
    if value not in PROBES:
        raise argparse.ArgumentTypeError(f"expected a probe, one of {', '.join(PROBES)}, got {value!r}")
    return value


def best_count(spec: str) -> int | None:
    """K of a ``best:K`` layer spec (None for any other spec); a K that is not a positive integer is one line."""
    if not spec.strip().lower().startswith("best:"):
        return None
    try:
        count = int(spec.split(":", 1)[1])
    except ValueError:
        raise InCAError(f"layers {spec!r}: use best:K with K a positive integer") from None
    if count < 1:
        raise InCAError(f"layers {spec!r}: K must be at least 1")
    return count


def rank_on_val(backbone: Backbone, task: Task, layers: list[int], probe: str, run: ProbeRunConfig) -> LayerRanking:
    """Rank ``layers`` of ``task`` by running ``probe`` on its train and val splits only: the test split's images
    are never read (a one-row stand-in taken from val takes its place, and its score is discarded)."""
    import numpy as np

    from inca.probes.registry import ProbeSuiteConfig
    from inca.probes.run import run_probes
    from inca.tasks import Task

    splits = {"train": task.splits["train"], "val": task.splits["val"], "test": task.splits["val"].subset(np.arange(1))}
    without_test = Task(task.spec, task.classes, splits, task.identity)
    options = ProbeSuiteConfig(probes=[check_rank_by(probe)], **run.to_dict())
    ranking = rank_by_probe(run_probes(backbone, without_test, layers, options).results, probe)
    logger.info("%s: layers ranked on val by the %s probe: %s", task.name, probe, ranking.text)
    return ranking
