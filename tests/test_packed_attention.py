"""model.attention_impl='cudnn_packed' on CPU: the segment ids -> cuDNN offsets conversion against a
NumPy reference, the XLA emulation of the cuDNN call against the XLA document-mask path (outputs
and gradients, and through the whole decoder with scan and remat), the guard on too many
segments, and the real cuDNN custom call lowered for CUDA with the offsets wired in."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.cudnn import fused_attention_stablehlo as fa
from test_model import forward, make_decoder, random_tokens, small_cfg

from mai_jax.model import layers, packed_attention as pa

B, T, H, G, K, M = 4, 32, 4, 2, 8, 8


def numpy_offsets(segment_ids_BT, max_segments):
  """Reference: runs of equal ids, walked token by token."""
  rows = []
  for row in np.asarray(segment_ids_BT):
    starts = [t for t in range(len(row)) if t == 0 or row[t] != row[t - 1]]
    lengths = [b - a for a, b in zip(starts, starts[1:] + [len(row)])]
    rows.append((starts, lengths))
  offsets = np.full((len(rows), max_segments + 1), -1, np.int32)
  seqlens = np.full((len(rows), max_segments), -1, np.int32)
  for b, (starts, lengths) in enumerate(rows):
    n = min(len(starts), max_segments)
    offsets[b, :n], seqlens[b, :n] = starts[:n], lengths[:n]
  return offsets, seqlens, np.array([len(s) for s, _ in rows])


def packed_rows(seed, rows, seq, mean_doc_len):
  """Rows packed like mai_jax/data: ids 1, 2, ... per document, then a padding run of 0s."""
  rng = np.random.default_rng(seed)
  out = np.zeros((rows, seq), np.int32)
  for r in range(rows):
    used = rng.integers(seq // 2, seq + 1)  # tokens before the padding
    starts = np.concatenate([[0], np.cumsum(rng.geometric(1.0 / mean_doc_len, size=seq))])
    starts = starts[starts < used]
    out[r, :used] = np.searchsorted(starts, np.arange(used), side="right")
  return out


@pytest.fixture(scope="module")
def batch():
  seg = packed_rows(0, B, T, mean_doc_len=6)
  seg[1] = 1  # one document filling the row
  seg[2, : T - 5], seg[2, T - 5:] = 1, 0  # one document and padding
  rng = np.random.default_rng(1)
  q, k, v, dout = (jnp.asarray(rng.normal(size=s), jnp.float32)
                   for s in ((B, T, H, K), (B, T, G, K), (B, T, G, K), (B, T, H, K)))
  return jnp.asarray(seg), q, k, v, dout


def test_offsets_match_numpy(batch):
  seg = batch[0]
  # Also: more segments than M (counted, not hidden) and exactly M.
  over = jnp.asarray(np.arange(T) // 3 + 1, jnp.int32)[None]
  exact = jnp.asarray(np.arange(T) * M // T + 1, jnp.int32)[None]
  convert = jax.jit(pa.segment_offsets, static_argnums=1)
  for ids in (seg, over, exact):
    got = [np.asarray(a) for a in convert(ids, M)]
    want = numpy_offsets(ids, M)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)
  assert numpy_offsets(seg, M)[2].max() == M  # the batch fixture fits the bound exactly
  assert numpy_offsets(over, M)[2].max() > M and numpy_offsets(exact, M)[2].max() == M
  np.testing.assert_array_equal(np.asarray(convert(seg, M)[1])[1], [T] + [-1] * (M - 1))
  np.testing.assert_array_equal(np.asarray(convert(seg, M)[0])[2, :3], [0, T - 5, -1])


def test_emulation_equals_xla_mask_path(batch):
  seg, q, k, v, dout = batch

  def xla_path(q, k, v):
    mask = seg[:, None, :, None] == seg[:, None, None, :]
    return layers.dot_product_attention(q, k, v, mask, is_causal=True, implementation="xla")

  def packed(q, k, v):
    return pa.packed_attention(q, k, v, seg, max_segments=M, kernel=pa.emulate)

  def out_and_grads(fn):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(dout))

  for got, want in zip(jax.jit(lambda: out_and_grads(packed))(),
                       jax.jit(lambda: out_and_grads(xla_path))()):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_decoder_cudnn_packed_equals_xla():
  """The layers.py wiring, under the layer scan: on CPU 'cudnn_packed' runs the emulation from the
  same offsets. (Gradients: test_emulation_equals_xla_mask_path.)"""
  cfg = small_cfg(attention_max_segments=8)
  tokens = random_tokens(2, (2, 24), cfg.vocab_size)
  seg = jnp.asarray(packed_rows(3, 2, 24, mean_doc_len=6))
  pos = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), (2, 24))  # the same for both paths
  logits = [forward(make_decoder(dataclasses.replace(cfg, attention_impl=impl), seed=4), tokens,
                    seg, pos) for impl in ("xla", "cudnn_packed")]
  np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(logits[0]), atol=2e-5, rtol=1e-5)


def test_too_many_segments_stops_the_step(batch):
  _, q, k, v, _ = batch
  many = jnp.asarray(np.arange(T) // 2 + 1, jnp.int32)[None].repeat(B, 0)  # 16 segments
  with pytest.raises(Exception, match=r"model.attention_max_segments=8: a packed row holds 16"):
    jax.block_until_ready(jax.jit(
        lambda: pa.packed_attention(q, k, v, many, max_segments=M, kernel=pa.emulate))())


def test_cudnn_call_lowers_for_cuda_with_the_offsets(monkeypatch, batch):
  """Without a GPU jax refuses at trace time: check_cudnn_version raises 'cuDNN is not detected.'
  and check_compute_capability('9.0') (packing needs Hopper) is False. With those two hardware
  probes answered as on an H100, the real lowering runs: the StableHLO holds cuDNN's fused
  attention forward and backward with the sequence lengths and offsets as operands."""
  seg, q, k, v, dout = batch
  with pytest.raises(RuntimeError, match="cuDNN is not detected"):
    jax.jit(pa.cudnn_packed).trace(q, k, v, *pa.segment_offsets(seg, M)[:2]).lower(
        lowering_platforms=("cuda",))
  monkeypatch.setattr(fa, "check_cudnn_version", lambda: 90800)
  monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)
  bf = lambda a: a.astype(jnp.bfloat16)

  def train(q, k, v):
    # Without check_segment_count: a host callback does not lower for CUDA from a CPU backend.
    fn = lambda q, k, v: pa.cudnn_packed(q, k, v, *pa.segment_offsets(seg, M)[:2])
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(bf(dout))

  text = jax.jit(train).trace(bf(q), bf(k), bf(v)).lower(lowering_platforms=("cuda",)).as_text()
  kv_heads = G if pa.kv_offsets_use_key_heads() else H  # K/V repeated on jax with the GQA bug
  qkv = (rf"tensor<{B}x{T}x{H}x{K}xbf16>, tensor<{B}x{T}x{kv_heads}x{K}xbf16>, "
         rf"tensor<{B}x{T}x{kv_heads}x{K}xbf16>")
  lens_offsets = rf"tensor<{B}x{M}xi32>, tensor<{B}x{M}xi32>, tensor<{B}x{M + 1}xi32>, " \
                 rf"tensor<{B}x{M + 1}xi32>"
  fwd = re.findall(r"custom_call @__cudnn\$fmhaSoftmax\(.*", text)
  bwd = re.findall(r"custom_call @__cudnn\$fmhaSoftmaxBackward\(.*", text)
  assert len(fwd) == 1 and len(bwd) == 1, (len(fwd), len(bwd))
  assert f": ({qkv}, {lens_offsets}) ->" in fwd[0]
  assert lens_offsets + ") ->" in bwd[0]
  for call in fwd + bwd:
    assert re.search(rf'max_seg_per_batch\\22: {M}\b', call), call[:300]
    assert "PADDING_CAUSAL" in call


def test_segment_bound_must_be_positive():
  from mai_jax import config as config_lib
  cfg = config_lib.Config()
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_max_segments=0))
  with pytest.raises(config_lib.ConfigError, match="attention_max_segments=0 must be positive"):
    config_lib.validate(cfg)
