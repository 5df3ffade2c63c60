"""Ctrl-C during training: finish the current step, save a checkpoint, then stop with
:class:`TrainingInterrupted`, which names the checkpoint (the command line prints how to resume).
A second Ctrl-C stops at once."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Iterator


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C after saving ``checkpoint`` at ``step``."""

    def __init__(self, checkpoint: Path, step: int) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved in {checkpoint}")
        self.checkpoint, self.step = checkpoint, step


@contextlib.contextmanager
def deferred_interrupt(enabled: bool = True) -> Iterator[threading.Event]:
    """Within the block the first SIGINT only sets the yielded event (the loop checks it between
    steps); the handler before is restored after. Off the main thread, or with ``enabled``
    false (several processes, where one rank alone must not stop), Ctrl-C acts as usual."""
    asked = threading.Event()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield asked
        return
    before = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        if asked.is_set():
            raise KeyboardInterrupt
        asked.set()

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, before)
