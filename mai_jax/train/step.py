"""Pure train and eval steps: `train_step(state, batch) -> (state, metrics)`.

Batches are dicts of int32 [B, T] arrays: `inputs`, `targets`, `segment_ids` (0 = padding, which
carries no loss) and `positions`, plus, for objectives that train on some tokens only (SFT:
assistant replies), float32 `loss_weights` [B, T]. The loss is the weighted mean token
cross-entropy over non-padding targets (weight 1 without loss_weights, so the mean is over the
trained tokens), plus an optional z-loss (PaLM) that keeps the softmax normalizer near 1. With
microbatches the gradient of the *sum* is accumulated inside the jitted step and divided by the
total weight once, so the result equals a single big batch regardless of how it is split.

One step builder for every objective: `summed_objective_loss` picks the loss of train.objective,
token cross-entropy (pretrain, sft) or a preference loss (dpo, simpo, orpo: train/preference.py,
whose batches hold a chosen and a rejected row per pair); each returns a sum, a count (tokens or
pairs) and sums of its own metrics, which the step divides by the count.

A step whose loss or gradient norm is not finite leaves parameters and optimizer state unchanged
(only the step counter advances, so the data stream and the schedule stay aligned with the step) and
reports `update_skipped` = 1; the loop counts such steps and restores a checkpoint if they persist.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from mai_jax import sharding as sharding_lib
from mai_jax.config import PREFERENCE_OBJECTIVES, Config
from mai_jax.data import preference_pipeline as pp
from mai_jax.train import distill, moe_aux, preference
from mai_jax.train.state import ModelSpec, TrainState

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")
WEIGHT_KEY = "loss_weights"  # float32 per-target weights of objectives that train on some tokens
_FLOAT_KEYS = (WEIGHT_KEY, pp.REJECTED + WEIGHT_KEY, *pp.REFERENCE_KEYS, distill.TEACHER_LOGPS)


def batch_keys(cfg: Config) -> tuple[str, ...]:
  """The keys of the run's batches: SFT batches carry loss_weights (data/chat_pipeline.py),
  preference batches a rejected row per pair and, for DPO, reference log-probs [P]
  (data/preference_pipeline.py)."""
  if cfg.train.objective == "sft":
    return BATCH_KEYS + (WEIGHT_KEY,)
  if cfg.train.objective in PREFERENCE_OBJECTIVES:
    rows = pp.ROW_KEYS + tuple(pp.REJECTED + k for k in pp.ROW_KEYS)
    return rows + (pp.REFERENCE_KEYS if pp.precomputed_reference(cfg) else ())
  if distill.uses_cache(cfg):  # the teacher's top-K [B, T, K] from the cache
    return BATCH_KEYS + distill.CACHE_KEYS
  return BATCH_KEYS


def _key_ndim(key: str) -> int:
  return 1 if key in pp.REFERENCE_KEYS else 3 if key in distill.CACHE_KEYS else 2


def key_sharding(batch_sharding_: NamedSharding, ndim: int) -> NamedSharding:
  """The [B, T] batch sharding, or its row part for per-row keys [B] (reference log-probs) and
  per-token keys [B, T, K] (a cached teacher's top-K)."""
  if ndim == 2:
    return batch_sharding_
  return NamedSharding(batch_sharding_.mesh,
                       PartitionSpec(batch_sharding_.spec[0], *([None] * (ndim - 1))))


def abstract_batch(cfg: Config, sharding: NamedSharding, top_k: int = 64) -> dict:
  """ShapeDtypeStructs of a global batch of the run's objective (for lowering without data);
  `top_k`: a cached teacher's K."""
  rows, seq_len = cfg.train.global_batch_size, cfg.data.seq_len
  out = {}
  for key in batch_keys(cfg):
    shape = ((rows,), (rows, seq_len), (rows, seq_len, top_k))[_key_ndim(key) - 1]
    out[key] = jax.ShapeDtypeStruct(shape, jnp.float32 if key in _FLOAT_KEYS else jnp.int32,
                                    sharding=key_sharding(sharding, len(shape)))
  return out


def global_batch(local: dict, sharding: NamedSharding, global_rows: int) -> dict:
  """Global jax arrays from this host's rows of every batch key it holds (int32 tokens, float32
  weights and reference log-probs)."""
  out = {}
  for key in (BATCH_KEYS + _FLOAT_KEYS + tuple(pp.REJECTED + k for k in BATCH_KEYS)
              + (distill.TEACHER_IDS,)):
    if key in local:
      x = np.asarray(local[key], np.float32 if key in _FLOAT_KEYS else np.int32)
      out[key] = jax.make_array_from_process_local_data(key_sharding(sharding, x.ndim), x,
                                                        (global_rows,) + x.shape[1:])
  return out


def summed_objective_loss(cfg: Config) -> Callable:
  """loss(params, batch, model_spec) -> (loss sum, (metric loss sum, count, MoE statistics,
  sums of objective metrics)) for train.objective: token cross-entropy (pretraining, SFT) or a
  preference loss (one loss per objective; the step divides everything by the count)."""
  if cfg.train.objective in PREFERENCE_OBJECTIVES:
    loss_cfg = preference.loss_config(cfg)
    return lambda params, batch, spec: preference.summed_preference_loss(params, batch, spec,
                                                                         loss_cfg)
  if cfg.train.objective == "distill":
    distill_cfg = distill.loss_config(cfg)
    return lambda params, batch, spec: distill.summed_distill_loss(params, batch, spec,
                                                                   distill_cfg, WEIGHT_KEY)
  z_loss_weight = cfg.train.z_loss_weight
  return lambda params, batch, spec: summed_loss(params, batch, spec, z_loss_weight)


def token_losses(logits_BTV: jax.Array, targets_BT: jax.Array, z_loss_weight: float):
  """Per-token cross-entropy (+ z-loss) in float32; returns (loss_BT, ce_BT)."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  ce_BT = log_z_BT - target_logit_BT
  loss_BT = ce_BT + z_loss_weight * jnp.square(log_z_BT) if z_loss_weight else ce_BT
  return loss_BT, ce_BT


def summed_loss(params, batch, model_spec: ModelSpec, z_loss_weight: float):
  """Sum over non-padding tokens of the loss, times `loss_weights` when the batch has them;
  aux = (ce sum, token count = sum of the weights, MoE router statistics).

  MoE models add their per-token aux objective (router z-loss, load balancing) times the token
  count, so dividing by the total token count gives loss + aux as for one big batch."""
  model = model_spec.merge(params)
  logits_BTV, moe = model.forward_with_aux(batch["inputs"], batch["segment_ids"],
                                           batch["positions"])
  loss_BT, ce_BT = token_losses(logits_BTV, batch["targets"], z_loss_weight)
  weights_BT = (batch["segment_ids"] != 0).astype(jnp.float32)
  if WEIGHT_KEY in batch:
    weights_BT = weights_BT * batch[WEIGHT_KEY].astype(jnp.float32)
  tokens = jnp.sum(weights_BT)
  loss_sum = jnp.sum(loss_BT * weights_BT)
  if moe:
    loss_sum = loss_sum + tokens * moe_aux.aux_loss(model.cfg, moe)
  return loss_sum, (jnp.sum(ce_BT * weights_BT), tokens, moe, {})


def _split_microbatches(batch, num_micro: int):
  """[B, T] -> [M, B/M, T] taking rows i*M + m into microbatch m, so every microbatch stays spread
  over all the devices its batch is sharded on (a contiguous split would put each on a subset)."""
  def split(x_BT):
    b = x_BT.shape[0]
    x = x_BT.reshape(b // num_micro, num_micro, *x_BT.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return sharding_lib.shard_act(x, (None, "batch") + (None,) * (x.ndim - 2))
  return jax.tree.map(split, batch)


def make_train_step(cfg: Config, model_spec: ModelSpec, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, prepare_batch: Optional[Callable] = None
                    ) -> Callable:
  """Builds the pure step function (not jitted: see `jit_train_step`). `prepare_batch(step,
  batch, *extra)` completes the batch inside the step first (distillation: the schedules' values
  and an online teacher's logits; DPO: an online reference's log-probs; `extra` are the step's
  further arguments, the frozen model's params)."""
  num_micro = cfg.train.microbatches
  grad_fn = jax.value_and_grad(summed_objective_loss(cfg), has_aux=True)

  def train_step(state: TrainState, batch, *extra):
    if prepare_batch is not None:
      batch = prepare_batch(state.step, batch, *extra)
    if num_micro == 1:
      (loss_sum, (ce_sum, tokens, moe, extra)), grads = grad_fn(state.params, batch, model_spec)
    else:
      def accumulate(carry, micro):
        (loss_i, (ce_i, tokens_i, moe_i, extra_i)), grads_i = grad_fn(state.params, micro,
                                                                      model_spec)
        grads_acc, loss_acc, ce_acc, tokens_acc, extra_acc = carry
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads_i)
        return (grads_acc, loss_acc + loss_i, ce_acc + ce_i, tokens_acc + tokens_i,
                jax.tree.map(jnp.add, extra_acc, extra_i)), moe_i
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      extra_zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                                 jax.eval_shape(lambda p, b: grad_fn(p, b, model_spec),
                                                state.params, batch)[0][1][3])
      init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0), extra_zeros)
      (grads, loss_sum, ce_sum, tokens, extra), moe_M = jax.lax.scan(
          accumulate, init, _split_microbatches(batch, num_micro))
      moe = jax.tree.map(lambda x: jnp.mean(x, axis=0), moe_M)  # equal-size microbatches
    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if moe_aux.updates_router_bias(cfg.model):
      params = moe_aux.with_updated_router_bias(cfg.model, state.params, params, moe["load"])
    finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
    params, opt_state = _select_tree(finite, (params, opt_state), (state.params, state.opt_state))
    metrics = {
        "loss": ce_sum / denom,
        "total_loss": loss_sum / denom,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(params),
        "learning_rate": schedule(state.step),
        "tokens": tokens,
        "update_skipped": 1.0 - finite.astype(jnp.float32),
        **moe_aux.moe_metrics(cfg.model, moe, params),
        **{k: v / denom for k, v in extra.items()},
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def _select_tree(ok: jax.Array, new, old):
  """`new` where `ok`, else `old`, leaf by leaf (a select XLA fuses into the update in place)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def make_eval_step(cfg: Config, model_spec: ModelSpec,
                   prepare_batch: Optional[Callable] = None) -> Callable:
  """eval_step(params, batch, *extra) -> (loss sum, count); the caller sums over batches. The
  loss is the objective's without z-loss: token cross-entropy (also for distillation: the
  student's validation loss on the data), or the preference loss per pair. `prepare_batch(None,
  batch, *extra)` completes the batch first (DPO's online reference log-probs)."""
  objective = "pretrain" if cfg.train.objective == "distill" else cfg.train.objective
  loss_fn = summed_objective_loss(dataclasses.replace(
      cfg, train=dataclasses.replace(cfg.train, z_loss_weight=0.0, objective=objective)))
  def eval_step(params, batch, *extra):
    if prepare_batch is not None:
      batch = prepare_batch(None, batch, *extra)
    _, (ce_sum, tokens, _, _) = loss_fn(params, batch, model_spec)
    return ce_sum, tokens
  return eval_step


def batch_sharding(mesh, cfg: Config) -> NamedSharding:
  """Global batch rows sharded over the mesh axes the 'batch' logical axis maps to."""
  return NamedSharding(mesh, sharding_lib.logical_to_spec(("batch", None), cfg.mesh.rules, mesh))


def _key_shardings(batch_sharding_: NamedSharding, keys: tuple[str, ...]) -> dict:
  return {k: key_sharding(batch_sharding_, _key_ndim(k)) for k in keys}


def jit_train_step(step_fn, state_shardings: TrainState, batch_sharding_: NamedSharding,
                   keys: tuple[str, ...] = BATCH_KEYS, extra_shardings: tuple = ()):
  """`extra_shardings`: those of the step's arguments after the batch (a frozen model's params:
  an online teacher or reference)."""
  batch_shardings = _key_shardings(batch_sharding_, keys)
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, *extra_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))


def jit_eval_step(eval_fn, params_shardings, batch_sharding_: NamedSharding,
                  keys: tuple[str, ...] = BATCH_KEYS, extra_shardings: tuple = ()):
  """Validation batches never carry a cached teacher (distillation is scored by the CE);
  `extra_shardings` as for jit_train_step (an online reference's params)."""
  batch_shardings = _key_shardings(batch_sharding_,
                                   tuple(k for k in keys if k not in distill.CACHE_KEYS))
  return jax.jit(eval_fn, in_shardings=(params_shardings, batch_shardings, *extra_shardings))
