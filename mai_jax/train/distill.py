"""train.objective='distill': the student's loss against a teacher (train/distill_loss.py).

The teacher arrives in one of two ways, and the loss is the same function of either:
  online   train.distill_teacher=WORKDIR: the step runs the frozen bf16 teacher on the batch first
           (train/distill_teacher.py), then the student's forward/backward against its logits;
  cached   train.distill_cache=NAME: batches carry the teacher's top-K log-probs and ids
           [B, T, K] read with the tokens from the token cache (data/teacher_cache.py).
alpha and the temperature follow linear schedules over train.num_steps; the step writes their
values for its step into the batch as per-row arrays [B] (so microbatches carry them), the only
thing `prepare_batch` adds besides the online teacher's logits.

The metric `loss` stays the student's cross-entropy on the data (comparable with a pretraining
run; evaluation is that CE too); `total_loss` is the distillation objective and `distill/kd` the
divergence alone.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax.numpy as jnp
import optax

from mai_jax.config import Config
from mai_jax.data import teacher_cache
from mai_jax.train import moe_aux
from mai_jax.train.distill_loss import DistillLossConfig, distill_sums

TEACHER_IDS, TEACHER_LOGPS = teacher_cache.IDS_KEY, teacher_cache.LOGPS_KEY  # [B, T, K]
TEACHER_LOGITS = "teacher_logits"  # bf16 [B, T, V], made inside the step (online teacher)
ALPHA, TEMPERATURE = "distill_alpha", "distill_temperature"  # float32 [B], made inside the step
CACHE_KEYS = (TEACHER_IDS, TEACHER_LOGPS)


def uses_cache(cfg: Config) -> bool:
  return cfg.train.objective == "distill" and bool(cfg.train.distill_cache)


def loss_config(cfg: Config) -> DistillLossConfig:
  return DistillLossConfig(divergence=cfg.train.distill_divergence,
                           chunk_tokens=cfg.train.distill_chunk_tokens)


def schedules(cfg: Config) -> tuple[optax.Schedule, optax.Schedule]:
  """(alpha, temperature) as functions of the step: linear from the value to its *_final."""
  t = cfg.train
  def linear(first: float, final: Optional[float]) -> optax.Schedule:
    if final is None or final == first:
      return optax.constant_schedule(first)
    return optax.linear_schedule(first, final, max(t.num_steps, 1))
  return (linear(t.distill_alpha, t.distill_alpha_final),
          linear(t.distill_temperature, t.distill_temperature_final))


def make_prepare_batch(cfg: Config, teacher=None) -> Callable:
  """prepare(step, batch, *teacher_params) -> the batch with this step's alpha and T per row
  and, with an online teacher, its logits."""
  alpha_fn, temperature_fn = schedules(cfg)

  def prepare(step, batch, *teacher_params):
    rows = batch["inputs"].shape[0]
    batch = {**batch, ALPHA: jnp.full((rows,), alpha_fn(step), jnp.float32),
             TEMPERATURE: jnp.full((rows,), temperature_fn(step), jnp.float32)}
    if teacher is not None:
      batch[TEACHER_LOGITS] = teacher.logits(teacher_params[0], batch)
    return batch
  return prepare


def summed_distill_loss(params, batch, model_spec, loss_cfg: DistillLossConfig,
                        weight_key: str):
  """(sum of the distillation loss [+ MoE aux], (CE sum, token count, MoE statistics, sums of
  'distill/kd', 'distill/alpha', 'distill/temperature'))), like step.summed_loss."""
  model = model_spec.merge(params)
  logits_BTV, moe = model.forward_with_aux(batch["inputs"], batch["segment_ids"],
                                           batch["positions"])
  weights_BT = (batch["segment_ids"] != 0).astype(jnp.float32)
  if weight_key in batch:
    weights_BT = weights_BT * batch[weight_key].astype(jnp.float32)
  sums = distill_sums(loss_cfg, logits_BTV, batch["targets"], weights_BT, batch[ALPHA],
                      batch[TEMPERATURE], teacher_logits_BTV=batch.get(TEACHER_LOGITS),
                      teacher_ids_BTK=batch.get(TEACHER_IDS),
                      teacher_logps_BTK=batch.get(TEACHER_LOGPS))
  tokens = sums["tokens"]
  loss_sum = sums["loss"]
  if moe:
    loss_sum = loss_sum + tokens * moe_aux.aux_loss(model.cfg, moe)
  row_tokens_B = jnp.sum(weights_BT, axis=-1)
  extra = {"distill/kd": sums["kd"], "distill/alpha": jnp.sum(batch[ALPHA] * row_tokens_B),
           "distill/temperature": jnp.sum(batch[TEMPERATURE] * row_tokens_B)}
  return loss_sum, (sums["ce"], tokens, moe, extra)
