"""Preemption: SIGTERM/SIGINT ask the loop to checkpoint and stop; a second signal exits at once.

Cluster schedulers (SLURM, Kubernetes) send SIGTERM some seconds before killing a job. The handler
only sets a flag; the loop finishes the step in flight, saves, waits for the save and exits 0.

With several processes the signal may reach them at different steps, yet they must all stop after
the same step (a checkpoint is a collective). So each step every process contributes its flag to a
tiny on-device max-reduction that is dispatched with the step and read one step later, together with
that step's metrics: the read never waits on anything the loop was not waiting on anyway, and all
processes see the same answer at the same loop iteration.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """Installs the handlers for the duration of a `with` block and restores the old ones after.

  Outside the main thread (e.g. a notebook running train() in a worker thread) Python cannot
  install handlers; then only `request()` stops the loop.
  """

  def __init__(self):
    self.signal_name: Optional[str] = None
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def request(self, name: str = "stop request") -> None:
    self.signal_name = name

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.requested:
      print(f"mai-jax: second {name}: exiting now without a checkpoint", file=sys.stderr,
            flush=True)
      os._exit(128 + signum)
    self.request(name)
    print(f"mai-jax: {name} received: finishing the current step and saving a checkpoint "
          f"(send it again to exit at once)", file=sys.stderr, flush=True)

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()


class StopVote:
  """Any-process agreement on the stop flag, computed on the devices (see the module docstring)."""

  def __init__(self, mesh: Mesh):
    self._mesh = mesh
    self._sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    self._local_devices = len([d for d in mesh.devices.flat if d.process_index ==
                               jax.process_index()])
    self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

  def dispatch(self, flag: bool) -> jax.Array:
    local = np.full((self._local_devices,), int(flag), np.int32)
    votes = jax.make_array_from_process_local_data(self._sharding, local, (self._mesh.size,))
    return self._max(votes)
