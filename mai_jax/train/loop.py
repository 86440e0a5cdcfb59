"""The training loop: `train(cfg, workdir)`, importable from notebooks as well as the CLI.

The loop dispatches step N before fetching step N-1's metrics, so the host never waits on the
device while it could be preparing the next batch. Only process 0 writes files and prints.
"""

from __future__ import annotations

import dataclasses
import math
import os
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
from mai_jax.data.pipeline import make_eval_batches, make_train_iterator
from mai_jax.data.tokenizer import load_or_train_tokenizer
from mai_jax.model import count_active_params, count_params
from mai_jax.train import step as step_lib
from mai_jax.train.trainer import build_trainer


@dataclasses.dataclass
class TrainResult:
  final_step: int
  final_loss: Optional[float]
  eval_loss: Optional[float]
  resumed_from: Optional[int]


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


def global_batch(local: dict, sharding, global_rows: int) -> dict:
  """Builds global jax arrays from this host's rows of the batch."""
  out = {}
  for key in step_lib.BATCH_KEYS:
    x = np.asarray(local[key], np.int32)
    out[key] = jax.make_array_from_process_local_data(sharding, x, (global_rows, x.shape[1]))
  return out


def _tokenizer(cfg: Config, workdir: str):
  """Process 0 trains (or loads) the tokenizer first; the others then load the same file.
  The tokenizer checks its size against model.vocab_size itself."""
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      load_or_train_tokenizer(cfg, workdir, process_index=0)
    multihost_utils.sync_global_devices("mai_jax tokenizer ready")
  return load_or_train_tokenizer(cfg, workdir, process_index=jax.process_index())


def evaluate(eval_step, params, batches) -> float:
  """Token-weighted mean cross-entropy over the given (global, on-device) batches."""
  ce_total, tokens_total = 0.0, 0.0
  pending = [eval_step(params, batch) for batch in batches]
  for ce, tokens in jax.device_get(pending):
    ce_total += float(ce)
    tokens_total += float(tokens)
  return ce_total / max(tokens_total, 1.0)


