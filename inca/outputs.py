"""The names of what the commands write and inca-predict reads back, in one module without torch: each suite's
report and a task's saved models. inca-predict finds what an output directory serves through them, and checks
its input before torch is imported, without loading the suites that wrote the directory."""

from __future__ import annotations

__all__ = ["ADAPTER_CONFIG", "ADAPTER_DIR", "COMPARE_REPORT", "ENSEMBLE_DIR", "TRAIN_REPORT"]

TRAIN_REPORT = "results.json"  # inca-train's report (inca.training.REPORT_JSON)
COMPARE_REPORT = "compare.json"  # inca-compare's (inca.compare.REPORT_JSON)
ADAPTER_DIR = "adapter"  # a task's best adapter, or a compared method's saved model, in its directory
ENSEMBLE_DIR = "ensemble"  # an inca-train task's saved ensemble, beside its adapter
ADAPTER_CONFIG = "adapter_config.json"  # in every saved adapter or model
