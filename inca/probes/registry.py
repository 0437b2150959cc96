"""The registry of probes: one :func:`register_probe` call per probe module.

A probe is a config class (its settings, see :mod:`inca.probes.base`) and a ``fit`` function that scores every
probed layer, ``{layer: {"val": accuracy, "test": accuracy, ...}}``. What ``fit`` reads is declared by
``reads``:

* ``"pooled"``: ``fit(features, labels, num_classes, config, run)`` on pooled features recorded once for
  every probe, ``features[split][layer]`` an ``[N, D]`` array of one pooling, ``labels[split]`` the labels; it
  runs once per pooling (report keys ``NAME/POOL``);
* ``"tokens"``: ``fit(source, backbone, task, layers, config, run)`` trains on the layers' tokens read from
  ``source``, a :class:`~inca.activations.RecordingSource` (report key ``NAME``); token probes run first, so
  their pass over the data also records the pooled features, and they rank the layers for
  ``inca-train --layers best:K`` (they train what it trains).

A probe's settings are named ``{prefix}{field}`` (``--linear-c``, recipe key and ``probe.json`` key
``linear_c``), the prefix being the probe's name and an underscore unless it declares its own (kNN's ``k`` and
``temperature`` keep their first, unprefixed names).

:data:`PROBES` is a :class:`~inca.registry.Registry`: the built-in probes, then those other packages register
through the ``inca.probes`` entry-point group. Probe modules import torch, faiss and scikit-learn only inside
their functions, so ``inca-probe --help`` lists every probe without loading them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inca.config import as_list, config_from_args
from inca.errors import InCAError
from inca.probes.base import ProbeConfig, ProbeRunConfig
from inca.registry import Registry, unknown_name

if TYPE_CHECKING:
    import numpy as np

    from inca.activations import RecordingSource
    from inca.backbone import Backbone
    from inca.tasks import Task

__all__ = ["BUILTIN_PROBES", "PROBES", "READS", "Probe", "ProbeSuiteConfig", "get_probe", "register_probe",
           "setting_keys"]

READS = ("pooled", "tokens")
Scores = dict[int, dict[str, float]]
PooledFit = Callable[
    [Mapping[str, Mapping[int, "np.ndarray"]], Mapping[str, "np.ndarray"], int, ProbeConfig, ProbeRunConfig], Scores
]
TokenFit = Callable[["RecordingSource", "Backbone", "Task", list[int], ProbeConfig, ProbeRunConfig], Scores]


@dataclass(frozen=True)
class Probe:
    """One probe (see the module docstring for ``fit`` and ``reads``); ``prefix`` starts its settings' names."""

    name: str
    config: type[ProbeConfig]
    summary: str
    fit: PooledFit | TokenFit
    reads: str
    prefix: str

    def key(self, field: str) -> str:
        """The name of setting ``field`` on the command line (dashed), in recipes and in ``probe.json``."""
        return f"{self.prefix}{field}"


# Built-in probes in the default ``--probes`` order; other packages' follow, from their entry points.
BUILTIN_PROBES = tuple(f"inca.probes.{name}" for name in ("linear", "knn", "inca"))
PROBES: Registry[Probe] = Registry("probe", "inca.probes", builtins=BUILTIN_PROBES)
# Names of the settings every run shares (``--probes``, ``--pool`` and ProbeRunConfig's): no probe's may take one.
SHARED_KEYS = frozenset({"probes", "pool", *ProbeRunConfig.fields()})


