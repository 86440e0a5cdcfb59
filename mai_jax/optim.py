"""Optimizer: optax AdamW with a decay mask, global-norm clipping and learning-rate schedules."""

from __future__ import annotations

import jax
import optax

from mai_jax.config import OptimConfig


def make_schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
  """Linear warmup, then cosine / warmup-stable-decay (WSD) / constant.

  cosine: decays to `min_lr_ratio * lr` at `num_steps`. wsd: holds the peak, then decays linearly to
  `min_lr_ratio * lr` over the last `decay_fraction` of training (the MiniCPM / DeepSeek recipe that
  lets a run be extended or branched before its decay phase).
  """
  peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
  warmup = min(cfg.warmup_steps, num_steps)
  warmup_fn = optax.linear_schedule(peak / max(warmup, 1), peak, max(warmup - 1, 1))
  rest = max(num_steps - warmup, 1)
  if cfg.schedule == "constant":
    after = optax.constant_schedule(peak)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, rest, alpha=cfg.min_lr_ratio)
  elif cfg.schedule == "wsd":
    decay = max(int(round(rest * cfg.decay_fraction)), 1)
    after = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
        [rest - decay])
  else:
    raise ValueError(f"optim.schedule={cfg.schedule!r} is not one of 'cosine', 'wsd', 'constant'")
  if warmup == 0:
    return after
  return optax.join_schedules([warmup_fn, after], [warmup])


def decay_mask(params, decay_embeddings: bool):
  """True for parameters that get weight decay: matrices, not norms/biases (ndim after the layer
  axis < 2), and not the embedding table unless `decay_embeddings`."""

  def wants_decay(path, leaf) -> bool:
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    if any("norm" in n for n in names):
      return False
    if not decay_embeddings and any(n in ("embed", "embedding", "unembed") for n in names):
      return False
    return leaf.ndim >= 2

  return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(cfg: OptimConfig, num_steps: int) -> optax.GradientTransformation:
  schedule = make_schedule(cfg, num_steps)
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay,
                           mask=lambda p: decay_mask(p, cfg.decay_embeddings)))
  return optax.chain(*parts)
