"""``FlagWatch``: warn once when a boolean flag computed on the device is ever true, without a
host synchronisation.

On the CPU the flag is read at once (reading it costs nothing). On a CUDA device it is OR-ed into
a device-side accumulator, which is copied to pinned host memory with a non-blocking copy and an
event; the copy is read at a later ``watch`` call once its event has completed, so the warning
comes a few batches late at most, and no call ever waits for the device. Inside
``torch.compile`` or a CUDA-graph capture nothing is watched. Other devices are not watched.
"""
from __future__ import annotations

import warnings

import torch


class FlagWatch:
    """Warns ``message`` (a ``UserWarning``) the first time a watched flag is true; then stops
    watching. ``watch(flag)`` takes a 0-dim or 1-dim bool tensor (any true entry counts)."""

    def __init__(self, message: str):
        self.message = message
        self.fired = False
        self._acc = None  # CUDA: flags not yet copied to the host
        self._host = None  # CUDA: pinned host copy of the accumulator, read once its event is done
        self._event = None

    def __deepcopy__(self, memo):
        return FlagWatch(self.message)  # device buffers and events are not copied

    def watch(self, flag: torch.Tensor) -> None:
        if self.fired or torch.compiler.is_compiling():
            return
        if flag.device.type == "cpu":
            if bool(flag.any()):
                self._fire()
            return
        if flag.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return
        self.poll()
        if self.fired:
            return
        any_true = flag.any()
        self._acc = any_true if self._acc is None else self._acc | any_true
        if self._event is None:  # no copy in flight: send the accumulated flags to the host
            if self._host is None:
                self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._host.copy_(self._acc, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._acc = None

    def poll(self) -> None:
        """Read a finished copy (never waits)."""
        if self._event is not None and self._event.query():
            self._event = None
            if bool(self._host):
                self._fire()

    def _fire(self) -> None:
        self.fired = True
        self._acc = self._host = self._event = None
        warnings.warn(self.message, UserWarning, stacklevel=3)
