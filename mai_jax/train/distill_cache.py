"""`mai-jax distill cache`: run a teacher once over a token cache's train windows and keep its top-K
next-token log-probs (data/teacher_cache.py), so student runs need no teacher on their devices.

Why a cache: a 500B teacher's forward costs ~40x a 4B student's training step, and every student
run (sizes, seeds, ablations) would pay it again. The cache is written in batches of windows, each
host its own rows of each batch (the teacher runs sharded over all devices, as in training);
after each batch a host records its progress, so a rerun of the same command continues after the
batch every host has finished. Another teacher, token cache, K, seq_len, batch or dtype starts
over.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mai_jax import sharding as sharding_lib
from mai_jax import workdir as workdir_lib
from mai_jax import config as config_lib
from mai_jax.config import ConfigError
from mai_jax.data import cache as cache_lib
from mai_jax.data import cache_pipeline, streams
from mai_jax.data import teacher_cache as tc
from mai_jax.train import init_from as init_from_lib
from mai_jax.train import step as step_lib
from mai_jax.train.distill_teacher import Teacher


def topk_fn(teacher: Teacher, top_k: int) -> Callable:
  """(params, batch) -> (log-probs float32 [B, T, K], ids int32 [B, T, K]), the teacher's K most
  likely next tokens; the log-softmax is taken over the model's float32 logits."""
  def fn(params, batch):
    logits_BTV = teacher.logits(params, batch, dtype=jnp.float32)
    return jax.lax.top_k(jax.nn.log_softmax(logits_BTV, axis=-1), top_k)
  return fn


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def write_teacher_cache(teacher_path: str, token_cache: str, top_k: int, *,
                        seq_len: int = 0, batch_size: int = 0, name: str = "",
                        dtype: str = "float16", log: Callable[[str], None] = print,
                        stop_after: Optional[int] = None) -> str:
  """Writes (or finishes) TOKEN_CACHE/distill/NAME (default NAME: topK) and returns its path.
  seq_len / batch_size 0: the teacher's data.seq_len / train.global_batch_size. `stop_after`
  batches: return early, unfinished (a time-boxed job; rerun to go on)."""
  cfg, _ = workdir_lib.open_checkpoint(teacher_path)  # a mesh that fits the devices here
  seq_len, batch = seq_len or cfg.data.seq_len, batch_size or cfg.train.global_batch_size
  if dtype not in tc.DTYPES:
    raise ConfigError(f"--dtype {dtype!r} must be one of {', '.join(tc.DTYPES)}")
  if not 1 <= top_k <= cfg.model.vocab_size:
    raise ConfigError(f"--top-k {top_k} must be in [1, {cfg.model.vocab_size}] (the teacher's "
                      f"vocabulary)")
  mesh = sharding_lib.make_mesh(cfg.mesh)
  teacher = Teacher(teacher_path, cfg, mesh, key="--teacher")
  token_manifest, splits = cache_lib.open_cache(token_cache)
  want = init_from_lib.source_tokenizer_hash(teacher.source)
  have = token_manifest["tokenizer"]
  if want is not None and want != have["sha256"]:
    raise ConfigError(f"--data {token_cache} was tokenized with {have['path']} (sha256 "
                      f"{have['sha256'][:12]}), not the teacher's tokenizer (sha256 {want[:12]}); "
                      f"tokenize it with --config.data.tokenizer_path=TEACHER_TOKENIZER")
  split = splits["train"]
  windows = split.num_windows(seq_len)
  if windows < 1:
    raise ConfigError(f"--data {token_cache}: fewer than seq_len + 1 = {seq_len + 1} train tokens")
  run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_size=batch))
  lo, hi = streams.host_rows(run_cfg, jax.process_index(), jax.process_count())
  out = tc.cache_dir(token_cache, name or f"topk{top_k}")
  spec = {"teacher": {"workdir": teacher.source.workdir, "step": teacher.source.step},
          "token_cache": os.path.abspath(token_cache), "token_count": split.num_tokens,
          "seq_len": seq_len, "top_k": top_k, "batch": batch, "dtype": dtype,
          "process_count": jax.process_count()}
  if (os.path.isfile(os.path.join(out, tc.MANIFEST))
      and config_lib.read_json_or_none(os.path.join(out, tc.SPEC)) == spec):
    log(f"mai-jax: teacher cache {out} is complete and up to date")
    return out
  rows = windows * seq_len
  if jax.process_index() == 0 and config_lib.read_json_or_none(os.path.join(out, tc.SPEC)) != spec:
    if os.path.isdir(out):
      log(f"mai-jax: {out} was written with other settings; starting over")
      shutil.rmtree(out)
    os.makedirs(os.path.join(out, tc.PROGRESS))
    for key, dt in (("ids", "int32"), ("logps", dtype)):
      tc.store(os.path.join(out, key), dtype=dt, shape=[rows, top_k], read_rows=seq_len,
               write_rows=(hi - lo) * seq_len, create=True)
    cache_lib.write_json(os.path.join(out, tc.SPEC), spec)  # last: the arrays exist once it does
  _sync("mai_jax teacher cache created")
  ids_store, logps_store = (tc.store(os.path.join(out, k), writable=True) for k in ("ids", "logps"))
  done = [(config_lib.read_json_or_none(os.path.join(out, tc.PROGRESS, f"host{p}.json")) or {}).get("batches", 0)
          for p in range(jax.process_count())]
  start, num_batches = min(done), math.ceil(windows / batch)
  if start:
    log(f"mai-jax: resuming {out} after {start} of {num_batches} batches")
  params, sharding = teacher.params, step_lib.batch_sharding(mesh, run_cfg)
  fn = jax.jit(topk_fn(teacher, top_k))
  stop = num_batches if stop_after is None else min(num_batches, start + stop_after)
  for b in range(start, stop):
    mine = np.arange(b * batch + lo, min(b * batch + hi, windows))
    local = _window_rows(split, mine, seq_len, hi - lo)
    logps, ids = fn(params, step_lib.global_batch(local, sharding, batch))
    if jax.process_count() > 1:
      logps, ids = (multihost_utils.process_allgather(x, tiled=True)[lo:hi] for x in (logps, ids))
    else:
      logps, ids = jax.device_get((logps, ids))
    n = len(mine)
    if n:
      where = slice(int(mine[0]) * seq_len, (int(mine[0]) + n) * seq_len)
      writes = [ids_store[where].write(np.asarray(ids[:n], np.int32).reshape(n * seq_len, -1)),
                logps_store[where].write(np.asarray(logps[:n]).astype(dtype)
                                         .reshape(n * seq_len, -1))]
      for w in writes:
        w.result()
    cache_lib.write_json(os.path.join(out, tc.PROGRESS, f"host{jax.process_index()}.json"),
                {"batches": b + 1})
    log(f"mai-jax: teacher cache batch {b + 1}/{num_batches}")
  if stop < num_batches:
    return out
  _sync("mai_jax teacher cache written")
  if jax.process_index() == 0:
    tokenizer = token_manifest["tokenizer"]
    cache_lib.write_json(os.path.join(out, tc.MANIFEST), {
        "format": tc.FORMAT, **{k: spec[k] for k in ("seq_len", "top_k", "dtype")},
        "num_windows": windows, "bytes_per_token": tc.bytes_per_token(top_k, dtype),
        "teacher": {**spec["teacher"], "vocab_size": cfg.model.vocab_size,
                    "tokenizer_sha256": want},
        "token_cache": {"path": spec["token_cache"], "tokenizer_sha256": tokenizer["sha256"],
                        "train_tokens": split.num_tokens}})
    shutil.rmtree(os.path.join(out, tc.PROGRESS), ignore_errors=True)
  log(f"mai-jax: wrote {out}: top-{top_k} teacher log-probs of {windows} windows x {seq_len} "
      f"tokens ({tc.bytes_per_token(top_k, dtype)} B/token)")
  return out


def _window_rows(split, windows: np.ndarray, seq_len: int, rows: int) -> dict[str, np.ndarray]:
  """Training rows of these train windows (exactly what cache_pipeline gives a student), filled
  up to `rows` with padding rows (segment id 0) in the last batch."""
  feats = [cache_pipeline.window_features(t, int(w), split.offsets, seq_len)
           for t, w in zip(split.read_windows(windows, seq_len), windows)]
  feats += [{k: np.zeros(seq_len, np.int32) for k in step_lib.BATCH_KEYS}] * (rows - len(feats))
  return {k: np.stack([f[k] for f in feats]) for k in step_lib.BATCH_KEYS}
