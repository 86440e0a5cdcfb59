"""Multi-host launch: flag/environment detection for jax.distributed and the GPU pod templates."""

import os
import re
import subprocess
import sys

import pytest

from mai_jax.config import ConfigError
from mai_jax.launch import distributed, presets

LAUNCH_DIR = os.path.dirname(presets.__file__)


@pytest.mark.parametrize("template", ["slurm.sbatch", "jobset.yaml"])
def test_templates_carry_the_preset(template):
  text = open(os.path.join(LAUNCH_DIR, template)).read()
  block = text.split("--- H100 preset")[1].split("--- end preset")[0]
  for name, value in presets.H100_ENV.items():
    assert re.search(rf"{name}\W+(value: )?\"?{re.escape(value)}\"?\s*$", block, re.M), name


def test_xla_accepts_every_flag_of_the_preset():
  # XLA aborts at start-up on an unknown flag; GPU flags are parsed on the CPU backend too.
  env = dict(os.environ, XLA_FLAGS=presets.H100_XLA_FLAGS, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.zeros(1).sum())"],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_partial_flags_are_a_config_error():
  with pytest.raises(ConfigError, match="go together"):
    distributed.initialize("127.0.0.1:1234", None, 0)
  with pytest.raises(ConfigError, match="--process-id=2 must be in"):
    distributed.initialize("127.0.0.1:1234", 2, 2)


@pytest.mark.parametrize("env,kind", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),  # one task: nothing to join
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, "slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
    ({"JAX_COORDINATOR_ADDRESS": "pod-0:1234", "JAX_NUM_PROCESSES": "2"}, "env"),
])
def test_the_launcher_is_detected_from_the_environment(monkeypatch, env, kind):
  for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS",
               "JAX_NUM_PROCESSES"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert distributed.detect_environment() == kind


def test_a_single_process_needs_no_initialization(monkeypatch):
  for name in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False
