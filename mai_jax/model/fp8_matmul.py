"""fp8 projection matmuls (model.fp8): E4M3 operands forward, E5M2 gradients backward, one scale
per tensor computed from the tensor itself (current scaling), through qwix's quantized-training dot
(`qwix._src.core.dot_general_qt`, qwix 0.1.8; the same op `qwix.QtProvider` intercepts into a model).

  fwd:  y = (q4(x / sx) . q4(w / sw)) * sx * sw          sx = amax(x) / 448, sw = amax(w) / 448
  bwd:  dx = (q5(g * sw / sg) . q4(w / sw)^T) * sg        sg = amax(g * sw) / 57344
        dw = (q5(g * sx / sg') . q4(x / sx)^T) * sg'       sg' = amax(g * sx) / 57344

q4/q5: clip to the format's largest finite value and round to float8_e4m3fn / float8_e5m2 (scales
in the operands' dtype). The backward reuses the forward's fp8 operands (qwix folds their scale into
g before quantizing it), so every dot of the step, forward and backward, takes two fp8 operands:
that is what the fp8 tensor cores on H100/H200 run. XLA:CPU has no fp8 dot; it upcasts the operands
(the values stay the fp8 ones), so CPU runs check the numerics, not the speed.

Why current (per-step, per-tensor) scaling rather than delayed (an amax history, Transformer
Engine's default): it keeps no state, so nothing joins the checkpoint, the optimizer has nothing to
skip, and gradient accumulation, remat recomputes and the pipeline's vmap over stages all see the
same function of their inputs. It is what torchtitan/torchao Float8 train with by default ("dynamic"
tensorwise; torchao dropped delayed scaling in 2025). Its cost is one amax reduction per operand,
which XLA fuses into the pass that quantizes it. flax's `flax.linen.fp8_ops` is the delayed kind, but
only as linen modules whose amax history travels as a fake gradient ('_overwrite_with_gradient'),
which our NNX train step and its gradient accumulation would have to special-case.

The off mode is `jnp.einsum` itself, so model.fp8='off' compiles exactly what it did before.

The routed MoE experts (model/moe.py) stay in the compute dtype: their dropless GEMMs are
jax.lax.ragged_dot on GPU and a tiled scan on CPU, and qwix's ragged_dot_qt scales per row and per
output channel, not per tensor; the shared experts are MLPs and take this path.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

MODES = ("off", "current")
E4M3 = jnp.float8_e4m3fn  # forward operands: 3 mantissa bits, max 448
E5M2 = jnp.float8_e5m2  # gradients: 2 mantissa bits, max 57344 (their wider range)


@functools.cache
def _qt_config():
  """qwix's dot config for per-tensor E4M3 x E4M3 forward and E5M2 gradients (built on first use,
  so importing this module needs no qwix)."""
  from qwix._src.core import dot_general_qt
  return dot_general_qt, dot_general_qt.DotGeneralQtConfig(
      lhs_qtype=E4M3, rhs_qtype=E4M3, lhs_disable_channelwise_axes=True,
      rhs_disable_channelwise_axes=True, dlhs_grad_qtype=E5M2, drhs_grad_qtype=E5M2,
      dlhs_grad_disable_channelwise_axes=True, drhs_grad_disable_channelwise_axes=True)


def fp8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                    **unused):
  """jax.lax.dot_general in fp8 (module docstring); the result has the operands' dtype (qwix takes
  no preferred_element_type; it accumulates in float32 and rounds once)."""
  del precision, preferred_element_type, unused
  dot_general_qt, config = _qt_config()
  return dot_general_qt.dot_general_qt(lhs, rhs, dimension_numbers, config)


def einsum(spec: str, x, w, mode: str):
  """jnp.einsum(spec, x, w) with model.fp8 `mode`: 'off' is jnp.einsum as is, 'current' runs its
  dot in fp8 with current per-tensor scaling."""
  if mode == "off":
    return jnp.einsum(spec, x, w)
  if mode != "current":
    raise ValueError(f"model.fp8={mode!r} is not one of {MODES}")
  return jnp.einsum(spec, x, w, _dot_general=fp8_dot_general)

