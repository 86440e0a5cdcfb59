"""Slow end-to-end runs (`pytest -m slow`, part of `make test`): the tiny model learns, and the
same run on an FSDP x tensor mesh follows the pure-FSDP losses."""

import json
import os
import subprocess
import sys

import pytest
from cli_runs import cli_env

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "tiny.py")


def _train(workdir, config, *extra, devices=1, fast_compile=True):
  env = cli_env(devices=devices, fast_compile=fast_compile)
  proc = subprocess.run([sys.executable, "-m", "mai_jax", "train", "--config", config,
                         "--workdir", str(workdir), *extra],
                        capture_output=True, text=True, env=env, timeout=1200, cwd=REPO)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return proc.stdout + proc.stderr, rows


def test_tiny_learns_in_60_steps(tmp_path):
  # The README's main job, 60 steps of real compute: unoptimized XLA code would double its time
  out, rows = _train(tmp_path, TINY, "--config.train.num_steps=60",
                     "--config.train.log_every=1", "--config.train.eval_every=0",
                     "--config.checkpoint.every_steps=30", fast_compile=False)
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 60
  first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
  assert first > 7.5  # starts near ln(4096) = 8.3
  assert first - last > 1.5, (first, last)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["30", "60"]
  assert os.listdir(tmp_path / "tensorboard")
  assert "validation loss" in out


def test_fsdp_by_tensor_mesh_matches_pure_fsdp(tmp_path):
  common = ["--config.train.num_steps=4", "--config.checkpoint.every_steps=0"]
  smoke = TINY + ":smoke"
  _, fsdp = _train(tmp_path / "fsdp", smoke, *common, devices=8)
  _, tp = _train(tmp_path / "tp", smoke, *common, "--config.mesh.tensor=2", devices=8)
  a = [r["loss"] for r in fsdp if "loss" in r]
  b = [r["loss"] for r in tp if "loss" in r]
  assert len(a) == len(b) == 4
  assert b == pytest.approx(a, rel=1e-4)
