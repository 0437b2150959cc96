"""Activation sources: where open_source reads from (store or live backbone), and the recording source."""

import numpy as np
import pytest
import torch

from inca.activations import CachedSource, LiveSource, RecordingSource, TensorSource, open_source, pool_tokens
from inca.cache import find_cache, store_path
from inca.errors import InCAError
from inca.tasks import SPLITS
from tests.conftest import subset_task

LAYERS = [1, 3]


@pytest.fixture(scope="module")
def small_task():
    return subset_task("synth-colour", {"train": 48, "val": 16, "test": 16})


def test_auto_builds_a_store_for_several_epochs_then_every_mode_but_never_reads_it(tmp_path, tiny_backbone, small_task):
    source = open_source(tiny_backbone, small_task, LAYERS, epochs=2, cache_dir=tmp_path)
    assert isinstance(source, CachedSource) and source.layers == LAYERS
    assert find_cache(tmp_path, tiny_backbone, small_task, LAYERS).path == source.cache.path
    for mode in ("auto", "always", "reuse"):
        again = open_source(tiny_backbone, small_task, [3], epochs=1, cache=mode, cache_dir=tmp_path)
        assert isinstance(again, CachedSource) and again.cache.path == source.cache.path, mode
    assert isinstance(open_source(tiny_backbone, small_task, LAYERS, epochs=2, cache="never", cache_dir=tmp_path),
                      LiveSource)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [({"epochs": 1}, "one epoch"), ({"epochs": 3, "max_gb": 1e-6}, "cache-max-gb"),
     ({"epochs": 3, "cache": "reuse"}, "builds none"), ({"epochs": 3, "cache": "never"}, None)],
)
def test_streaming_builds_no_store(tmp_path, tiny_backbone, small_task, caplog, kwargs, reason):
    with caplog.at_level("INFO", logger="inca.activations"):
        source = open_source(tiny_backbone, small_task, LAYERS, cache_dir=tmp_path, **kwargs)
    assert isinstance(source, LiveSource) and source.layers == LAYERS
    assert not store_path(tmp_path, tiny_backbone, small_task).exists()
    if reason:
        assert "streaming live activations (" in caplog.text and reason in caplog.text


def test_always_builds_even_for_one_epoch(tmp_path, tiny_backbone, small_task):
    source = open_source(tiny_backbone, small_task, LAYERS, epochs=1, cache="always", cache_dir=tmp_path)
    assert isinstance(source, CachedSource)


def test_unknown_cache_mode_is_an_error(tmp_path, tiny_backbone, small_task):
    with pytest.raises(InCAError, match="cache mode 'sometimes' is not one of auto, always, never, reuse"):
        open_source(tiny_backbone, small_task, LAYERS, epochs=2, cache="sometimes", cache_dir=tmp_path)


class CountingSource(TensorSource):
    def __init__(self, *args):
        super().__init__(*args)
        self.batches = 0

    def loader(self, split, batches):
        for item in super().loader(split, batches):
            self.batches += 1
            yield item


def _tensor_source(n: int = 20) -> CountingSource:
    g = torch.Generator().manual_seed(0)
    features = {s: {0: torch.randn(n, 5, 8, generator=g), 2: torch.randn(n, 5, 8, generator=g)} for s in SPLITS}
    return CountingSource(features, {s: np.arange(n) % 3 for s in SPLITS})


@pytest.mark.parametrize("keep_tokens", [True, False])
def test_recording_source_records_pools_once_and_serves_kept_tokens(keep_tokens):
    inner = _tensor_source()
    source = RecordingSource(inner, ["cls", "mean"], num_prefix=1, keep_tokens=keep_tokens)
    batches = [np.arange(0, 7), np.arange(7, 20)]
    first = list(source.loader("train", batches))
    assert inner.batches == 2
    for pool in ("cls", "mean"):
        expected = pool_tokens(inner._features["train"][2], pool, 1).numpy()
        np.testing.assert_array_equal(source.pooled("train", 2, pool), expected)
    assert inner.batches == 2  # the pass above recorded every row: no second pass
    second = list(source.loader("train", batches))
    assert inner.batches == (2 if keep_tokens else 4)
    for (a, ya), (b, yb) in zip(first, second):
        assert torch.equal(ya, yb) and all(torch.equal(a[k].half(), b[k].half()) for k in a)
    # pooled() on an unseen split makes one pass of its own
    assert source.pooled("val", 0, "cls").shape == (20, 8)
