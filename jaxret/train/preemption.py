"""Preemption: SIGTERM, SIGINT or SIGUSR1 ask the run to save the step it is at and exit.

One process: a handler notes the signal and the loop saves at the next step boundary.
Several processes: every process must save the same step, so the notice goes through JAX's
preemption sync service (`jax.distributed` starts it; it listens for SIGTERM and agrees on a
step with all processes): SIGINT and SIGUSR1 are turned into a SIGTERM to ourselves, and
`reached_preemption_sync_point(step)`, asked at every step by every process, says when.
A second signal after the first gets the default behaviour (a second Ctrl-C interrupts).
"""
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class PreemptionGuard:
  def __init__(self):
    self.received = None
    self.multi = jax.process_count() > 1
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self  # signal handlers can only be set from the main thread
    for sig in SIGNALS:
      if self.multi and sig == signal.SIGTERM:
        continue  # JAX's preemption notifier owns SIGTERM in a multi-process job
      self._old[sig] = signal.signal(sig, self._on_signal)
    return self

  def _on_signal(self, signum, frame):
    self.received = signal.Signals(signum).name
    self._restore()  # the next signal acts as usual
    if self.multi:
      os.kill(os.getpid(), signal.SIGTERM)  # to the sync service, which tells every process

  def reached(self, step):
    """Whether to save `step` and stop (the same answer on every process)."""
    if self.multi:
      if multihost_utils.reached_preemption_sync_point(step):
        self.received = self.received or "SIGTERM"
        return True
      return False
    return self.received is not None

  def _restore(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}

  def __exit__(self, *exc):
    self._restore()
