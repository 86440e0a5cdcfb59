"""The online teacher of train.objective='distill' (and of `mai-jax distill cache`): a frozen
model read from a workdir, in bf16, sharded on the student's mesh by the student's rules.

Any workdir a reader accepts will do (a training run, `convert from-hf`, `checkpoints
--export-params`; WORKDIR/checkpoints/STEP picks a step). It must speak the student's language:
the same vocabulary size and, where the teacher records one, the same tokenizer file (token id i
must mean the same piece for both, or the soft targets teach the wrong tokens); either mismatch is
a ConfigError before anything is written. The teacher's parameters are restored as bf16 (orbax
casts while reading, so a float32 checkpoint is never held whole) on first use; its forward runs
inside the student's jitted step, and only its logits (bf16) leave it, never its gradients.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from mai_jax import checkpoint as checkpoint_lib
from mai_jax import workdir as workdir_lib
from mai_jax.config import Config, ConfigError
from mai_jax.train import init_from as init_from_lib
from mai_jax.train.frozen import FrozenWeights

KEY = "train.distill_teacher"


class Teacher(FrozenWeights):
  """A checked teacher workdir: its model (bf16) on `mesh`, params restored on first use."""

  def __init__(self, path: str, cfg: Config, mesh, key: str = KEY):
    self.key, self.path = key, path
    self.source = init_from_lib.resolve(path, key)
    teacher_model = self.source.cfg.model
    if teacher_model.vocab_size != cfg.model.vocab_size:
      raise ConfigError(
          f"{key}={path}: the teacher's vocabulary has {teacher_model.vocab_size} tokens but the "
          f"student's model.vocab_size is {cfg.model.vocab_size}; distillation needs the same "
          f"tokenizer and vocabulary: set --config.model.vocab_size={teacher_model.vocab_size} "
          f"and --config.data.tokenizer_path to the teacher's tokenizer")
    self.model_cfg = dataclasses.replace(teacher_model, param_dtype="bfloat16",
                                         compute_dtype="bfloat16", remat="none")
    self.cfg = dataclasses.replace(cfg, model=self.model_cfg)  # the student's mesh and rules
    self.spec, self.abstract_params = workdir_lib.abstract_params(self.cfg, mesh)
    mismatch = checkpoint_lib.params_shape_mismatch(self.source.checkpoints, self.source.step,
                                                    self.abstract_params)
    if mismatch is not None:
      name, have, want = mismatch
      raise ConfigError(f"{key}={path}: params/{name} is {have} in {self.source.describe()} but "
                        f"{want} in its config.json's model; the workdir is inconsistent")

  def describe(self) -> str:
    return self.source.describe()

  def logits(self, params, batch, dtype=jnp.bfloat16) -> jax.Array:
    """logits_BTV of the batch's rows, bf16 by default (no gradient flows into the teacher)."""
    model = self.spec.merge(jax.lax.stop_gradient(params))
    logits_BTV = model(batch["inputs"], batch["segment_ids"], batch["positions"])
    return jax.lax.stop_gradient(logits_BTV.astype(dtype))

  def check_tokenizer(self, tokenizer) -> None:
    """The run's tokenizer must be the teacher's (when the teacher records one)."""
    want = init_from_lib.source_tokenizer_hash(self.source)
    if want is not None and want != tokenizer.content_hash:
      hint = next((os.path.join(self.source.workdir, n) for n in ("tokenizer.model",
                                                                  "tokenizer.json")
                   if os.path.isfile(os.path.join(self.source.workdir, n))), "its tokenizer file")
      raise ConfigError(
          f"{self.key}={self.path}: the teacher was trained with another tokenizer (sha256 "
          f"{want[:12]}) than this run's {tokenizer.path} (sha256 {tokenizer.content_hash[:12]}); "
          f"the same text would get other ids: set --config.data.tokenizer_path={hint}")


def for_run(cfg: Config, mesh):
  """The online teacher of a distillation run, or None (other objectives, cached teacher)."""
  if cfg.train.objective != "distill" or not cfg.train.distill_teacher:
    return None
  return Teacher(cfg.train.distill_teacher, cfg, mesh)
