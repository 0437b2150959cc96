"""``linear``: scikit-learn logistic regression on standardised pooled features, its C tuned on val."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from inca import options as opt
from inca.config import hparam
from inca.probes.base import OURS, ProbeConfig, ProbeRunConfig
from inca.probes.registry import Scores, register_probe

# L-BFGS iterations per fit: inca's own choice, twice the 1,000 of CLIP's logistic-regression probes (Radford
# et al. 2021, appendix A.3) and far above scikit-learn's 100, which stop before convergence on these features.
MAX_ITER = 2000


@dataclass(frozen=True, kw_only=True)
class LinearProbeConfig(ProbeConfig):
    """The linear probe's regularisation grid."""

    c: list[float] = hparam(
        [0.01, 0.1, 1.0, 10.0], help="grid of C (inverse L2 strength) of the logistic regression, the best on val "
                                     "kept",
        source=f"{OURS}: four decades around scikit-learn's C=1, a coarse version of CLIP's sweep of the "
               "L2 strength on val (Radford et al. 2021, appendix A.3) that keeps a probe of every layer cheap",
        check=opt.positive_float,
    )  # fmt: skip


def linear_probe(train: np.ndarray, y_train: np.ndarray, val: np.ndarray, y_val: np.ndarray, test: np.ndarray,
                 y_test: np.ndarray, c_grid: Sequence[float], seed: int = 0) -> dict[str, float]:
    """Logistic regression on standardised features; C chosen on val, reported on test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    train, val, test = scaler.transform(train), scaler.transform(val), scaler.transform(test)
    best: tuple[float, float, LogisticRegression] | None = None
    for c in c_grid:
        model = LogisticRegression(C=c, max_iter=MAX_ITER, random_state=seed).fit(train, y_train)
        accuracy = float((model.predict(val) == y_val).mean())
        if best is None or accuracy > best[0]:
            best = (accuracy, c, model)
    accuracy, c, model = best
    return {"val": accuracy, "test": float((model.predict(test) == y_test).mean()), "C": c}


def fit(features: Mapping[str, Mapping[int, np.ndarray]], labels: Mapping[str, np.ndarray], num_classes: int,
        config: LinearProbeConfig, run: ProbeRunConfig) -> Scores:
    """One logistic regression per layer, the layers fitted in parallel threads."""
    from joblib import Parallel, delayed
    from threadpoolctl import threadpool_limits

    layers = list(features["train"])
    jobs = (
        delayed(linear_probe)(features["train"][layer], labels["train"], features["val"][layer], labels["val"],
                              features["test"][layer], labels["test"], config.c, run.seed)
        for layer in layers
    )
    # Small BLAS calls in many threads: one BLAS thread each (oversubscription made fits ~100x slower).
    with threadpool_limits(1):
        return dict(zip(layers, Parallel(n_jobs=min(len(layers), os.cpu_count() or 1), prefer="threads")(jobs)))


register_probe("linear", LinearProbeConfig, "logistic regression on standardised pooled features, C tuned on val",
               fit=fit, reads="pooled")
