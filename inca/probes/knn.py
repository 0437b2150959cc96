"""``knn``: a weighted k-nearest-neighbour vote on cosine similarity of pooled features (faiss search)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from inca import options as opt
from inca.config import hparam
from inca.probes.base import ProbeConfig, ProbeRunConfig
from inca.probes.registry import Scores, register_probe

DINO_KNN = "Caron et al. 2021 (DINO), facebookresearch/dino eval_knn.py"


@dataclass(frozen=True, kw_only=True)
class KNNProbeConfig(ProbeConfig):
    """The kNN vote: how many neighbours, and how sharply similarity weighs them."""

    k: int = hparam(20, help="neighbours that vote", source=f"{DINO_KNN}: --nb_knn, '20 is usually working the best'",
                    check=opt.positive_int)
    temperature: float = hparam(
        0.07, help="vote temperature T: each neighbour weighs exp(cosine similarity / T)",
        source="Wu et al. 2018, 'Unsupervised Feature Learning via Non-Parametric Instance Discrimination' (its "
               f"weighted kNN, T=0.07); {DINO_KNN}: --temperature",
        check=opt.positive_float,
    )  # fmt: skip


def knn_predict(train: np.ndarray, y_train: np.ndarray, queries: np.ndarray, num_classes: int, k: int,
                temperature: float) -> np.ndarray:
    """Cosine-similarity kNN with a temperature-weighted vote (weights ``exp(sim / T)``), via faiss."""
    import faiss

    # Copies: normalize_L2 works in place, and the inputs are the recorded features other probes read too.
    train = np.array(train, dtype=np.float32, order="C")
    queries = np.array(queries, dtype=np.float32, order="C")
    faiss.normalize_L2(train)
    faiss.normalize_L2(queries)
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    k = min(k, len(train))
    similarity, neighbours = index.search(queries, k)
    weights = np.exp((similarity - similarity[:, :1]) / temperature)  # shifted by the row max: same argmax
    votes = np.zeros((len(queries), num_classes))
    np.add.at(votes, (np.repeat(np.arange(len(queries)), k), y_train[neighbours].ravel()), weights.ravel())
    return votes.argmax(1)


def fit(features: Mapping[str, Mapping[int, np.ndarray]], labels: Mapping[str, np.ndarray], num_classes: int,
        config: KNNProbeConfig, run: ProbeRunConfig) -> Scores:
    """Val and test accuracy of each layer's vote among its train rows."""
    return {
        layer: {split: float((knn_predict(train, labels["train"], features[split][layer], num_classes, config.k,
                                          config.temperature) == labels[split]).mean())
                for split in ("val", "test")}
        for layer, train in features["train"].items()
    }


# Settings without the probe's name: --k and --temperature (recipe and probe.json keys k, temperature) predate it.
register_probe("knn", KNNProbeConfig, "cosine-similarity k-nearest-neighbour vote on pooled features (faiss)",
               fit=fit, reads="pooled", prefix="")
