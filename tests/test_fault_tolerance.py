"""Fault tolerance end to end: kill -9 and SIGTERM resume bit for bit, corrupt and unwritable
checkpoints, non-finite steps skipped and recovered from, elastic restore onto another mesh."""

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cli_runs import REPO, SMOKE, cli_env, losses, metrics, run_train, train_command
from mai_jax import checkpoint as checkpoint_lib
from mai_jax import config as C
from mai_jax import sharding as S
from mai_jax import workdir as workdir_lib
from mai_jax.train import loop as loop_lib
from mai_jax.train.faults import FaultMonitor

# 12 steps, checkpoints every 3, a schedule that does not depend on where a run stops.
RUN = ["--config.train.num_steps=12", "--config.checkpoint.every_steps=3",
       "--config.train.eval_every=0", "--config.optim.schedule=constant"]


def _smoke(**overrides) -> C.Config:
  cfg = C.apply_overrides(C.load_experiment(SMOKE), {
      "train.num_steps": "8", "checkpoint.every_steps": "4", "train.eval_every": "0",
      "optim.schedule": "'constant'", **{k: repr(v) for k, v in overrides.items()}})
  C.validate(cfg)
  return cfg


def _wait_for_step(proc, workdir, step, timeout=600):
  """Blocks until the run has logged `step` (or fails if it ended first)."""
  deadline = time.time() + timeout
  path = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}: "
                           f"{proc.stderr.read()[-2000:]}")
    if os.path.exists(path) and any(r.get("step", 0) >= step and "loss" in r
                                    for r in metrics(workdir)):
      return
    time.sleep(0.05)
  raise AssertionError(f"no step {step} within {timeout}s")


