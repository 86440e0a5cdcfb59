"""End to end through the CLI: train, write metrics/TensorBoard/checkpoints, resume exactly."""

import os
import subprocess

import pytest

from cli_runs import REPO, cli_env, losses as _losses, metrics as _metrics, run_train, \
    train_command

# A constant learning rate after warmup, so a run extended from 4 to 8 steps follows the same
# schedule as a run planned for 8 from the start.
COMMON = ["--config.optim.schedule=constant", "--config.checkpoint.every_steps=4"]


def _train(workdir, cache_dir, *extra):
  return run_train(workdir, *COMMON, *extra, env=cli_env(cache_dir))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("e2e")
  cache = root / "xla_cache"
  resumed, straight = root / "resumed", root / "straight"
  out_first = _train(resumed, cache, "--config.train.num_steps=4")
  out_resume = _train(resumed, cache, "--config.train.num_steps=8")
  _train(straight, cache, "--config.train.num_steps=8", "--config.train.profile_steps=(2, 4)")
  return {"resumed": resumed, "straight": straight, "out_first": out_first,
          "out_resume": out_resume}


def test_run_writes_the_workdir_contract(runs):
  workdir = runs["resumed"]
  for name in ("config.json", "tokenizer.model", "metrics.jsonl"):
    assert (workdir / name).is_file(), name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]
  rows = _metrics(workdir)
  train_rows = [r for r in rows if "loss" in r]
  for key in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_sec", "step_time_s"):
    assert all(key in r for r in train_rows), key
  assert [r["step"] for r in train_rows] == list(range(1, 9))
  # one row per logged step: the realized data mixture rides with the step's training metrics
  assert all(r["data/tokens/stdlib"] > 0 for r in train_rows)
  assert len([r for r in rows if "eval_loss" not in r]) == len(train_rows)
  assert any("eval_loss" in r for r in rows)
  assert "validation loss" in runs["out_first"]


def test_profile_steps_write_a_trace(runs):
  traces = [os.path.join(d, f) for d, _, files in os.walk(runs["straight"] / "profile")
            for f in files if f.endswith((".xplane.pb", ".trace.json.gz"))]
  assert traces, "no jax.profiler trace under WORKDIR/profile"


def test_restart_resumes_from_the_checkpoint(runs):
  assert "resumed from step 4" in runs["out_resume"]
  assert "resumed from" not in runs["out_first"]


def test_resumed_losses_equal_an_uninterrupted_run(runs):
  resumed, straight = _losses(_metrics(runs["resumed"])), _losses(_metrics(runs["straight"]))
  assert list(straight) == list(range(1, 9))
  for step in range(1, 9):
    assert resumed[step] == straight[step], (step, resumed[step], straight[step])


def test_resuming_past_num_steps_is_a_clear_error(runs, tmp_path):
  proc = subprocess.run(train_command(runs["straight"], "--config.train.num_steps=4", config=None),
                        capture_output=True, text=True, env=cli_env(), timeout=600, cwd=REPO)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "checkpoint at step 8, past train.num_steps=4" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert sorted(os.listdir(runs["straight"] / "checkpoints")) == ["4", "8"]  # nothing lost
