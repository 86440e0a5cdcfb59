"""`jax.distributed` initialization for multi-host runs, from flags or the cluster's environment.

Every process of a job runs the same command. Process discovery, by priority:
  1. flags `--coordinator HOST:PORT --num-processes N --process-id I` (all three);
  2. jax's own environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
     `JAX_PROCESS_ID` (what launch/jobset.yaml sets on Kubernetes, from the pod's completion index);
  3. SLURM (`srun`, more than one task) and Open MPI (`mpirun`), detected by jax itself.
One process and no flags: nothing to initialize.

Failure detection: a process that dies stops sending heartbeats; after `HEARTBEAT_TIMEOUT_S` the
coordination service tells the survivors, which exit with an error instead of hanging in a
collective forever. The scheduler then restarts the job, which resumes from its last checkpoint.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

from mai_jax.config import ConfigError

HEARTBEAT_TIMEOUT_S = 30  # a dead peer is noticed within this (plus a few seconds)
INITIALIZATION_TIMEOUT_S = 300  # all processes must have joined by then
SHUTDOWN_TIMEOUT_S = 60


def detect_environment() -> Optional[str]:
  """Which launcher started several processes: 'env', 'slurm', 'ompi' or None."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") and os.environ.get("JAX_NUM_PROCESSES"):
    return "env"
  if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "ompi"
  return None


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> bool:
  """Initializes jax.distributed when this is a multi-process job; returns whether it is."""
  flags = (coordinator, num_processes, process_id)
  if any(f is not None for f in flags) and None in flags:
    raise ConfigError("--coordinator, --num-processes and --process-id go together: give all "
                      "three, or none to detect SLURM / Open MPI / JAX_* environment variables")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f"--process-id={process_id} must be in [0, --num-processes={num_processes})")
  kind = "flags" if coordinator else detect_environment()
  if kind is None or _already_initialized():
    return kind is not None
  if kind == "env":
    coordinator = os.environ["JAX_COORDINATOR_ADDRESS"]
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    process_id = int(os.environ.get("JAX_PROCESS_ID", os.environ.get("JOB_COMPLETION_INDEX", "")
                                    or -1))
    if process_id < 0:
      raise ConfigError("JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are set but neither "
                        "JAX_PROCESS_ID nor JOB_COMPLETION_INDEX is: set one per process")
  jax.distributed.initialize(
      coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
      initialization_timeout=INITIALIZATION_TIMEOUT_S,
      heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
      shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
  return True


def _already_initialized() -> bool:
  from jax._src import distributed as jax_distributed  # no public query in jax 0.10
  return jax_distributed.global_state.client is not None
