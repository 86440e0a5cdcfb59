"""Helpers for tests that run `mai-jax` in subprocesses and read what the runs wrote."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "experiments", "tiny.py") + ":smoke"


def cli_env(cache_dir=None, devices: int = 8) -> dict:
  """Environment for a CPU subprocess with `devices` fake devices (and a shared compile cache)."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  if cache_dir is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def train_command(workdir, *extra, config=SMOKE) -> list:
  cmd = [sys.executable, "-m", "mai_jax", "train", "--workdir", str(workdir)]
  if config:
    cmd += ["--config", config]
  return cmd + list(extra)


def run_train(workdir, *extra, env=None, config=SMOKE, expect_rc=0) -> str:
  proc = subprocess.run(train_command(workdir, *extra, config=config), capture_output=True,
                        text=True, env=env or cli_env(), timeout=900, cwd=REPO)
  assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout + proc.stderr


def metrics(workdir) -> list:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def losses(rows) -> dict:
  """step -> training loss; a step logged twice (replayed after a restart) keeps its last value."""
  return {r["step"]: r["loss"] for r in rows if "loss" in r}
