"""The training loop: `train(cfg, workdir)`, importable from notebooks as well as the CLI.

The loop dispatches step N before fetching step N-1's metrics, so the host never waits on the
device while it could be preparing the next batch. Only process 0 writes files and prints.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from mai_jax import __version__
from mai_jax import config as config_lib
from mai_jax import metrics as metrics_lib
from mai_jax import sharding as sharding_lib
from mai_jax.checkpoint import Checkpointer
from mai_jax.config import Config
from mai_jax.data.batches import eval_batch_count, make_eval_batches, make_train_iterator
from mai_jax.data import preference_pipeline as pp
from mai_jax.data.pipeline import DataMetrics
from mai_jax.data.tokenizer import check_tokenizer_record, load_or_train_tokenizer
from mai_jax.evaluate import evaluate_counted
from mai_jax.model import count_active_params, count_params
from mai_jax.train import init_from as init_from_lib
from mai_jax.train import preemption, prepare, reference, template_vocab
from mai_jax.train import step as step_lib
from mai_jax.train.faults import FaultMonitor
from mai_jax.train.trainer import build_trainer


@dataclasses.dataclass
class TrainResult:
  final_step: int
  final_loss: Optional[float]
  eval_loss: Optional[float]
  resumed_from: Optional[int]
  preempted: bool = False  # stopped early by a signal (a checkpoint was saved)
  skipped_updates: int = 0  # steps whose update was refused as non-finite
  fault_restores: int = 0  # checkpoint restores after persistent bad steps or loss spikes


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def write_config(cfg: Config, workdir: str) -> None:
  """Writes WORKDIR/config.json atomically (process 0)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config_lib.to_json(cfg))
  os.replace(tmp, path)




def train(cfg: Config, workdir: str) -> TrainResult:
  """Trains `cfg` in `workdir`, resuming from its latest good checkpoint when there is one.

  Everything that can refuse the run is checked before anything is written into `workdir`
  (see prepare.py), so a refused run leaves the workdir byte for byte as it was.
  SIGTERM/SIGINT save a checkpoint and return early with `preempted=True` (see preemption.py).
  """
  mesh = sharding_lib.make_mesh(cfg.mesh)
  config_lib.validate(cfg, jax.device_count())
  metrics_lib.check_tracking(cfg)
  workdir = os.path.abspath(workdir)
  cfg = init_from_lib.with_absolute_path(cfg)
  cfg, extension = template_vocab.plan(cfg, workdir, _log)  # the chat template's tokens
  try:
    config_lib.validate(cfg, jax.device_count())
    trainer = build_trainer(cfg, mesh)
    resume = prepare.check_resume(cfg, workdir, trainer.abstract_state())
    init_source = init_from_lib.source_for_run(cfg, workdir, _log)  # None when resuming
    choice = prepare.choose_tokenizer(cfg, workdir, init_source, _log, extension)
  except BaseException:
    if extension is not None:
      shutil.rmtree(extension.staging, ignore_errors=True)
    raise
  if pp.precomputed_reference(cfg) and choice.tokenizer is not None:
    reference.ensure_reference(cfg, choice.tokenizer, mesh, _log)  # the reference pass, once
  try:  # the data pipeline and eval batches are built (and checked) before the commit too
    if trainer.teacher is not None and choice.tokenizer is not None:
      trainer.teacher.check_tokenizer(choice.tokenizer)  # distillation: the teacher's token ids
    run = (_Run(cfg, mesh, workdir, trainer, choice.tokenizer, init_source)
           if choice.tokenizer is not None else None)
  except BaseException:
    prepare.cleanup(choice)
    raise
  tokenizer = prepare.commit(cfg, workdir, resume, choice, _log) or choice.tokenizer
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mai_jax workdir ready")
    if run is None:  # process 0 trained the tokenizer: load the file it wrote
      tokenizer = load_or_train_tokenizer(cfg, workdir, process_index=jax.process_index())
      check_tokenizer_record(workdir, tokenizer, write=False)
      run = _Run(cfg, mesh, workdir, trainer, tokenizer, init_source)
  run.open(tokenizer)
  try:
    with preemption.StopRequest() as stop:
      result = run.loop(stop)
  finally:
    run.close()
  if result.preempted:
    _log(f"mai-jax: stopped by {run.stop_reason} after step {result.final_step}; checkpoint "
         f"saved in {run.checkpointer.directory}. Rerun the same command to resume.")
  elif result.eval_loss is not None:
    since = f", first training loss {run.first_loss:.4f}" if run.first_loss is not None else ""
    _log(f"mai-jax: step {result.final_step}: validation loss {result.eval_loss:.4f} "
         f"(perplexity {math.exp(min(result.eval_loss, 50)):.2f} on {run.eval_tokens} "
         f"tokens{since})")
  return result


