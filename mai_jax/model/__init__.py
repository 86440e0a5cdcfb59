"""Llama-family decoder in Flax NNX: `Decoder(cfg, rngs=...)(tokens_BT) -> logits_BTV`."""

from mai_jax.model.transformer import Decoder, count_active_params, count_params

__all__ = ["Decoder", "count_active_params", "count_params"]
