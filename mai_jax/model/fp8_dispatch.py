"""fp8 MoE dispatch (model.moe_dispatch_dtype='float8_e4m3fn'; DeepSeek-V3, arXiv:2412.19437 §3.3):
tokens are quantized to float8_e4m3fn before the dispatch all-to-all and dequantized after, so the
forward dispatch moves ~1 byte per element instead of the compute dtype's 2 (bf16) or 4; the combine
(the return all-to-all) stays in the compute dtype.

Scales: one float32 scale per 1 x 128 block of a row along D (DeepSeek-V3's activation tiles) when
128 divides d_model, else one per row (per token; tiny test models). scale = amax / 448 (e4m3's
largest finite value; computed as amax x float32(1 / 448)), so every block uses the whole e4m3
range and an element's rounding error is at most 2^-4 of its magnitude (3 mantissa bits, round to
nearest) where x / scale is normal, and at most half the subnormal spacing 2^-9 (in units of
scale) below: |x - dq(q(x))| <= 2^-4 |x| + 2^-10 amax / 448 <= 2^-4 amax (plus float32
rounding). A block of zeros gets scale 1 (not 0 / 0).

On the wire a row is one uint8 array: its D fp8 codes followed by its scales' float32 bytes
(bitcast), D + 4 D / 128 bytes (D + 4 per token), so the scales travel with their rows through the
same all-to-all and the same gathers/scatters that build the send buffer. uint8 rather than float8
because XLA:CPU widens a float8 all-to-all to f16 (measured with jax 0.10.2: the compiled HLO's
all-to-all carried f16), which would move 2 bytes; a uint8 collective moves 1 on every backend.
Empty buffer slots are zero bytes, which decode to 0 x 0.0 = 0 exactly.

Gradient: the quantization is a forward-only transform. `dispatch`'s VJP is the VJP of the same
gathers/scatters/all-to-all applied to compute-dtype rows (straight-through: the rounding's
derivative is taken as the identity), so the backward moves the gradients in the compute dtype,
exactly as with moe_dispatch_dtype='compute', and nothing is saved for it (no residual activations
beyond the routing indices the dispatch already keeps). DeepSeek-V3 also sends the gradient
dispatched to the experts in the backward (the transpose of the combine) in fp8; that is not done
here: both backward all-to-alls stay in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

DISPATCH_DTYPES = ("compute", "float8_e4m3fn")
FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
BLOCK = 128  # DeepSeek-V3's 1 x 128 activation tiles


def block_size(d_model: int) -> int:
  """Elements per scale: BLOCK when it divides d_model, else the whole row (per-token scales)."""
  return BLOCK if d_model % BLOCK == 0 else d_model


def wire_row_bytes(d_model: int) -> int:
  """Bytes of one dispatched row on the wire: D fp8 codes + 4 bytes per float32 scale (the planner
  counts the dispatch with it)."""
  return d_model + 4 * (d_model // block_size(d_model))


def quantize(x_ND: jax.Array):
  """x [N, D] (any float dtype) -> (codes float8_e4m3fn [N, D], scales float32 [N, D / block])."""
  N, D = x_ND.shape
  b = block_size(D)
  x_NBb = x_ND.astype(jnp.float32).reshape(N, D // b, b)
  # amax x float32(1 / 448), written as XLA compiles it (its simplifier turns a division by a
  # constant into a multiplication by the constant's reciprocal), so NumPy can reproduce it.
  scale_NB = jnp.max(jnp.abs(x_NBb), axis=-1) * jnp.float32(1.0 / FP8_MAX)
  scale_NB = jnp.where(scale_NB > 0, scale_NB, 1.0)
  codes_NBb = jnp.clip(x_NBb / scale_NB[:, :, None], -FP8_MAX, FP8_MAX).astype(FP8)
  return codes_NBb.reshape(N, D), scale_NB


def dequantize(codes_ND: jax.Array, scale_NB: jax.Array, dtype) -> jax.Array:
  """(codes, scales) -> x [N, D] in `dtype` (float32 products, then one cast)."""
  N, D = codes_ND.shape
  nb = scale_NB.shape[-1]
  x_NBb = codes_ND.astype(jnp.float32).reshape(N, nb, D // nb) * scale_NB[:, :, None]
  return x_NBb.reshape(N, D).astype(dtype)


def pack(x_ND: jax.Array) -> jax.Array:
  """x [N, D] -> wire rows uint8 [N, wire_row_bytes(D)]: the fp8 codes, then the scales' bytes."""
  codes_ND, scale_NB = quantize(x_ND)
  N = x_ND.shape[0]
  scale_bytes = jax.lax.bitcast_convert_type(scale_NB, jnp.uint8).reshape(N, -1)
  return jnp.concatenate([jax.lax.bitcast_convert_type(codes_ND, jnp.uint8), scale_bytes], axis=1)


