"""The InCA grid and its training settings, declared once: ``inca-train``'s flags and recipe keys, the ``inca``
comparison method's hyper-parameters and :func:`~inca.train.runner.train_inca_task`'s config all come from here.

This module imports no torch, so ``inca-train --help`` and ``inca-compare --help`` stay light.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import options as opt
from ..config import Config, hparam
from ..errors import InCAError
from ..io import DEFAULT_MAX_STORE_GB, DEFAULT_MEMORY_FRACTION
from .halving import SEARCHES, SuccessiveHalving

if TYPE_CHECKING:
    from ..adapters.inca import AdapterSpec

__all__ = ["SCHEDULES", "SCHEDULE_HELP", "InCAGridConfig", "InCATrainConfig", "SearchConfig"]

PAPER = ("Dukler et al., 'Your representations are in the network: composable and parallel adaptation for large "
         "scale models', NeurIPS 2023 (arXiv:2303.04105)")
OWN = "inca's own choice"
# The learning-rate schedules every trainer offers after its linear warm-up (inca.train.optim.lr_schedule); here, not
# beside the torch code, so that configs are read without importing torch.
SCHEDULES = ("cosine", "linear", "constant")
SCHEDULE_HELP = (f"learning rate after the linear warm-up, one of {' | '.join(SCHEDULES)}: a cosine or linear decay to "
                 "0 at the last step, or constant")
TIMM_SCHEDULE = "timm's train.py default (--sched cosine)"
HALVING = "Jamieson & Talwalkar, AISTATS 2016; Hyperband, Li et al., JMLR 2018; ASHA, Li et al., MLSys 2020"


@dataclass(frozen=True, kw_only=True)
class SearchConfig(Config):
    """How a bank searches its grid: every adapter for every epoch, or successive halving on validation accuracy
    (:class:`~inca.train.halving.SuccessiveHalving`)."""

    search: str = hparam(
        "grid", check=opt.choice(*SEARCHES),
        help="grid: every adapter trains for every epoch; halving: successive halving, at each rung only the best "
             "1/ETA adapters by validation accuracy go on training (the others keep their best epoch so far)",
        source=f"{OWN}: the full grid, as it always trained; halving spends a fraction of its adapter-epochs "
               f"({HALVING})",
    )  # fmt: skip
    halving_rate: int = hparam(
        3, check=opt.int_at_least(2), help="ETA of the halving search: keep the best ceil(n/ETA) adapters at each rung",
        source="Hyperband (Li et al., JMLR 2018) suggests ETA = 3 or 4 and runs its experiments at 3; successive "
               "halving as Jamieson & Talwalkar (AISTATS 2016) state it is ETA = 2; ASHA (Li et al., MLSys 2020) "
               "prunes the same way, asynchronously",
    )  # fmt: skip
    min_epochs: int = hparam(
        0, check=opt.non_negative_int,
        help="epochs R before the first rung of the halving search; rungs follow at R*ETA, R*ETA^2, ... (0: the R "
             "whose rungs end at the last epoch, e.g. rungs after epochs 1 and 3 of 9)",
        source="Hyperband (Li et al., JMLR 2018): the most aggressive bracket, whose rungs grow by ETA up to the "
               "full budget",
    )  # fmt: skip

    def halving(self) -> SuccessiveHalving | None:
        """The successive-halving schedule of ``--search halving`` (None for ``grid``)."""
        if self.search != "halving":
            return None
        return SuccessiveHalving(self.halving_rate, self.min_epochs or None)

    @classmethod
    def recorded(cls, settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        """``settings`` (a report's configuration, search fields named ``{prefix}{field}``) without the search
        fields when the search is the grid, which they do not change: the configuration earlier reports recorded,
        so their runs are still recognised as the same."""
        if settings.get(f"{prefix}search") != "grid":
            return settings
        return {k: v for k, v in settings.items() if k not in {f"{prefix}{f}" for f in SearchConfig.fields()}}

    def check_search(self, epochs: int) -> None:
        """Refuse a halving schedule that cannot run for ``epochs`` epochs (its first rung after the last epoch)."""
        halving = self.halving()
        if halving is not None:
            halving.rungs(epochs)


@dataclass(frozen=True, kw_only=True)
class InCAGridConfig(SearchConfig):
    """A bank's adapters: each list is an axis of the grid (the bank trains every combination at once), with the
    warm-up they share and where their activations come from. ``inca-train`` and the ``inca`` comparison method
    both set these."""

    lr: list[float] = hparam(
        [1e-3], help="learning rates (grid)", check=opt.positive_float,
        source=f"{OWN}: AdamW's usual rate for a small module trained from scratch; a grid such as 1e-3,3e-4 "
               "costs one bank, which trains every value at once",
    )  # fmt: skip
    weight_decay: list[float] = hparam(
        [1e-4], help="AdamW weight decays (grid)", check=opt.non_negative_float,
        source=f"{OWN}: light decay, as the adapter is small and keeps the weights of its best validation epoch",
    )  # fmt: skip
    warmup_ratio: float = hparam(
        0.1, help="fraction of all steps that warm the learning rate up linearly, before the schedule's decay",
        check=opt.ratio, source=f"{OWN}: a tenth of training, the end-to-end methods' warm-up too",
    )  # fmt: skip
    schedule: str = hparam(
        "cosine", check=opt.choice(*SCHEDULES),
        help=SCHEDULE_HELP, source=f"{OWN}: cosine, {TIMM_SCHEDULE}, as the bank has always trained",
    )  # fmt: skip
    queries: list[int] = hparam([1], help="learned queries per adapter (grid)", check=opt.positive_int,
                                source=f"{PAPER}: an InCA adapter cross-attends with one learned query")
    heads: list[int] = hparam([], help="attention heads per adapter (grid; default: the backbone's number of heads)",
                              check=opt.positive_int, source=f"{PAPER}: the backbone's number of heads")
    mlp_ratio: list[float] = hparam([0.0], help="adapter MLP width / model width, 0 = no MLP (grid)",
                                    check=opt.non_negative_float, source=f"{PAPER}: no MLP")
    cache: str = hparam(
        "auto", check=opt.choice(*opt.CACHE_MODES),
        help=f"where activations come from, one of {' | '.join(opt.CACHE_MODES)}. auto: reuse or build an on-disk "
             "store when it pays off, else stream live activations; reuse: read a store only if one exists",
        source=f"{OWN}: a store pays off from the second epoch, when it fits the size limit and half the free disk",
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in self.grid_axes():
            if not getattr(self, key) and key != "heads":  # no heads: the backbone's number
                raise InCAError(f"--{key.replace('_', '-')} needs at least one value")

    @classmethod
    def recorded(cls, settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        """As :meth:`SearchConfig.recorded`, and without the schedule when it is cosine, the one schedule of the
        reports written before it was a setting."""
        settings = super().recorded(settings, prefix)
        if settings.get(f"{prefix}schedule") != "cosine":
            return settings
        return {k: v for k, v in settings.items() if k != f"{prefix}schedule"}

    @classmethod
    def grid_axes(cls) -> tuple[str, ...]:
        """The fields that are axes of the grid (the lists): the bank trains every combination of their values."""
        return tuple(key for key in cls.fields() if isinstance(cls.default(key), list))


@dataclass(frozen=True, kw_only=True)
class InCATrainConfig(InCAGridConfig):
    """Everything about one task's InCA bank except the backbone, the task and the layers: the grid, its seeds,
    the schedule, the activation store and the ensemble (:func:`~inca.train.runner.train_inca_task`)."""

    adapter_seeds: list[int] = hparam(
        [0], help="adapter initialisation seeds (grid)", check=opt.seed,
        source=f"{OWN}: one draw per grid point; more seeds give --ensemble members that differ in their draw",
    )  # fmt: skip
    epochs: int = hparam(10, help="passes over the train split", check=opt.positive_int,
                         source=f"{OWN}: a short schedule; every adapter keeps its best validation epoch")
    batch_size: int = hparam(opt.BATCH_SIZE, help="rows per step (per rank under torchrun)", check=opt.positive_int,
                             source=f"{OWN}: every command's batch size (inca.options.BATCH_SIZE); a ViT-B's tokens "
                                    "of all 12 layers for 64 images are 0.47 GB in float32")
    seed: int = hparam(0, help="seed of the batch order", check=opt.seed,
                       source=f"{OWN}: any fixed seed makes a rerun bit-identical")
    cache_dir: str | None = hparam(None, help="store root (default: $INCA_CACHE or ~/.cache/inca)",
                                   source=f"{OWN}: a per-user cache directory, as timm's and HF's hubs use")
    cache_dtype: str = hparam(
        "float16", help=f"element type of the store, one of {' | '.join(opt.CACHE_DTYPES)} (int8: 0.54x the bytes of "
                        "float16, per-token scales over channel groups with each token's largest values in float16; "
                        "a store of another dtype is refused)",
        check=opt.choice(*opt.CACHE_DTYPES),
        source=f"{OWN}: half the bytes of float32, and a ViT's activations fit its range (bfloat16 where not); int8 "
               "halves that again at a measured accuracy cost (README, Activation cache)",
    )  # fmt: skip
    cache_max_gb: float = hparam(DEFAULT_MAX_STORE_GB, help="largest store --cache auto builds",
                                 check=opt.non_negative_float,
                                 source=f"{OWN}: 4 layers of 50,000 images of a ViT-B/16 at 224 px in float16")
    cache_device: str = hparam(
        "auto", check=opt.cache_device,
        help=f"where a store's layers are served from each epoch, one of {' | '.join(opt.CACHE_DEVICES)}. disk: the "
             "memmaps (page cache included); cpu / cuda: loaded once into (pinned) host memory / GPU memory; auto: "
             "the training GPU, else host memory, where they fit in --cache-memory-fraction of the free memory, "
             "else disk",
        source=f"{OWN}: memory serves every epoch without a read; the disk holds what memory cannot",
    )  # fmt: skip
    cache_memory_fraction: float = hparam(
        DEFAULT_MEMORY_FRACTION, check=opt.fraction,
        help="largest share of free host or GPU memory a store held there (--cache-device) may take",
        source=f"{OWN}: half, leaving the rest to the adapters, their optimizer state and the backbone",
    )  # fmt: skip
    num_workers: int | None = hparam(None, help="image decoding workers (default: auto)",
                                     source=f"{OWN}: in-memory tasks decode in the main process, others in up to "
                                            "8 workers (inca.tasks.image_loader)")
    ensemble: int = hparam(
        1, help="also report and save (OUT/<task>-<hash>/ensemble) the average of the top-K adapters by val "
                "(1: the best adapter only)", check=opt.positive_int,
        source=f"{PAPER}: a single top-scoring adapter (their main results); averaging the top K is their "
               "parallel ensembling",
    )  # fmt: skip
    verify_cache: bool = hparam(
        False, help="re-hash every file of an existing activation store (inca-cache --verify) before training",
        source=f"{OWN}: re-hashing reads the whole store; its manifest already refuses another backbone, task "
               "or layer set",
    )  # fmt: skip
    augment: bool = hparam(
        False, help="timm's training augmentation on the train split (streams live activations, never a store)",
        source=f"{OWN}: activations of unaugmented images are computed once and stored for every epoch",
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_search(self.epochs)

    def grid(self, layers: list[int], default_heads: int) -> list[AdapterSpec]:
        """One spec per combination, layer-major (the order of the results table)."""
        from ..adapters.inca import AdapterSpec

        heads = self.heads or [default_heads]
        combos = itertools.product(
            layers, self.lr, self.weight_decay, self.queries, heads, self.mlp_ratio, self.adapter_seeds
        )
        return [
            AdapterSpec(layer=layer, num_heads=h, num_queries=q, mlp_ratio=float(m), lr=float(lr),
                        weight_decay=float(wd), seed=int(s))
            for layer, lr, wd, q, h, m, s in combos
        ]