def register_probe(
    name: str, config: type[ProbeConfig], summary: str, *, fit: PooledFit | TokenFit, reads: str = "pooled",
    prefix: str | None = None,
) -> Probe:  # fmt: skip
    """Add a probe to :data:`PROBES` (``--probes`` order is registration order) and return it.

    Every setting needs a default, a help text and a source, and a name (``prefix`` + field, by default
    ``NAME_field``) that no shared setting nor other probe uses: checked here, so a probe missing one fails at
    import.
    """
    if reads not in READS:
        raise ValueError(f"probe {name!r}: reads must be one of {', '.join(READS)}, got {reads!r}")
    config.check_definition(f"probe {name!r}")
    probe = Probe(name, config, summary, fit, reads,
                  f"{name.replace('-', '_')}_" if prefix is None else prefix)
    taken = SHARED_KEYS.union(key for key, (owner, _) in setting_keys().items() if owner != name)
    clash = sorted(taken.intersection(map(probe.key, config.fields())))
    if clash:
        raise ValueError(f"probe {name!r}: settings {clash} are already named (shared or another probe's settings); "
                         "register it with another prefix")
    return PROBES.register(name, probe)


def get_probe(name: str) -> Probe:
    """The registered probe ``name``; an unknown name is a one-line error with the closest match."""
    return PROBES.get_entry(name)


def setting_keys() -> dict[str, tuple[str, str]]:
    """Every registered probe's settings: flat name -> (probe, field)."""
    return {probe.key(field): (probe.name, field) for probe in PROBES.values() for field in probe.config.fields()}


class ProbeSuiteConfig:
    """What one ``inca-probe`` run does: the chosen ``probes`` (default: every registered one, in order), every
    registered probe's config (``configs``; the chosen ones' are used) and the shared :class:`ProbeRunConfig`
    (``run``; its fields read as attributes too: ``config.batch_size``).

    Built from flat settings, as flags, recipes and ``probe.json`` name them: a shared one by its field name
    (``batch_size=64``), a probe's by its key (``linear_c=[1.0]``, ``inca_epochs=2``, kNN's ``k=5``); each is
    typed and checked, an unknown one is a one-line error. :meth:`from_args` reads ``inca-probe``'s flags.
    """

    def __init__(self, *, probes: Sequence[str] | None = None, **values: Any) -> None:
        self.probes = list(PROBES) if probes is None else [str(p).strip() for p in probes]
        keys = setting_keys()
        for key in values:
            if key not in keys and key not in ProbeRunConfig.fields():
                raise unknown_name("probe setting", key, [*ProbeRunConfig.fields(), *keys])
        self.run = ProbeRunConfig.from_values("inca-probe", {k: v for k, v in values.items() if k not in keys})
        for name in self.probes:
            get_probe(name)  # an unknown one is a one-line error naming the closest
        if not self.probes:
            raise InCAError(f"no probes given: use --probes with some of {', '.join(PROBES)}")
        given: dict[str, dict[str, Any]] = {name: {} for name in PROBES}
        for key, value in values.items():
            if key in keys:
                name, field = keys[key]
                given[name][field] = value
        self.configs = {name: PROBES[name].config.from_values(name, items) for name, items in given.items()}

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ProbeSuiteConfig:
        """The run that ``inca-probe``'s parsed flags describe: ``--probes`` and ``--pool`` (comma-separated
        names), :class:`ProbeRunConfig`'s flags and each registered probe's (``--{prefix}{field}``)."""
        pools = ProbeRunConfig.coerce("inca-probe", "pools", [str(p) for p in as_list(args.pool)])
        run = config_from_args(ProbeRunConfig, args, pools=pools)
        settings = {probe.key(field): value for probe in PROBES.values()
                    for field, value in config_from_args(probe.config, args, prefix=probe.prefix).to_dict().items()}
        return cls(probes=[str(p) for p in as_list(args.probes)], **run.to_dict(), **settings)

    def __getattr__(self, name: str) -> Any:
        run = self.__dict__.get("run")
        if run is not None and name in ProbeRunConfig.fields():
            return getattr(run, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """Every setting by its flat name, JSON-ready: the chosen probes, the shared settings and every registered
        probe's (what ``probe.json`` records)."""
        settings = {PROBES[name].key(field): value for name, config in self.configs.items()
                    for field, value in config.to_dict().items()}
        return {"probes": list(self.probes), **self.run.to_dict(), **settings}
