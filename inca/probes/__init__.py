"""Layer probes, one module each, in one registry: what ``inca-probe`` runs on every probed layer.

A probe module declares a config dataclass (typed :func:`~inca.config.hparam` fields with help and the source
of each default) and a ``fit`` function, and ends with one :func:`register_probe` call saying whether ``fit``
reads pooled features or trains on tokens; a built-in is listed in :data:`PROBES`' built-ins, another
package's probe is found through the ``inca.probes`` entry-point group (see :mod:`inca.registry`).
``inca-probe``'s flags, recipe keys and ``--help`` come from the registrations. The suite, its reports and the
layer ranking are :mod:`inca.probe`'s.
"""

from __future__ import annotations

from inca.probes.base import ProbeConfig, ProbeRunConfig
from inca.probes.registry import (
    BUILTIN_PROBES,
    PROBES,
    READS,
    Probe,
    ProbeSuiteConfig,
    get_probe,
    register_probe,
    setting_keys,
)

__all__ = ["BUILTIN_PROBES", "PROBES", "READS", "Probe", "ProbeConfig", "ProbeRunConfig", "ProbeSuiteConfig",
           "get_probe", "register_probe", "setting_keys"]
