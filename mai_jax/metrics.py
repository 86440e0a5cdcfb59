"""Throughput / MFU accounting and metric writers (metrics.jsonl + TensorBoard).

MFU formula (the standard one, PaLM appendix B with causal attention halved):
  training FLOPs per token = 6 * N_matmul + 6 * L * T * H * K
where N_matmul counts parameters that take part in matmuls (all parameters except the input
embedding table when it is not tied; the lookup is not a matmul), L layers, T sequence length,
H query heads, K head dim: QK^T and AV cost 4*T*H*K per token and layer forward, x3 for forward +
backward, halved because causal attention only needs the lower triangle. MFU = achieved FLOP/s over
the device's dense bf16 peak (no sparsity).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax

from mai_jax.config import ModelConfig

# Dense (non-sparse) bf16 tensor-core peak per device, FLOP/s, from the vendors' data sheets
# (H100 SXM5 / H200 SXM: 989.4 TFLOP/s; B200: 2.25 PFLOP/s; A100 SXM: 312 TFLOP/s).
PEAK_BF16_FLOPS = {
    "H100": 989.4e12,
    "H200": 989.4e12,
    "B200": 2250e12,
    "A100": 312e12,
}


def matmul_params(cfg: ModelConfig, total_params: int) -> int:
  """Parameters that enter matmuls: the untied input embedding table is a lookup, not a matmul."""
  return total_params if cfg.tie_embeddings else total_params - cfg.vocab_size * cfg.d_model


def train_flops_per_token(cfg: ModelConfig, total_params: int, seq_len: int) -> float:
  attention = 6.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
  return 6.0 * matmul_params(cfg, total_params) + attention


def device_peak_flops(device: Optional[jax.Device] = None) -> Optional[float]:
  """Peak dense bf16 FLOP/s of one device; None when unknown (e.g. CPU). MAI_JAX_PEAK_FLOPS
  overrides it (for a GPU not in the table, or to report an MFU-like figure on CPU)."""
  override = os.environ.get("MAI_JAX_PEAK_FLOPS")
  if override:
    return float(override)
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  for name, peak in PEAK_BF16_FLOPS.items():
    if name in kind:
      return peak
  return None


def mfu(tokens_per_sec: float, flops_per_token: float, num_devices: int,
        peak: Optional[float]) -> Optional[float]:
  if not peak:
    return None
  return tokens_per_sec * flops_per_token / (num_devices * peak)


class MetricWriter:
  """Appends one JSON object per logged step to WORKDIR/metrics.jsonl and writes TensorBoard
  scalars to WORKDIR/tensorboard/. Only process 0 writes; elsewhere every call is a no-op."""

  def __init__(self, workdir: str, enabled: Optional[bool] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
      from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if v is not None else None) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    for key, value in clean.items():
      if value is not None:
        self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()
