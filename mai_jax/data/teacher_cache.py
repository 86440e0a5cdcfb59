"""Top-K teacher cache: a teacher's next-token distribution for every train window of a token
cache (data/cache.py), stored once and read by every student run with the tokens.

Layout of CACHE/distill/NAME (written by `mai-jax distill cache`, train/distill_cache.py):

  ids          int32   [W * L, K]  the teacher's K most likely next tokens at each input position
  logps        float16 [W * L, K]  (or float32) their log-probabilities at temperature 1
  progress/    hostH.json: batches of windows process H has written (resuming starts after the
               fewest); deleted once the manifest exists
  spec.json    what is being written (a rerun with other settings starts over)
  manifest.json  format, teacher (workdir, step, vocab size, tokenizer sha256), token cache
               (path, tokenizer sha256, train tokens), seq_len L, top_k K, windows W, dtype; last,
               atomically: a folder without it is unfinished and refused

Row w * L + t belongs to input position t of train window w, the window of L + 1 tokens starting
at token w * L that cache_pipeline reads as a training row: the teacher saw exactly the inputs,
segment ids and positions the student sees, so a student must use the same data.seq_len. Storage
per token is K * (4 + 2) bytes with float16 (K = 64: 384 B, 384 GB per 1B tokens) and
K * (4 + 4) with float32. Each window's rows are one read chunk; each host writes its own rows of
each batch of windows as whole storage shards (no two processes write one file).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tensorstore as ts

from mai_jax.data.sources import SourceError

FORMAT = "mai_jax.teacher_topk.v1"
IDS_KEY, LOGPS_KEY = "teacher_ids", "teacher_logps"  # batch keys, int32 / float32 [B, T, K]
MANIFEST, SPEC, PROGRESS = "manifest.json", "spec.json", "progress"
DTYPES = ("float16", "float32")


class TeacherCacheError(SourceError):
  """A teacher cache is missing, unfinished or does not fit the run; the message says the fix."""


def cache_dir(token_cache: str, name: str) -> str:
  return os.path.join(token_cache, "distill", name)


def bytes_per_token(top_k: int, dtype: str = "float16") -> int:
  return top_k * (4 + np.dtype(dtype).itemsize)


def store(path: str, *, dtype=None, shape=None, read_rows: int = 0, write_rows: int = 0,
          create: bool = False, writable: bool = False):
  """The zarr3 array at `path` ([rows, K]); created with read chunks of `read_rows` rows inside
  storage shards of `write_rows` rows."""
  spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
  if not create:
    return ts.open(spec, read=True, write=writable).result()
  layout = ts.ChunkLayout(read_chunk_shape=[read_rows, shape[1]],
                          write_chunk_shape=[write_rows, shape[1]])
  return ts.open(spec, create=True, delete_existing=True, dtype=dtype, shape=shape,
                 chunk_layout=layout).result()


@dataclasses.dataclass
class TeacherCache:
  manifest: dict
  ids: ts.TensorStore
  logps: ts.TensorStore

  @property
  def seq_len(self) -> int:
    return int(self.manifest["seq_len"])

  def read_window(self, window: int):
    """Futures of (ids int32 [L, K], logps [L, K]) of one window."""
    rows = slice(window * self.seq_len, (window + 1) * self.seq_len)
    return self.ids[rows].read(), self.logps[rows].read()


def open_teacher_cache(path: str) -> TeacherCache:
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isfile(manifest_path):
    what = "unfinished (rerun the same `mai-jax distill cache` command: it resumes)" if \
        os.path.isdir(path) else "not found"
    raise TeacherCacheError(f"teacher cache {path}: {what}; write it with `mai-jax distill cache "
                            f"--teacher WORKDIR --data TOKEN_CACHE --top-k K`")
  with open(manifest_path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT:
    raise TeacherCacheError(f"teacher cache {path} has format {manifest.get('format')!r}, expected "
                            f"{FORMAT!r}; rewrite it with `mai-jax distill cache`")
  return TeacherCache(manifest, store(os.path.join(path, "ids")),
                      store(os.path.join(path, "logps")))


def check_for_run(cache: TeacherCache, path: str, token_manifest: dict, num_windows: int,
                  seq_len: int, vocab_size: int) -> None:
  """Refuses a teacher cache made for other tokens, another seq_len or another vocabulary."""
  m = cache.manifest
  if m["seq_len"] != seq_len:
    raise TeacherCacheError(f"teacher cache {path} was written for windows of data.seq_len="
                            f"{m['seq_len']}; set --config.data.seq_len={m['seq_len']} or rewrite "
                            f"it with `mai-jax distill cache --seq-len {seq_len}`")
  if m["teacher"]["vocab_size"] != vocab_size:
    raise TeacherCacheError(f"teacher cache {path}: the teacher's vocabulary has "
                            f"{m['teacher']['vocab_size']} tokens but model.vocab_size is "
                            f"{vocab_size}; distillation needs the same vocabulary")
  if (m["token_cache"]["tokenizer_sha256"] != token_manifest["tokenizer"]["sha256"]
      or m["num_windows"] != num_windows):
    raise TeacherCacheError(f"teacher cache {path} was written for other tokens than its token "
                            f"cache holds now ({m['num_windows']} windows, {num_windows} now); "
                            f"rewrite it with `mai-jax distill cache`")
