"""Causal + document-masked attention for packed rows through cuDNN's sequence-packing mode
(model.attention_impl='cudnn_packed').

Why: jax.nn.dot_product_attention(implementation='cudnn') takes no segment ids, so the 'cudnn'
path hands it the document mask, which jax turns into an additive [B,1,T,S] bias: exact, but a
B*T*T array per layer that the flash kernel must read, with no masked tile ever skipped across
documents. cuDNN can instead treat each document of a row as its own sequence (THD-style ragged
offsets): it then computes only the causal triangle of each document. jax exposes this only
through the private `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`
(q_offsets/kv_offsets/q_seqlen/kv_seqlen, since jax 0.5; the public jax.nn API has no offsets
as of jax 0.12: jax PR #29731 adding them is unmerged).

Packing format (mai_jax/data: grain first-fit packing): each row holds whole chunks one after the
other, segment ids 1, 2, ... per chunk and 0 for the padding at the end. A *segment* here is a
maximal run of equal ids; the padding run is one too, so every token is covered (cuDNN leaves
tokens outside every segment uncomputed) and padding attends causally among itself, as on the
XLA path. An id that reappears after another id starts a new segment (the mask path would join
the two runs); no packer here writes that.

cuDNN needs a static bound M on segments per row (model.attention_max_segments). A batch with a
row over M stops the step with an error naming the key: the segments past M would otherwise lose
their masking silently.

Off GPU (tests, the GPU suite's dry run) the same offsets feed `emulate`, an XLA computation of
what the cuDNN call computes, so the conversion, the guard and the call site run on CPU too.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_KEY = "model.attention_max_segments"


def segment_offsets(segment_ids_BT: jax.Array, max_segments: int):
  """(offsets_BN, seqlens_BM, count_B), N = M + 1, in the private API's per-row format: the start
  of each segment (run of equal ids) and its length, -1 past the row's last segment. The extra
  offsets column is always -1: jax packs all rows' segments to the left and ends them with B*T.
  count_B is the true number of segments, which may exceed M (see check_segment_count)."""
  B, T = segment_ids_BT.shape
  seg_BT = segment_ids_BT.astype(jnp.int32)
  starts_BT = jnp.concatenate([jnp.ones((B, 1), bool), seg_BT[:, 1:] != seg_BT[:, :-1]], axis=1)
  count_B = starts_BT.sum(axis=1, dtype=jnp.int32)
  pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  # The first M + 1 start positions of each row, in order, then T (where a row has fewer).
  sorted_BT = jnp.sort(jnp.where(starts_BT, pos_BT, T), axis=1)
  sorted_BT = jnp.pad(sorted_BT, ((0, 0), (0, max(max_segments + 1 - T, 0))), constant_values=T)
  starts_BM, ends_BM = sorted_BT[:, :max_segments], sorted_BT[:, 1:max_segments + 1]
  real_BM = starts_BM < T
  offsets_BM = jnp.where(real_BM, starts_BM, -1)
  seqlens_BM = jnp.where(real_BM, ends_BM - starts_BM, -1)
  offsets_BN = jnp.concatenate([offsets_BM, jnp.full((B, 1), -1, jnp.int32)], axis=1)
  return offsets_BN, seqlens_BM, count_B


def check_segment_count(count_B: jax.Array, max_segments: int) -> None:
  """Stops the computation (a host callback that raises) when a row has more than M segments.
  One int32 scalar goes to the host per call, i.e. per layer (and again in remat's recompute); on
  a GPU that is a small host round trip, which the suite's dense_cudnn_offsets step time includes."""
  jax.debug.callback(functools.partial(_raise_over_bound, max_segments), count_B.max())


def _raise_over_bound(max_segments: int, most) -> None:
  if int(most) > max_segments:
    raise ValueError(f"{_KEY}={max_segments}: a packed row holds {int(most)} segments "
                     f"(documents, plus the padding run); raise {_KEY} to at least {int(most)} "
                     "or use model.attention_impl='cudnn'")


def emulate(q_BTHK, k_BTGK, v_BTGK, offsets_BN, seqlens_BM) -> jax.Array:
  """What the cuDNN packed call computes, in XLA: query t attends key s when both lie in the same
  segment [offset, offset + seqlen) and s <= t; tokens in no segment give zeros. Built from the
  offsets alone (not the segment ids), so it checks the conversion as well as the masking."""
  T = q_BTHK.shape[1]
  pos_11T = jnp.arange(T, dtype=jnp.int32)[None, None, :]
  starts_BM, real_BM = offsets_BN[:, :-1], seqlens_BM >= 0
  inside_BMT = (real_BM[:, :, None] & (pos_11T >= starts_BM[:, :, None])
                & (pos_11T < (starts_BM + seqlens_BM)[:, :, None]))
  # Segment index of each token, -1 when in none.
  seg_BT = jnp.where(inside_BMT.any(1), jnp.argmax(inside_BMT, axis=1), -1)
  covered_BT = seg_BT >= 0
  causal_1TS = jnp.tril(jnp.ones((T, T), bool))[None]
  mask_BTS = (seg_BT[:, :, None] == seg_BT[:, None, :]) & covered_BT[:, :, None] & causal_1TS
  # An uncovered query attends to itself only (no fully masked row), then is zeroed.
  mask_BTS = mask_BTS | (~covered_BT[:, :, None] & jnp.eye(T, dtype=bool)[None])
  qkv = tuple(a.astype(jnp.float32) for a in (q_BTHK, k_BTGK, v_BTGK))
  out_BTHK = jax.nn.dot_product_attention(*qkv, mask=mask_BTS[:, None], implementation="xla")
  out_BTHK = jnp.where(covered_BT[:, :, None, None], out_BTHK, 0.0)
  return out_BTHK.astype(q_BTHK.dtype)


def cudnn_packed(q_BTHK, k_BTGK, v_BTGK, offsets_BN, seqlens_BM) -> jax.Array:
  """The cuDNN flash kernel in packed mode (PADDING_CAUSAL: causal within each segment, keys past
  its length masked). Needs a GPU at trace time (jax probes cuDNN and the compute capability;
  packing needs Hopper or later)."""
  # Imported here: a private module, needed only on this path.
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=C0415
  H, G = q_BTHK.shape[2], k_BTGK.shape[2]
  if G != H and not kv_offsets_use_key_heads():
    # jax < the fix of jax PR #39521 scales kv offsets by the query's heads: give K/V H heads.
    k_BTGK, v_BTGK = (jnp.repeat(a, H // G, axis=2) for a in (k_BTGK, v_BTGK))
  return fa.dot_product_attention(
      q_BTHK, k_BTGK, v_BTGK, q_seqlen=seqlens_BM, kv_seqlen=seqlens_BM, q_offsets=offsets_BN,
      kv_offsets=offsets_BN, scale=1.0 / math.sqrt(q_BTHK.shape[-1]),
      mask_type=fa.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


@functools.cache
def kv_offsets_use_key_heads() -> bool:
  """Whether the installed jax turns kv offsets into element offsets with the key's head count
  (right for grouped-query attention) rather than the query's. Asked of jax's own conversion on
  a one-row example, so no version number has to be trusted."""
  # Imported here: a private module, needed only on this path.
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=C0415
  shape = lambda heads: jax.ShapeDtypeStruct((1, 4, heads, 8), jnp.bfloat16)
  offsets, seqlens = np.array([[0, 2, -1]], np.int32), np.array([[2, 2]], np.int32)
  fix = jax.jit(lambda s, o: fa._fix_seqlen_offsets(  # pylint: disable=protected-access
      s, s, o, o, shape(4), shape(1))[3])  # one compile rather than ~10 eager ops (~5 s on CPU)
  with jax.ensure_compile_time_eval():  # called while tracing the model: run it now
    kv_offsets = fix(seqlens, offsets)
  return int(np.asarray(kv_offsets)[0, 1]) == 2 * 1 * 8


def packed_attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, *, max_segments: int,
                     kernel=None) -> jax.Array:
  """Causal attention within each segment of each row; returns q's dtype. `kernel` (tests):
  cudnn_packed or emulate; by default cuDNN on GPU and the emulation elsewhere."""
  offsets_BN, seqlens_BM, count_B = segment_offsets(segment_ids_BT, max_segments)
  check_segment_count(count_B, max_segments)
  if kernel is None:
    kernel = cudnn_packed if jax.default_backend() == "gpu" else emulate
  return kernel(q_BTHK, k_BTGK, v_BTGK, offsets_BN, seqlens_BM).astype(q_BTHK.dtype)