def unpack(rows_XP: jax.Array, d_model: int, dtype) -> jax.Array:
  """Wire rows uint8 [..., P] -> dequantized [..., D] in `dtype` (any leading dims)."""
  lead, D = rows_XP.shape[:-1], d_model
  rows_NP = rows_XP.reshape(-1, rows_XP.shape[-1])
  codes_ND = jax.lax.bitcast_convert_type(rows_NP[:, :D], FP8)
  scale_NB = jax.lax.bitcast_convert_type(
      rows_NP[:, D:].reshape(rows_NP.shape[0], -1, 4), jnp.float32)
  return dequantize(codes_ND, scale_NB, dtype).reshape(*lead, D)


@dataclasses.dataclass(frozen=True)
class _Send:
  """The static part of one dispatch: the row mover and the rows' shape and dtype."""
  move: Callable
  shape: tuple
  dtype: object


def dispatch(move: Callable, x_ND: jax.Array, *indices: jax.Array,
             dtype: str = "compute") -> jax.Array:
  """Send rows: move(rows [N, P], *indices) -> the received rows [..., P].

  `move` must be linear in the rows and work for any dtype and width P: gathers, scatters into a
  zero buffer and all-to-alls (what builds and delivers the expert send buffers). 'compute': exactly
  move(x_ND, *indices). 'float8_e4m3fn': move(pack(x_ND)) and unpack on arrival; the gradient is
  move's own VJP in x_ND's dtype (module docstring)."""
  if dtype == "compute":
    return move(x_ND, *indices)
  if dtype != "float8_e4m3fn":
    raise ValueError(f"model.moe_dispatch_dtype={dtype!r} is not one of {DISPATCH_DTYPES}")
  return _fp8_dispatch(_Send(move, x_ND.shape, x_ND.dtype), x_ND, *indices)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp8_dispatch(send: _Send, x_ND, *indices):
  return unpack(send.move(pack(x_ND), *indices), send.shape[-1], send.dtype)


def _fp8_dispatch_fwd(send: _Send, x_ND, *indices):
  # The residual x_ND[:0] holds no bytes; it carries x's type (inside shard_map: the mesh axes it
  # varies over), which the gradient must have.
  return _fp8_dispatch(send, x_ND, *indices), (x_ND[:0], indices)


def _fp8_dispatch_bwd(send: _Send, residuals, g):
  empty_0D, indices = residuals
  # move is linear, so its VJP does not depend on the point: take it at zeros (padding the empty
  # residual gives zeros of x's type).
  zeros_ND = jnp.pad(empty_0D, ((0, send.shape[0]), (0, 0)))
  _, move_vjp = jax.vjp(lambda rows: send.move(rows, *indices), zeros_ND)
  return move_vjp(g.astype(send.dtype)) + (None,) * len(indices)


_fp8_dispatch.defvjp(_fp8_dispatch_fwd, _fp8_dispatch_bwd)
