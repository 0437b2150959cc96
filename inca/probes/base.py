"""What a probe's settings are made of: its own typed :class:`ProbeConfig`, and the :class:`ProbeRunConfig`
every probe of an ``inca-probe`` run shares. This module imports no torch (``inca-probe --help`` is built from
these declarations)."""

from __future__ import annotations

from dataclasses import dataclass

from inca import options as opt
from inca.config import Config, hparam
from inca.methods.base import RunConfig
from inca.options import POOLS

__all__ = ["OURS", "ProbeConfig", "ProbeRunConfig"]

OURS = "inca's own choice"


@dataclass(frozen=True, kw_only=True)
class ProbeConfig(Config):
    """Base of every probe's settings (a frozen, keyword-only dataclass of :func:`~inca.config.hparam` fields)."""


@dataclass(frozen=True, kw_only=True)
class ProbeRunConfig(Config):
    """The settings every probe of a run shares: the poolings, the batches and seed, and where activations
    come from (``memory_budget_gb``, ``cache_dir`` and ``num_workers`` change no result)."""

    pools: list[str] = hparam(
        list(POOLS), help="pooling of a layer's tokens for the probes on pooled features: cls (the class token), "
                          "mean (of the patch tokens)",
        source=f"{OURS}: both, compared per layer (a backbone without a class token skips cls)",
        check=opt.choice(*POOLS),
    )  # fmt: skip
    batch_size: int = hparam(
        RunConfig.default("batch_size"), help="batch size of the backbone pass and of the token probes' training",
        source=f"{OURS}: inca-compare's batch size ({RunConfig.default('batch_size')}), so that a layer's probes and "
               "the methods compared on the same backbone see batches of one size",
        check=opt.positive_int,
    )  # fmt: skip
    seed: int = hparam(0, help="seed of the probes' initialisation, batch order and solvers",
                       source=f"{OURS}: the seed of every inca command", check=opt.seed)
    memory_budget_gb: float = hparam(
        8.0, help="keep streamed tokens in memory up to this size so later epochs of a token probe (InCA) skip "
                  "the backbone",
        source=f"{OURS}: what a workstation holds beside a ViT-B", check=opt.non_negative_float,
    )  # fmt: skip
    cache_dir: str | None = hparam(
        None, help="read a matching activation store from here when one exists (probing never builds one)",
        source="inca's store location: $INCA_CACHE, else ~/.cache/inca",
    )  # fmt: skip
    num_workers: int | None = hparam(
        None, help="image decoding workers (None: auto)",
        source="inca's image loader: in-memory tasks in the main process, file-backed ones in up to 8 workers",
    )  # fmt: skip
