"""Multi-host for real: 2 local processes x 4 CPU devices joined by jax.distributed (gloo).

They train the smoke config through the CLI, checkpoint and resume (with 2 processes, and with 1
process x 8 devices: the checkpoint does not depend on the process count), and the losses equal a
1-process x 8-device run. A process that dies makes the other exit instead of hanging.
"""

import os
import shutil
import socket
import subprocess
import time

import pytest

from cli_runs import REPO, cli_env, losses, metrics, run_train, train_command

pytestmark = pytest.mark.slow

RUN = ["--config.checkpoint.every_steps=4", "--config.train.eval_every=0",
       "--config.optim.schedule=constant"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_processes(workdir, *extra, cache, num=2):
  port = _free_port()
  env = cli_env(cache, devices=4)
  return [subprocess.Popen(
      train_command(workdir, *RUN, *extra, "--coordinator", f"127.0.0.1:{port}",
                    "--num-processes", str(num), "--process-id", str(i)),
      env=env, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
      for i in range(num)]


def _run_processes(workdir, *extra, cache):
  procs = _start_processes(workdir, *extra, cache=cache)
  outputs = [p.communicate(timeout=900) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, out[-2000:] + err[-3000:]
  return outputs[0][0] + outputs[0][1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  cache = root / "xla_cache"
  run_train(root / "single", *RUN, "--config.train.num_steps=8", env=cli_env(cache))
  two = root / "two"
  first = _run_processes(two, "--config.train.num_steps=4", cache=cache)
  shutil.copytree(two, root / "two_then_one")
  resumed = _run_processes(two, "--config.train.num_steps=8", cache=cache)
  one = run_train(root / "two_then_one", *RUN, "--config.train.num_steps=8", env=cli_env(cache))
  # And the other way: the 1-process run's step-4 checkpoint resumed by 2 processes.
  shutil.copytree(root / "single", root / "one_then_two")
  shutil.rmtree(root / "one_then_two" / "checkpoints" / "8")
  to_two = _run_processes(root / "one_then_two", "--config.train.num_steps=8", cache=cache)
  return {"root": root, "first": first, "resumed": resumed, "one": one, "to_two": to_two,
          "cache": cache}


def _assert_same_losses(got_dir, want_dir):
  got, want = losses(metrics(got_dir)), losses(metrics(want_dir))
  assert sorted(got) == list(range(1, 9))
  for step in range(1, 9):
    # Cross-process all-reduces (gloo) may sum in another order than in-process ones.
    assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def test_two_processes_train_checkpoint_and_resume_like_one(runs):
  assert "mesh {'data': 1, 'stage': 1, 'fsdp': 8" in runs["first"]  # one mesh over both processes
  assert "resumed from step 4" in runs["resumed"]
  _assert_same_losses(runs["root"] / "two", runs["root"] / "single")


def test_a_checkpoint_from_two_processes_resumes_on_one(runs):
  assert "resumed from step 4" in runs["one"]
  _assert_same_losses(runs["root"] / "two_then_one", runs["root"] / "single")


def test_a_checkpoint_from_one_process_resumes_on_two(runs):
  assert "resumed from step 4" in runs["to_two"]
  _assert_same_losses(runs["root"] / "one_then_two", runs["root"] / "single")


def test_when_one_process_dies_the_other_exits_within_60s(runs, tmp_path):
  workdir = tmp_path / "dies"
  procs = _start_processes(workdir, "--config.train.num_steps=100000",
                           "--config.checkpoint.every_steps=0", cache=runs["cache"])
  try:
    deadline = time.time() + 600
    path = os.path.join(workdir, "metrics.jsonl")
    while not (os.path.exists(path) and any("loss" in r for r in metrics(workdir))):
      assert time.time() < deadline and procs[0].poll() is None, procs[0].stderr.read()[-2000:]
      time.sleep(0.1)
    procs[1].kill()
    killed_at = time.time()
    _, err = procs[0].communicate(timeout=90)
    waited = time.time() - killed_at
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert procs[0].returncode != 0
  assert waited < 60, f"the survivor took {waited:.0f}s to exit"
  print(f"survivor exited {waited:.1f}s after its peer died; last words: {err[-500:]}")
