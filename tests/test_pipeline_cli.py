"""Pipeline parallelism through the CLI (slow): a mesh.stage=2 run trains like stage=1, resumes
bit for bit after kill -9, its checkpoint resumes on stage=1 and on 2 processes x 4 devices with
'stage' spanning the processes, and eval, sample and convert to-hf read its workdir; MAI-1 dense's
layout switches (sequence parallelism, no stage checkpoint, accumulation) train like stage=1.

The smoke model has 2 layers: one per stage, 2 pipeline microbatches per step (GPipe).
"""

import json
import os
import shutil
import subprocess
import time

import pytest
from safetensors.numpy import load_file

from cli_runs import REPO, cli_env, losses, metrics, run_train, train_command
from test_fault_tolerance import _wait_for_step
from test_multiprocess import _run_processes

pytestmark = pytest.mark.slow

RUN = ["--config.train.num_steps=10", "--config.checkpoint.every_steps=5",
       "--config.train.eval_every=0", "--config.optim.schedule=constant"]
STAGE2 = ["--config.mesh.stage=2", "--config.mesh.fsdp=4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline_cli")
  env = cli_env(root / "xla_cache")
  run_train(root / "plain", *RUN, env=env)
  out = run_train(root / "piped", *RUN, *STAGE2, env=env)
  return {"root": root, "env": env, "piped_log": out,
          "plain": losses(metrics(root / "plain")), "piped": losses(metrics(root / "piped"))}


def test_a_stage_2_run_matches_stage_1_over_10_steps(runs):
  assert "'stage': 2" in runs["piped_log"]
  assert sorted(runs["piped"]) == list(range(1, 11))
  for step in range(1, 11):
    assert runs["piped"][step] == pytest.approx(runs["plain"][step], rel=1e-4), step


# MAI-1 dense's layout switches (experiments/mai1_500b.py) on the smoke model: stage x fsdp x
# tensor, sequence parallelism, no whole-stage checkpoint, gradient accumulation.
MAI1_SWITCHES = ["--config.mesh.stage=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                 "--config.model.sequence_parallel=True", "--config.model.pipeline_stage_remat=False",
                 "--config.train.microbatches=2"]


def test_the_mai1_layout_switches_train_like_stage_1(runs):
  workdir = runs["root"] / "switches"
  out = run_train(workdir, *RUN, *MAI1_SWITCHES, env=runs["env"])
  assert "'stage': 2" in out and "'tensor': 2" in out
  got = losses(metrics(workdir))
  assert sorted(got) == list(range(1, 11))
  for step in range(1, 11):
    assert got[step] == pytest.approx(runs["plain"][step], rel=1e-4), step


def test_kill_9_then_resume_under_stage_2_is_bit_identical(runs):
  workdir = runs["root"] / "killed"
  proc = subprocess.Popen(train_command(workdir, *RUN, *STAGE2), env=runs["env"], cwd=REPO,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  _wait_for_step(proc, workdir, 6)
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "5").is_dir() and time.time() < deadline:
    time.sleep(0.05)  # the step-5 save is asynchronous: kill once it is committed
  proc.kill()
  proc.wait()
  assert "resumed from step 5" in run_train(workdir, *RUN, *STAGE2, env=runs["env"])
  got = losses(metrics(workdir))
  assert sorted(got) == list(range(1, 11))
  assert got == runs["piped"]  # exact


def _from_step_5(runs, name):
  workdir = runs["root"] / name
  shutil.copytree(runs["root"] / "piped", workdir)
  shutil.rmtree(workdir / "checkpoints" / "10")
  return workdir


def test_a_stage_2_checkpoint_resumes_on_stage_1(runs):
  workdir = _from_step_5(runs, "to_stage_1")
  out = run_train(workdir, *RUN, "--config.mesh.stage=1", "--config.mesh.fsdp=-1",
                  env=runs["env"])
  assert "resumed from step 5" in out
  got = losses(metrics(workdir))
  for step in range(6, 11):
    assert got[step] == pytest.approx(runs["piped"][step], rel=1e-5), step


def test_a_stage_2_checkpoint_resumes_on_2_processes_with_stage_across_them(runs):
  workdir = _from_step_5(runs, "to_two")
  out = _run_processes(workdir, *RUN, *STAGE2, cache=runs["root"] / "xla_cache")
  assert "resumed from step 5" in out and "'stage': 2" in out
  got = losses(metrics(workdir))
  for step in range(6, 11):
    # Cross-process collectives (gloo) may sum in another order than in-process ones.
    assert got[step] == pytest.approx(runs["piped"][step], rel=1e-5, abs=1e-6), step


def _cli(runs, *args) -> str:
  proc = subprocess.run([os.sys.executable, "-m", "mai_jax", *args], capture_output=True,
                        text=True, env=runs["env"], cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc.stdout


def test_eval_sample_and_convert_read_a_pipelined_workdir(runs, tmp_path):
  piped, plain = runs["root"] / "piped", runs["root"] / "plain"
  evals = {name: _cli(runs, "eval", "--workdir", str(w)) for name, w in
           (("piped", piped), ("plain", plain))}
  assert "loss" in evals["piped"]
  text = _cli(runs, "sample", "--workdir", str(piped), "--prompt", "def ", "--max-new-tokens",
              "8", "--temperature", "0")
  assert text.strip()
  _cli(runs, "convert", "to-hf", "--workdir", str(piped), "--out", str(tmp_path / "hf"))
  with open(tmp_path / "hf" / "config.json") as f:
    assert json.load(f)["num_hidden_layers"] == 2
  tensors = {}
  for name in os.listdir(tmp_path / "hf"):
    if name.endswith(".safetensors"):
      tensors.update(load_file(str(tmp_path / "hf" / name)))
  assert "model.layers.1.mlp.down_proj.weight" in tensors
