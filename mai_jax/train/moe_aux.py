"""What the train step does with the MoE router statistics: aux losses, bias update, metrics.

`Decoder.forward_with_aux` returns per-MoE-layer arrays ('load' [L, E]: fraction of the step's
(token, expert) assignments each expert got; 'dropped_fraction', 'z_loss', 'balance_loss' [L]).
The aux losses are averaged over MoE layers and weighted per token like the cross-entropy, so with
microbatches the gradient still equals the one-big-batch gradient of the same objective.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mai_jax.config import ModelConfig
from mai_jax.model.moe import is_moe_layer, update_router_bias
from mai_jax.model.transformer import replace_router_bias, router_bias_LE


def aux_loss(cfg: ModelConfig, aux: dict) -> jax.Array:
  """Per-token aux objective: weights x (mean over MoE layers) of z-loss and balance loss."""
  if not aux:
    return jnp.float32(0)
  return (cfg.router_z_loss_weight * jnp.mean(aux["z_loss"])
          + cfg.load_balance_loss_weight * jnp.mean(aux["balance_loss"]))


def updates_router_bias(cfg: ModelConfig) -> bool:
  return bool(cfg.num_experts and cfg.router == "sigmoid_bias" and cfg.router_bias_update_rate)


def with_updated_router_bias(cfg: ModelConfig, old_params: dict, new_params: dict,
                             load_LE: jax.Array) -> dict:
  """`new_params` with each router bias set from the *old* bias and the step's realized load (the
  optimizer's zero-gradient update of the bias, e.g. weight decay, is discarded)."""
  bias_LE = update_router_bias(router_bias_LE(cfg, old_params), load_LE,
                               cfg.router_bias_update_rate)
  return replace_router_bias(cfg, new_params, bias_LE.astype(jnp.float32))


def moe_metrics(cfg: ModelConfig, aux: dict, params: dict) -> dict:
  """Scalar metrics per MoE layer (named by decoder layer index) plus layer means.

  load_min / load_max are relative to a perfectly balanced load (1.0 = balanced); load_cv is the
  coefficient of variation (std / mean) of the per-expert load.
  """
  if not aux:
    return {}
  layers = [i for i in range(cfg.num_layers) if is_moe_layer(cfg, i)]
  load_LE = aux["load"] * cfg.num_experts
  stats = {
      "load_min": jnp.min(load_LE, axis=-1),
      "load_max": jnp.max(load_LE, axis=-1),
      "load_cv": jnp.std(load_LE, axis=-1) / jnp.maximum(jnp.mean(load_LE, axis=-1), 1e-9),
      "dropped_fraction": aux["dropped_fraction"],
      "z_loss": aux["z_loss"],
      "balance_loss": aux["balance_loss"],
  }
  if cfg.router == "sigmoid_bias":
    stats["router_bias_norm"] = jnp.linalg.norm(router_bias_LE(cfg, params), axis=-1)
  metrics = {f"moe/{name}": jnp.mean(values_L) for name, values_L in stats.items()}
  for j, layer in enumerate(layers):
    for name, values_L in stats.items():
      metrics[f"moe/layer{layer}/{name}"] = values_L[j]
  return metrics