def _start(workdir, env):
  return subprocess.Popen(train_command(workdir, *RUN), env=env, cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  root = tmp_path_factory.mktemp("faults")
  env = cli_env(root / "xla_cache")
  run_train(root / "reference", *RUN, env=env)
  return {"losses": losses(metrics(root / "reference")), "env": env, "root": root}


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_equals_an_uninterrupted_run(reference):
  workdir = reference["root"] / "killed"
  kill_after = random.Random().randint(2, 10)
  proc = _start(workdir, reference["env"])
  _wait_for_step(proc, workdir, kill_after)
  proc.kill()  # SIGKILL: no handler runs, an async save may be half written
  proc.wait()
  run_train(workdir, *RUN, env=reference["env"])
  want, got = reference["losses"], losses(metrics(workdir))
  assert sorted(got) == list(range(1, 13)), f"killed after step {kill_after}"
  for step in range(1, 13):
    assert got[step] == want[step], (kill_after, step, got[step], want[step])


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_0_and_resumes_exactly(reference):
  workdir = reference["root"] / "preempted"
  proc = _start(workdir, reference["env"])
  _wait_for_step(proc, workdir, 4)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  assert "SIGTERM received" in stderr
  stopped = max(r["step"] for r in metrics(workdir) if "loss" in r)
  assert stopped < 12, "the run finished before the signal arrived"
  assert f"stopped by SIGTERM after step {stopped}" in stdout
  statuses = {e.step: e.status for e in checkpoint_lib.list_checkpoints(workdir / "checkpoints")}
  assert statuses[stopped] == "ok", statuses  # finalized and its manifest written before exit
  out = run_train(workdir, *RUN, env=reference["env"])
  assert f"resumed from step {stopped}" in out
  got = losses(metrics(workdir))
  for step in range(1, 13):
    assert got[step] == reference["losses"][step], step


def test_a_second_signal_exits_at_once():
  code = textwrap.dedent("""
      import os, signal, time
      from mai_jax.train.preemption import StopRequest
      with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
      print("not reached")
  """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=cli_env(), cwd=REPO, timeout=120)
  assert proc.returncode == 128 + signal.SIGINT, proc.stderr
  assert "second SIGINT: exiting now" in proc.stderr
  assert "not reached" not in proc.stdout


def test_stop_request_restores_the_previous_handlers():
  before = signal.getsignal(signal.SIGTERM)
  from mai_jax.train.preemption import StopRequest
  with StopRequest():
    assert signal.getsignal(signal.SIGTERM) is not before
  assert signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------------------------- corruption and disk

def _corrupt_largest_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "state") for f in fs]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  return victim


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """An 8-step in-process run with checkpoints at 4 and 8 (copied by tests that damage it)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  loop_lib.train(_smoke(), str(workdir))
  return workdir


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return dst


def test_manifests_mark_finalized_checkpoints_ok(trained):
  entries = checkpoint_lib.list_checkpoints(trained / "checkpoints")
  assert [(e.step, e.status) for e in entries] == [(4, "ok"), (8, "ok")]


def test_a_flipped_byte_is_caught_by_the_checksum(trained, tmp_path):
  workdir = _copy(trained, tmp_path / "run")
  files = [os.path.join(d, f) for d, _, fs in os.walk(workdir / "checkpoints" / "8" / "state")
           for f in fs]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.seek(os.path.getsize(victim) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))
  status, detail = checkpoint_lib.verify_step(str(workdir / "checkpoints" / "8"))
  assert status == "corrupt" and "CRC32" in detail


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, capsys):
  workdir = _copy(trained, tmp_path / "run")
  _corrupt_largest_file(workdir / "checkpoints" / "8")
  proc = subprocess.run([sys.executable, "-m", "mai_jax", "checkpoints", "--workdir",
                         str(workdir)], capture_output=True, text=True, env=cli_env(), cwd=REPO,
                        timeout=300)
  assert proc.returncode == 1 and "corrupt" in proc.stdout, proc.stdout + proc.stderr
  result = loop_lib.train(_smoke(**{"train.num_steps": 10}), str(workdir))
  out = capsys.readouterr().out
  assert result.resumed_from == 4
  assert "checkpoint step 8 is corrupt" in out and "steps 5..8 are lost" in out
  assert (workdir / "checkpoints" / "8.corrupt" / "REASON").is_file()  # kept, not deleted
  statuses = {e.name: e.status for e in checkpoint_lib.list_checkpoints(workdir / "checkpoints")}
  assert statuses["8.corrupt"] == "quarantined" and statuses["10"] == "ok"


def test_a_checkpoint_of_another_model_is_a_config_error_not_corruption(trained, tmp_path):
  workdir = _copy(trained, tmp_path / "run")
  with pytest.raises(C.ConfigError, match="does not match the config"):
    loop_lib.train(_smoke(**{"model.d_ff": 96, "train.num_steps": 10}), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]  # nothing moved aside


def test_a_full_disk_during_save_is_a_clear_error_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch):
  real_save = ocp.JsonCheckpointHandler.async_save

  async def failing_save(self, directory, *args, **kwargs):
    if "/8.orbax-checkpoint-tmp" in str(directory) or str(directory).rstrip("/").endswith("/8"):
      raise OSError(errno.ENOSPC, "No space left on device")
    return await real_save(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", failing_save)
  workdir = tmp_path / "run"
  with pytest.raises(checkpoint_lib.CheckpointError) as info:
    loop_lib.train(_smoke(), str(workdir))
  message = str(info.value)
  assert "step 8" in message and "No space left on device" in message
  assert "previous checkpoint (step 4) is intact" in message
  monkeypatch.undo()
  assert [(e.step, e.status) for e in checkpoint_lib.list_checkpoints(workdir / "checkpoints")
          if e.name.isdigit()] == [(4, "ok")]
  assert loop_lib.train(_smoke(), str(workdir)).resumed_from == 4


# ---------------------------------------------------------------------------- numerical faults

class _PoisonedStream:
  """Wraps the data iterator: batches at chosen stream positions get an out-of-vocabulary target,
  which makes the loss NaN inside the real train step (jnp.take_along_axis fills with NaN)."""

  def __init__(self, inner, positions, vocab_size):
    self.inner, self.positions, self.vocab_size, self.position = inner, positions, vocab_size, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self.inner))
    if self.position in self.positions:
      batch["targets"] = np.full_like(batch["targets"], self.vocab_size)
    self.position += 1
    return batch

  def get_state(self):
    return {"inner": self.inner.get_state(), "position": self.position}

  def set_state(self, state):
    self.inner.set_state(state["inner"])
    self.position = state["position"]


def _poison(monkeypatch, positions):
  real = loop_lib.make_train_iterator

  def make(cfg, tokenizer, **kwargs):
    return _PoisonedStream(real(cfg, tokenizer, **kwargs), positions, cfg.model.vocab_size)
  monkeypatch.setattr(loop_lib, "make_train_iterator", make)


def test_an_isolated_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch):
  _poison(monkeypatch, {5})  # the batch of step 6
  result = loop_lib.train(_smoke(), str(tmp_path / "run"))
  rows = {r["step"]: r for r in metrics(tmp_path / "run") if "loss" in r}
  assert result.skipped_updates == 1 and result.fault_restores == 0
  assert rows[6]["update_skipped"] == 1.0 and not np.isfinite(rows[6]["loss"])
  assert rows[5]["param_norm"] == rows[6]["param_norm"]  # the update was not applied
  assert all(np.isfinite(rows[s]["loss"]) for s in (7, 8))
  assert rows[8]["skipped_updates_total"] == 1


def test_consecutive_bad_steps_restore_the_checkpoint_and_skip_their_batches(
    tmp_path, monkeypatch, capsys):
  _poison(monkeypatch, {5, 6, 7})  # steps 6, 7, 8 of the first attempt
  cfg = _smoke(**{"train.num_steps": 10, "train.max_consecutive_bad_steps": 3})
  result = loop_lib.train(cfg, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert result.fault_restores == 1 and result.skipped_updates == 3
  assert "restored step 4" in out and "[5, 6, 7] will be skipped" in out
  final = losses(metrics(tmp_path / "run"))
  assert sorted(final) == list(range(1, 11))
  assert all(np.isfinite(final[s]) for s in range(1, 11))  # replayed steps 5..10 are all good


def test_bad_steps_that_keep_coming_back_give_up_with_a_clear_error(tmp_path, monkeypatch):
  _poison(monkeypatch, set(range(2, 100)))
  cfg = _smoke(**{"train.max_consecutive_bad_steps": 2, "train.max_fault_restores": 1})
  with pytest.raises(FloatingPointError, match="train.max_fault_restores"):
    loop_lib.train(cfg, str(tmp_path / "run"))


def test_the_spike_detector_flags_a_loss_far_above_its_recent_mean():
  monitor = FaultMonitor(C.TrainConfig(loss_spike_ratio=1.5, loss_spike_window=4))
  for step, loss in enumerate([4.0, 3.9, 3.8, 3.7], start=1):
    assert not monitor.observe(step, step - 1, loss, False).bad
  verdict = monitor.observe(5, 4, 7.0, False)  # 7.0 > 1.5 x 3.85
  assert verdict.bad and verdict.restore and "loss spike at step 5" in verdict.reason
  assert monitor.take_bad_positions() == [4]
  assert not monitor.observe(6, 5, 3.6, False).bad  # the history restarts after a restore


def test_skipped_updates_below_the_limit_do_not_restore():
  monitor = FaultMonitor(C.TrainConfig(max_consecutive_bad_steps=3))
  assert not monitor.observe(1, 0, float("nan"), True).restore
  assert not monitor.observe(2, 1, 3.0, False).bad  # a good step resets the run of bad ones
  assert not monitor.observe(3, 2, float("nan"), True).restore
  assert not monitor.observe(4, 3, float("nan"), True).restore
  assert monitor.observe(5, 4, float("nan"), True).restore


# ---------------------------------------------------------------------- elastic and params only

def _restored_arrays(workdir, cfg, mesh):
  from mai_jax.train.trainer import build_trainer
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
  try:
    return checkpointer.restore_latest(build_trainer(cfg, mesh).abstract_state(), print)
  finally:
    checkpointer.close()


@pytest.mark.slow
def test_a_checkpoint_from_8_devices_restores_onto_a_2x2_mesh_of_4(trained, tmp_path):
  cfg = C.load_json(str(trained / "config.json"))
  mesh = S.make_mesh(cfg.mesh)
  want = jax.device_get(_restored_arrays(str(trained), cfg, mesh).state)
  code = textwrap.dedent(f"""
      import dataclasses, jax, numpy as np
      from mai_jax import config as C, sharding as S
      from tests.test_fault_tolerance import _restored_arrays
      cfg = C.load_json({str(trained / 'config.json')!r})
      cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, fsdp=2, tensor=2))
      mesh = S.make_mesh(cfg.mesh)
      assert jax.device_count() == 4
      state = _restored_arrays({str(trained)!r}, cfg, mesh).state
      q = state.params["blocks"]["attn"]["q_proj"]
      assert {{d.id for d in q.sharding.device_set}} == {{0, 1, 2, 3}}
      assert "tensor" in str(q.sharding.spec), q.sharding.spec
      leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state))
      np.savez({str(tmp_path / 'restored.npz')!r},
               **{{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}})
  """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**cli_env(devices=4), "PYTHONPATH": REPO + os.pathsep + os.path.join(
                            REPO, "tests")}, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(tmp_path / "restored.npz")
  leaves = jax.tree_util.tree_leaves_with_path(want)
  assert len(got.files) == len(leaves)
  for path, value in leaves:
    np.testing.assert_array_equal(got[jax.tree_util.keystr(path)], value)


def test_params_export_is_a_workdir_without_optimizer_state(trained, tmp_path):
  out = tmp_path / "export"
  proc = subprocess.run([sys.executable, "-m", "mai_jax", "checkpoints", "--workdir", str(trained),
                         "--export-params", str(out), "--step", "4"], capture_output=True,
                        text=True, env=cli_env(), cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "exported the parameters of step 4" in proc.stdout
  assert (out / "config.json").is_file() and (out / "tokenizer.model").is_file()
  assert [(e.step, e.status) for e in checkpoint_lib.list_checkpoints(out / "checkpoints")] == [
      (4, "ok")]
  cfg = workdir_lib.load_config(str(out))
  mesh = S.make_mesh(cfg.mesh)
  step, _, params = workdir_lib.load_params(cfg, str(out), mesh)
  assert step == 4
  checkpointer = checkpoint_lib.Checkpointer(str(trained / "checkpoints"), cfg.checkpoint)
  from mai_jax.train.trainer import build_trainer
  full = checkpointer.restore(4, build_trainer(cfg, mesh).abstract_state())[0]
  checkpointer.close()
  for a, b in zip(jax.tree.leaves(jax.device_get(params)),
                  jax.tree.leaves(jax.device_get(full.params))):
    np.testing.assert_array_equal(a, b)
  size = lambda d: sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
  assert size(out / "checkpoints") < 0.5 * size(trained / "checkpoints" / "4")