def train(cfg: Config, workdir: str) -> TrainResult:
  """Trains `cfg` in `workdir`, resuming from its latest checkpoint when there is one."""
  mesh = sharding_lib.make_mesh(cfg.mesh)
  config_lib.validate(cfg, jax.device_count())
  workdir = os.path.abspath(workdir)
  write_config(cfg, workdir)
  tokenizer = _tokenizer(cfg, workdir)

  num_steps = cfg.train.num_steps
  trainer = build_trainer(cfg, mesh)
  num_params = count_params(cfg.model)
  flops_per_token = metrics_lib.train_flops_per_token(cfg.model, count_active_params(cfg.model),
                                                      cfg.data.seq_len)  # MoE: active params
  peak = metrics_lib.device_peak_flops()

  pid, nproc = jax.process_index(), jax.process_count()
  data_iter = make_train_iterator(cfg, tokenizer, process_index=pid, process_count=nproc)
  eval_batches = make_eval_batches(cfg, tokenizer, num_batches=cfg.train.eval_batches,
                                   process_index=pid, process_count=nproc)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
  resumed_from = checkpointer.latest_step()
  if resumed_from is not None:
    if resumed_from > num_steps:
      checkpointer.close()
      raise config_lib.ConfigError(
          f"{checkpointer.directory} holds a checkpoint at step {resumed_from}, past "
          f"train.num_steps={num_steps}; set --config.train.num_steps>={resumed_from} to go on, "
          f"or use a new --workdir")
    state = checkpointer.restore(resumed_from, trainer.abstract_state(), data_iter)
    _log(f"mai-jax: resumed from step {resumed_from} in {checkpointer.directory}")
  else:
    state = trainer.init_state()
  _log(f"mai-jax: {num_params:,} parameters, mesh {dict(mesh.shape)}, "
       f"{cfg.train.global_batch_size} x {cfg.data.seq_len} tokens per step")

  batch_sharding = trainer.batch_sharding
  rows = cfg.train.global_batch_size
  train_step, eval_step = trainer.jit_train_step(), trainer.jit_eval_step()
  eval_batches = [global_batch(b, batch_sharding, rows) for b in eval_batches]  # placed once

  writer = metrics_lib.MetricWriter(workdir)
  metadata = {"mai_jax_version": __version__, "jax_version": jax.__version__,
              "mesh": dict(mesh.shape), "process_count": nproc,
              "tokenizer": {"path": tokenizer.path, "sha256": tokenizer.content_hash}}
  start = int(jax.device_get(state.step))
  progress = _progress_bar(cfg, start, num_steps)
  tokens_per_step = rows * cfg.data.seq_len
  profile = cfg.train.profile_steps
  first_loss, last_loss, eval_loss = None, None, None
  pending = None  # (step, metrics on device) of the step dispatched before this one
  last_time = time.perf_counter()
  try:
    with sharding_lib.activate(mesh, cfg.mesh.rules):
      for step in range(start, num_steps):
        if profile and step == profile[0]:
          jax.profiler.start_trace(os.path.join(workdir, "profile"))
        batch = global_batch(next(data_iter), batch_sharding, rows)
        state, step_metrics = train_step(state, batch)
        if pending is not None:  # step N is queued: now read step N-1
          last_loss = _report(pending, writer, progress, cfg, tokens_per_step, last_time,
                              flops_per_token, peak)
          first_loss = last_loss if first_loss is None else first_loss
          last_time = time.perf_counter()
        pending = (step + 1, step_metrics)
        if profile and step + 1 == profile[1]:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
        done = step + 1
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < num_steps:
          eval_loss = evaluate(eval_step, state.params, eval_batches)
          writer.write(done, {"eval_loss": eval_loss})
        if checkpointer.should_save(done) and done < num_steps:
          checkpointer.save(done, state, data_iter, config_lib.to_dict(cfg), metadata)
      if pending is not None:
        last_loss = _report(pending, writer, progress, cfg, tokens_per_step, last_time,
                            flops_per_token, peak)
      eval_loss = evaluate(eval_step, state.params, eval_batches)
      writer.write(num_steps, {"eval_loss": eval_loss})
      if checkpointer.latest_step() != num_steps:
        checkpointer.save(num_steps, state, data_iter, config_lib.to_dict(cfg), metadata)
  finally:
    if progress is not None:
      progress.close()
    checkpointer.close()
    writer.close()
  if eval_loss is not None:
    since = f", first training loss {first_loss:.4f}" if first_loss is not None else ""
    _log(f"mai-jax: step {num_steps}: validation loss {eval_loss:.4f} "
         f"(perplexity {math.exp(min(eval_loss, 50)):.2f}{since})")
  return TrainResult(final_step=num_steps, final_loss=last_loss, eval_loss=eval_loss,
                     resumed_from=resumed_from)


def _progress_bar(cfg: Config, start: int, total: int):
  if not cfg.train.progress_bar or jax.process_index() != 0:
    return None
  from tqdm.auto import tqdm  # the bar adapts to notebooks too
  return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _report(pending, writer, progress, cfg: Config, tokens_per_step: int, since: float,
            flops_per_token: float, peak) -> float:
  """Fetches one step's metrics (blocking on that step only), logs them, returns its loss."""
  step, device_metrics = pending
  values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
  if not math.isfinite(values["loss"]):
    raise FloatingPointError(f"non-finite loss {values['loss']} at step {step}; lower "
                             f"optim.learning_rate or set optim.grad_clip")
  step_time = time.perf_counter() - since
  tokens_per_sec = tokens_per_step / max(step_time, 1e-9)
  utilization = metrics_lib.mfu(tokens_per_sec, flops_per_token, jax.device_count(), peak)
  if progress is not None:
    postfix = {"loss": f"{values['loss']:.3f}", "tok/s": f"{tokens_per_sec:,.0f}"}
    postfix["mfu"] = f"{utilization:.1%}" if utilization is not None else "n/a"
    progress.set_postfix(postfix, refresh=False)
    progress.update(1)
  if step % cfg.train.log_every == 0 or step == cfg.train.num_steps:
    writer.write(step, {**values, "tokens_per_sec": tokens_per_sec, "step_time_s": step_time,
                        "mfu": utilization})
  return values["loss"]