@dataclasses.dataclass
class _Pending:
  """A dispatched step whose metrics have not been read yet."""
  step: int  # the step count after it
  metrics: dict
  position: int  # which batch of the data stream it trained on
  stop_vote: Optional[jax.Array]
  data_metrics: dict  # realized mixture so far (host counters), logged with the step's metrics


class _Run:
  """One call of `train`: the state, the data stream position and the fault bookkeeping."""

  def __init__(self, cfg: Config, mesh, workdir: str, trainer, tokenizer, init_source=None):
    """Builds what reads only (the data stream, the eval batches); `open` then opens the
    checkpoint directory and the metric files, once the run has been accepted."""
    self.cfg, self.mesh, self.workdir = cfg, mesh, workdir
    self.init_source = init_source  # train.init_from, checked (None: random init or resuming)
    self.trainer = trainer
    num_params = count_params(cfg.model)
    self.num_params = num_params
    self.flops_per_token = metrics_lib.train_flops_per_token(  # MoE: the active parameters
        cfg.model, count_active_params(cfg.model), cfg.data.seq_len)
    self.peak = metrics_lib.device_peak_flops()
    pid, nproc = jax.process_index(), jax.process_count()
    self.data_iter = make_train_iterator(cfg, tokenizer, process_index=pid, process_count=nproc)
    self.initial_data_state = self.data_iter.get_state()
    self.data_metrics = DataMetrics(cfg)  # realized mixture: tokens per source (this run)
    rows = cfg.train.global_batch_size
    held_out = make_eval_batches(cfg, tokenizer, num_batches=eval_batch_count(cfg),
                                 process_index=pid, process_count=nproc)
    self.eval_batches = [step_lib.global_batch(b, self.trainer.batch_sharding, rows)  # placed once
                         for b in held_out]
    self.eval_tokens: Optional[int] = None  # tokens the last validation loss was measured on
    self.harness = None  # train.eval_tasks, checked now: a bad task refuses the run
    if cfg.train.eval_tasks:
      from mai_jax.harness import tasks as harness_tasks  # pylint: disable=import-outside-toplevel
      self.harness = harness_tasks.TrainEvals(cfg, mesh, tokenizer)
    self.checkpointer = self.writer = None
    self.metadata = {}
    self.monitor = FaultMonitor(cfg.train)
    self.vote = preemption.StopVote(mesh) if nproc > 1 else None
    self.position = 0  # batches drawn from the data stream so far (steps + skipped batches)
    self.skip_positions: set[int] = set()
    self.fault_restores = 0
    self.first_loss = self.last_loss = None
    self.stop_reason: Optional[str] = None
    self.progress = None
    self.console = None  # per-log_every lines when there is no progress bar

  def open(self, tokenizer) -> None:
    """Opens the checkpoint directory and the metric files (the first writes of the loop)."""
    self.checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"), self.cfg.checkpoint)
    self.writer = metrics_lib.MetricWriter(self.workdir, cfg=self.cfg)
    self.metadata = {"mai_jax_version": __version__, "jax_version": jax.__version__,
                     "mesh": dict(self.mesh.shape), "process_count": jax.process_count(),
                     "tokenizer": {"path": tokenizer.path, "sha256": tokenizer.content_hash}}

  # --------------------------------------------------------------------------------- state
  def _restore_or_init(self):
    """(state, step, step it resumed from or None)."""
    restored = self.checkpointer.restore_latest(self.trainer.abstract_state(), _log)
    if restored is None:
      return self._fresh_state(), 0, None
    self._apply_restored(restored)
    _log(f"mai-jax: resumed from step {restored.step} in {self.checkpointer.directory}")
    return restored.state, restored.step, restored.step

  def _fresh_state(self):
    """The state at step 0: a random init, or train.init_from's params with a fresh optimizer."""
    if not self.cfg.train.init_from:
      return self.trainer.init_state()
    if self.init_source is None:  # resuming was planned, but every own checkpoint was corrupt
      self.init_source = init_from_lib.prepare(self.cfg, _log)
    params = init_from_lib.restore_params(self.init_source, self.trainer.abstract_state().params)
    self.metadata["initialized_from"] = self.init_source.record()
    _log(f"mai-jax: initialized the parameters from {self.init_source.describe()}; fresh "
         f"optimizer state, step 0")
    return self.trainer.init_state_from_params(params)

  def _apply_restored(self, restored) -> None:
    if "initialized_from" in restored.metadata:  # keep the run's origin in later checkpoints
      self.metadata["initialized_from"] = restored.metadata["initialized_from"]
    self.data_iter.set_state(restored.data_state)
    self.position = int(restored.metadata.get("data_batches_consumed", restored.step))
    self.skip_positions = {p for p in restored.metadata.get("skip_batches", ())
                           if p >= self.position}

  def _recover(self, reason: str):
    """Goes back to the last checkpoint (or the start) and marks the bad batches for skipping."""
    self.fault_restores += 1
    if self.fault_restores > self.cfg.train.max_fault_restores:
      raise FloatingPointError(
          f"{reason}; already restored {self.cfg.train.max_fault_restores} times in this run "
          f"(train.max_fault_restores). Lower optim.learning_rate, set optim.grad_clip, or "
          f"inspect the data around these steps")
    bad = self.monitor.take_bad_positions()
    self.checkpointer.wait()
    restored = self.checkpointer.restore_latest(self.trainer.abstract_state(), _log)
    if restored is None:
      state, step = self._fresh_state(), 0
      self.data_iter.set_state(self.initial_data_state)
      self.position, self.skip_positions = 0, set()
    else:
      self._apply_restored(restored)
      state, step = restored.state, restored.step
    self.skip_positions.update(bad)
    _log(f"mai-jax: {reason}: restored step {step}; the batches at stream positions "
         f"{sorted(bad)} will be skipped")
    self.writer.write(step, {"fault_restores": self.fault_restores})
    return state, step

  def _save(self, step: int, state) -> None:
    metadata = {**self.metadata, "step": step, "data_batches_consumed": self.position,
                "skip_batches": sorted(self.skip_positions)}
    self.checkpointer.save(step, state, self.data_iter.get_state(),
                           config_lib.to_dict(self.cfg), metadata)

  # ---------------------------------------------------------------------------------- data
  def _next_batch(self):
    """The next global batch and its stream position, stepping over batches marked bad."""
    while self.position in self.skip_positions:
      next(self.data_iter)
      self.skip_positions.discard(self.position)
      _log(f"mai-jax: skipped the batch at stream position {self.position}")
      self.position += 1
    local = next(self.data_iter)
    self.data_metrics.add(local)
    self.position += 1
    batch = step_lib.global_batch(local, self.trainer.batch_sharding,
                                  self.cfg.train.global_batch_size)
    return batch, self.position - 1

  # ---------------------------------------------------------------------------------- loop
  def loop(self, stop: preemption.StopRequest) -> TrainResult:
    cfg, num_steps = self.cfg, self.cfg.train.num_steps
    state, step, resumed_from = self._restore_or_init()
    _log(f"mai-jax: {self.num_params:,} parameters, mesh {dict(self.mesh.shape)}, "
         f"{cfg.train.global_batch_size} x {cfg.data.seq_len} tokens per step")
    train_step, eval_step = self.trainer.jit_train_step(), self.trainer.jit_eval_step()
    self.progress = _progress_bar(cfg, step, num_steps)
    self.console = metrics_lib.ConsoleLog(num_steps) if self.progress is None else None
    profile = cfg.train.profile_steps
    eval_loss, pending, stop_agreed = None, None, False
    self.last_time = time.perf_counter()
    with sharding_lib.activate(self.mesh, cfg.mesh.rules):
      while True:
        dispatched = None
        if step < num_steps:
          if profile and step == profile[0]:
            jax.profiler.start_trace(os.path.join(self.workdir, "profile"))
          batch, position = self._next_batch()
          state, step_metrics = train_step(state, batch)
          vote = self.vote.dispatch(stop.requested) if self.vote is not None else None
          data_metrics = {}
          if self._logs(step + 1):  # a collective with several processes: same steps on all
            data_metrics = self.data_metrics.scalars(
                _sum_over_processes if jax.process_count() > 1 else None)
          dispatched = _Pending(step + 1, step_metrics, position, vote, data_metrics)
        if pending is not None:  # step N is queued: now read step N-1
          verdict, voted_stop = self._read(pending)
          stop_agreed = stop_agreed or voted_stop
          if verdict.restore:
            state, step = self._recover(verdict.reason)
            pending = None
            continue
        pending = dispatched
        if pending is None:
          break
        done = pending.step
        if profile and done == profile[1]:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
        if self.vote is None:
          stop_agreed = stop.requested
        if stop_agreed:
          self._read(pending)
          self.stop_reason = stop.signal_name or "another process's stop signal"
          self._save(done, state)
          self.checkpointer.wait()
          return self._result(done, None, resumed_from, preempted=True)
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < num_steps:
          eval_loss = self._evaluate(done, eval_step, state)
          if self.console is not None:
            self.console.eval(done, eval_loss)
        if self.checkpointer.should_save(done) and done < num_steps:
          # Judge the step before saving it, so a checkpoint never captures a bad streak.
          verdict, voted_stop = self._read(pending)
          pending, stop_agreed = None, stop_agreed or voted_stop
          if verdict.restore:
            state, step = self._recover(verdict.reason)
            continue
          if self.monitor.in_bad_streak:
            _log(f"mai-jax: not saving step {done}: it ends a run of bad steps")
          else:
            self._save(done, state)
        step = done
      eval_loss = self._evaluate(num_steps, eval_step, state)
      if self.checkpointer.latest_step() != num_steps:
        self._save(num_steps, state)
    return self._result(num_steps, eval_loss, resumed_from, preempted=False)

  def _evaluate(self, step: int, eval_step, state) -> float:
    """Validation loss (logged with the token count it is over) and train.eval_tasks' metrics
    (tasks/TASK/METRIC) at `step`."""
    eval_loss, self.eval_tokens = evaluate_counted(eval_step, state.params, self.eval_batches)
    scalars = {"eval_loss": eval_loss, "eval_tokens": self.eval_tokens}
    if self.harness is not None:
      scalars.update(self.harness.run(self.trainer.layout.model_spec.merge(state.params)))
    self.writer.write(step, scalars)
    return eval_loss

  def _result(self, step, eval_loss, resumed_from, *, preempted) -> TrainResult:
    return TrainResult(final_step=step, final_loss=self.last_loss, eval_loss=eval_loss,
                       resumed_from=resumed_from, preempted=preempted,
                       skipped_updates=self.monitor.skipped_updates,
                       fault_restores=self.fault_restores)

  def _read(self, pending: _Pending):
    """Fetches one step's metrics (blocking on that step only), logs them, judges the step.
    Returns (fault verdict, whether some process asked to stop)."""
    device_values = jax.device_get((pending.metrics, pending.stop_vote))
    values = {k: float(v) for k, v in device_values[0].items()}
    voted_stop = bool(device_values[1]) if device_values[1] is not None else False
    step, cfg = pending.step, self.cfg
    verdict = self.monitor.observe(step, pending.position, values["loss"],
                                   values.get("update_skipped", 0.0) > 0)
    if verdict.bad:
      _log(f"mai-jax: {verdict.reason}")
    else:
      self.last_loss = values["loss"]
      self.first_loss = self.last_loss if self.first_loss is None else self.first_loss
    now = time.perf_counter()
    step_time, self.last_time = now - self.last_time, now
    tokens_per_sec = cfg.train.global_batch_size * cfg.data.seq_len / max(step_time, 1e-9)
    utilization = metrics_lib.mfu(tokens_per_sec, self.flops_per_token, jax.device_count(),
                                  self.peak)
    if self.progress is not None:
      postfix = {"loss": f"{values['loss']:.3f}", "tok/s": f"{tokens_per_sec:,.0f}"}
      postfix["mfu"] = f"{utilization:.1%}" if utilization is not None else "n/a"
      self.progress.set_postfix(postfix, refresh=False)
      self.progress.update(1)
    if verdict.bad or self._logs(step):
      self.writer.write(step, {**values, **pending.data_metrics,
                               "tokens_per_sec": tokens_per_sec, "step_time_s": step_time,
                               "mfu": utilization,
                               "skipped_updates_total": self.monitor.skipped_updates,
                               "loss_spikes_total": self.monitor.spikes})
    if self.console is not None and self._logs(step):
      self.console.step(step, values["loss"], tokens_per_sec, utilization)
    return verdict, voted_stop

  def _logs(self, step: int) -> bool:
    return step % self.cfg.train.log_every == 0 or step == self.cfg.train.num_steps

  def close(self) -> None:
    if self.progress is not None:
      self.progress.close()
    try:
      if self.checkpointer is not None:
        self.checkpointer.close()
    finally:
      if self.writer is not None:
        self.writer.close()


def _sum_over_processes(x: np.ndarray) -> np.ndarray:
  return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)


def _progress_bar(cfg: Config, start: int, total: int):
  if not cfg.train.progress_bar or jax.process_index() != 0:
    return None
  from tqdm.auto import tqdm  # the bar adapts to notebooks too
  return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
