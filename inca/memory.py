"""Peak memory of a block of work, measured from a reset just before it (what ``inca-compare`` reports).

On CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated at the start. On CPU: the growth of the
process's peak resident set (Linux: ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, with freed
heap returned to the OS by glibc's ``malloc_trim`` first, so memory freed by earlier work is not reused unseen).
Worker processes (image decoding) are not included on CPU.
"""

from __future__ import annotations

import ctypes
import gc
import logging

import torch

from inca.errors import first_line

__all__ = ["PeakMemory", "parameter_bytes"]

logger = logging.getLogger(__name__)

_MEASURES = {
    "cuda": "CUDA max allocated during the method, over what was allocated at its start",
    "cpu": "growth of peak RSS during the method (Linux VmHWM reset before it)",
}


def _status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (reported in kB), in bytes."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _return_freed_heap() -> None:
    """glibc's ``malloc_trim(0)``: give freed heap back to the OS, so the resident set starts from what is in use."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes held by ``module``'s parameters and buffers (its weights in memory)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class PeakMemory:
    """Peak memory growth of a ``with`` block on ``device`` (see the module docstring), in ``peak_bytes``.

    ``peak_bytes`` is None on a CPU where the peak RSS cannot be reset (not Linux).
    """

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self._start: int | None = None

    @property
    def kind(self) -> str:
        return "cuda" if self.device.type == "cuda" else "cpu"

    @property
    def measures(self) -> str:
        """What ``peak_bytes`` is on this device, in words (for reports)."""
        return _MEASURES[self.kind]

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        _return_freed_heap()
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self._start = _status_bytes("VmRSS")
        except OSError as exc:
            logger.warning("peak RSS cannot be reset here (%s); CPU peak memory is not measured", first_line(exc))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._start is None:
            return
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self.peak_bytes = max(0, _status_bytes("VmHWM") - self._start)
