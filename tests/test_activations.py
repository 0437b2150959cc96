"""Activation sources: where open_source reads from (store or live backbone), and the recording source."""

import numpy as np
import pytest
import torch

import inca.activations as activations
from inca.activations import CachedSource, LiveSource, RecordingSource, TensorSource, open_source, pool_tokens
from inca.adapters.inca import AdapterSpec
from inca.cache import build_cache, find_cache, store_path
from inca.errors import InCAError
from inca.placement import Rates, Workload, cache_device, decide, measure_rates
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
    def __init__(self, features, labels):
        super().__init__(features, labels)
        self.features = features  # as given: what the tests compare against, read without a pass
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
        expected = pool_tokens(inner.features["train"][2], pool, 1).numpy()
        np.testing.assert_array_equal(source.pooled("train", 2, pool), expected)
    assert inner.batches == 2  # the pass above recorded every row: no second pass
    second = list(source.loader("train", batches))
    assert inner.batches == (2 if keep_tokens else 4)
    for (a, ya), (b, yb) in zip(first, second):
        assert torch.equal(ya, yb) and all(torch.equal(a[k].half(), b[k].half()) for k in a)
    # pooled() on an unseen split makes one pass of its own
    assert source.pooled("val", 0, "cls").shape == (20, 8)


# ----------------------------------------------------------------------------------------------------
# cache="auto" by measurement, and where a store is held.
# ----------------------------------------------------------------------------------------------------

# A CPU: the backbone is slow against reading a store. A fast GPU on a slow disk: the other way round.
SLOW_BACKBONE = Rates(backbone_images=200, store_read_bytes=2e9, store_write_bytes=1e9, adapter_train_rows=5e3,
                      adapter_eval_rows=2e4)
FAST_BACKBONE = Rates(backbone_images=5e4, store_read_bytes=5e7, store_write_bytes=5e7, adapter_train_rows=1e6,
                      adapter_eval_rows=3e6)


def test_decide_picks_the_cheaper_run():
    work = Workload({"train": 1000, "val": 200, "test": 200}, epochs=10, row_bytes=400_000)
    build = decide(SLOW_BACKBONE, work)
    assert build.choice == "build" and build.store_seconds < build.stream_seconds
    assert build.stream_epoch_seconds == pytest.approx(1200 / 200 + 1000 / 5e3 + 200 / 2e4)
    assert build.store_epoch_seconds == pytest.approx(max(1200 * 4e5 / 2e9, 1000 / 5e3 + 200 / 2e4))
    stream = decide(FAST_BACKBONE, work)
    assert stream.choice == "stream" and stream.stream_seconds < stream.store_seconds
    assert decide(FAST_BACKBONE, Workload(work.rows, epochs=10, row_bytes=100)).choice == "build"  # a tiny store


@pytest.mark.parametrize(("rates", "kind", "choice"), [(SLOW_BACKBONE, CachedSource, "build"),
                                                       (FAST_BACKBONE, LiveSource, "stream")])
def test_auto_follows_the_measured_rates(tmp_path, tiny_backbone, small_task, monkeypatch, caplog, rates, kind,
                                         choice):
    measured = []
    monkeypatch.setattr(activations, "measure_rates", lambda *args, **kwargs: measured.append(args) or rates)
    with caplog.at_level("INFO", logger="inca.activations"):
        source = open_source(tiny_backbone, small_task, LAYERS, epochs=20, cache_dir=tmp_path)
    assert isinstance(source, kind) and len(measured) == 1
    assert source.decision["choice"] == choice and source.decision["rates"]["backbone_images"] == rates.backbone_images
    assert store_path(tmp_path, tiny_backbone, small_task).exists() == (choice == "build")
    assert "measured cheaper" in caplog.text and "images/s" in caplog.text


def test_measured_rates_are_positive(tmp_path, tiny_backbone, small_task):
    specs = [AdapterSpec(layer=layer, num_heads=3) for layer in LAYERS]
    for dtype in ("float16", "int8"):
        rates = measure_rates(tiny_backbone, small_task, LAYERS, specs, 16, tmp_path, 10**6, dtype, "disk")
        assert min(rates.backbone_images, rates.store_read_bytes, rates.store_write_bytes, rates.adapter_train_rows,
                   rates.adapter_eval_rows) > 0
        assert rates.read_from == "page cache"  # a megabyte fits in free memory
    assert not list(tmp_path.iterdir())  # the probe file is gone


def test_store_held_in_memory_serves_the_same_batches(tmp_path, tiny_backbone, small_task):
    for dtype in ("float16", "int8"):
        store = build_cache(tiny_backbone, small_task, LAYERS, tmp_path / dtype, dtype=dtype)
        disk, held = CachedSource(store, device="disk"), CachedSource(store, device="cpu")
        batches = [np.arange(0, 48, 3), np.arange(5, 30)]
        for _ in range(2):  # the second epoch reads nothing from the store
            for (a, ya), (b, yb) in zip(disk.loader("train", batches), held.loader("train", batches)):
                assert torch.equal(ya, yb)
                for layer in LAYERS:
                    x, y = (t.dequantize() if dtype == "int8" else t for t in (a[layer], b[layer]))
                    assert torch.equal(x, y)
        assert set(held._held) == {"train"} and held.narrowed([3])._held["train"][3] is held._held["train"][3]


def test_cache_device_auto_and_its_limits(tmp_path, tiny_backbone, small_task):
    cpu = torch.device("cpu")
    assert cache_device("auto", 10**6, cpu, 0.5) == "cpu"
    assert cache_device("auto", 10**15, cpu, 0.5) == "disk"
    assert cache_device("disk", 10, cpu, 0.5) == "disk"
    with pytest.raises(InCAError, match="--cache-device cpu: the store's layers take .* GB, more than 0.5 of the"):
        cache_device("cpu", 10**15, cpu, 0.5)
    with pytest.raises(InCAError, match="must be in \\(0, 1\\]"):
        cache_device("auto", 10, cpu, 1.5)
    if not torch.cuda.is_available():
        with pytest.raises(InCAError, match="--cache-device cuda needs a CUDA GPU"):
            cache_device("cuda", 10, cpu, 0.5)
    source = open_source(tiny_backbone, small_task, LAYERS, epochs=2, cache="always", cache_dir=tmp_path)
    assert source.device == "cpu"  # a few hundred kilobytes: held in memory
    assert open_source(tiny_backbone, small_task, LAYERS, epochs=2, cache_dir=tmp_path, cache_device="disk",
                       memory_fraction=1.0).device == "disk"


def test_probes_read_an_int8_store_as_tokens(tmp_path, tiny_backbone, small_task):
    pooled = {}
    for dtype in ("float16", "int8"):
        store = build_cache(tiny_backbone, small_task, LAYERS, tmp_path / dtype, dtype=dtype)
        recording = RecordingSource(CachedSource(store, device="disk"), ["cls", "mean"], num_prefix=1,
                                    keep_tokens=False)
        pooled[dtype] = torch.from_numpy(recording.pooled("val", 3, "mean"))
    assert torch.nn.functional.cosine_similarity(pooled["int8"], pooled["float16"], dim=-1).min() >= 0.999
