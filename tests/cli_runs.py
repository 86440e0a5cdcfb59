"""Helpers for tests that run `mai-jax` in subprocesses and read what the runs wrote."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "experiments", "tiny.py") + ":smoke"


# The suite's programs are tiny, so XLA:CPU's LLVM optimization passes cost far more compile time
# than they save at run time (cold cache, test_plan.py + test_sharding.py: 98 s -> 66 s wall,
# 148 s -> 80 s CPU). tests/conftest.py sets these for the test process, xla_flags for children.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_llvm_disable_expensive_passes=true")
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(devices=None, base: str = "", fast_compile: bool = True) -> str:
  """`base` (e.g. the caller's XLA_FLAGS) with `devices` fake CPU devices (None: no device-count
  flag, one device) and the fast-compile flags (unless `base` already sets them; fast_compile=False
  drops them, for a run whose compute, not its compiles, is the time)."""
  names = {f.split("=")[0] for f in FAST_COMPILE_FLAGS}
  flags = [f for f in base.split() if not f.startswith(DEVICE_COUNT_FLAG)
           and (fast_compile or f.split("=")[0] not in names)]
  if devices is not None:
    flags.append(f"{DEVICE_COUNT_FLAG}={devices}")
  present = {f.split("=")[0] for f in flags}
  extra = [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in present] if fast_compile else []
  return " ".join(flags + extra)


def cli_env(cache_dir=None, devices=8, fast_compile: bool = True) -> dict:
  """Environment for a CPU subprocess with `devices` fake devices and a compile cache: the suite's
  (tests/conftest.py), which every file's CLI runs share, else `cache_dir`."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices, os.environ.get("XLA_FLAGS", ""),
                                             fast_compile), JAX_PLATFORMS="cpu")
  if cache_dir is not None and not env.get("JAX_COMPILATION_CACHE_DIR"):
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


def wandb_records(wandb_dir) -> list:
  """The records of the offline W&B run(s) under `wandb_dir`, read from the run-*.wandb files.

  wandb has no public reader for them: the file is ':W&B' + 3 header bytes, then LevelDB-log
  records (crc32 4, length 2, type 1, payload; FULL=1 or FIRST/MIDDLE/LAST=2/3/4 across 32 KiB
  blocks) whose payloads are wandb_internal_pb2.Record protobufs."""
  import glob
  import struct
  from wandb.proto import wandb_internal_pb2
  block, out = 32768, []
  for path in sorted(glob.glob(os.path.join(str(wandb_dir), "wandb", "*run-*", "run-*.wandb"))):
    with open(path, "rb") as f:
      data = f.read()
    assert data[:4] == b":W&B", path
    pos, part = 7, b""
    while pos + 7 <= len(data):
      if block - pos % block < 7:  # a block's tail too short for a record header is padding
        pos += block - pos % block
        continue
      length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
      part += data[pos + 7:pos + 7 + length]
      pos += 7 + length
      if kind in (1, 4):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(part)
        out.append(record)
        part = b""
  return out


def wandb_history(wandb_dir) -> list:
  """[{key: value}] of every wandb.log call, in order ('_step' is the step)."""
  rows = []
  for record in wandb_records(wandb_dir):
    if record.WhichOneof("record_type") == "history":
      rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item})
  return rows
