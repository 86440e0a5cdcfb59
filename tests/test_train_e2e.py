"""End to end through the CLI: train, write metrics/TensorBoard/checkpoints, resume exactly."""

import importlib.util
import json
import os
import re
import subprocess

import pytest

from cli_runs import REPO, cli_env, losses as _losses, metrics as _metrics, run_train, \
    train_command, wandb_history, wandb_records

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
  tracking = []
  if importlib.util.find_spec("wandb") is not None:  # the 'track' extra (make test installs it)
    tracking = ["--config.train.wandb_project=mai-jax-test", "--config.train.wandb_mode=offline"]
  out_straight = _train(straight, cache, "--config.train.num_steps=8",
                        "--config.train.profile_steps=(2, 4)", *tracking)
  return {"resumed": resumed, "straight": straight, "out_first": out_first,
          "out_resume": out_resume, "out_straight": out_straight}


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


def test_a_batch_job_prints_a_line_per_logged_step_and_eval(runs):
  """smoke has progress_bar=False and log_every=1: one line per step with loss, tokens/s, MFU and
  ETA, the same loss as metrics.jsonl, and the step-4 evaluation's loss."""
  out, rows = runs["out_straight"], _metrics(runs["straight"])
  lines = re.findall(r"mai-jax: step (\d+)/8  loss (\S+)  \S+ tok/s  MFU \S+  ETA (\S+)", out)
  assert [int(step) for step, _, _ in lines] == list(range(1, 9)), out
  assert {int(s): loss for s, loss, _ in lines} == {s: f"{l:.4f}" for s, l in _losses(rows).items()}
  assert lines[0][2] == "n/a" and all(eta != "n/a" for _, _, eta in lines[1:])
  eval_4 = next(r["eval_loss"] for r in rows if r["step"] == 4 and "eval_loss" in r)
  assert f"mai-jax: step 4/8  eval loss {eval_4:.4f}" in out


def test_wandb_offline_logs_the_same_history_as_metrics_jsonl(runs):
  pytest.importorskip("wandb")
  workdir = runs["straight"]
  history = wandb_history(workdir)  # WANDB_DIR unset: the run's files live in WORKDIR/wandb
  by_step = {}  # wandb merges the calls of one step (training metrics, then eval) into one row
  for r in _metrics(workdir):
    by_step.setdefault(r["step"], {}).update({k: v for k, v in r.items() if v is not None})
  assert [h["_step"] for h in history] == sorted(by_step) == list(range(1, 9))
  for h in history:
    for key, value in by_step[h["_step"]].items():
      if key != "step":
        assert h[key] == pytest.approx(value, rel=1e-6), (h["_step"], key)
  assert "eval_loss" in history[3] and "loss" in history[3]
  run = next(r.run for r in wandb_records(workdir) if r.WhichOneof("record_type") == "run")
  config = {item.key: json.loads(item.value_json) for item in run.config.update}
  assert config["train"]["num_steps"] == 8 and config["model"]["d_model"] == 64
  assert (workdir / "wandb_id").is_file()


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
