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

import importlib.util
import json
import os
import secrets
import time
from typing import Callable, Optional

import jax

from mai_jax import config as config_lib
from mai_jax.config import ModelConfig

# Dense (non-sparse) bf16 tensor-core peak per device, FLOP/s, from the vendors' data sheets
# (H100 SXM5 / H200 SXM / H800 SXM5: 989.4 TFLOP/s; B200: 2.25 PFLOP/s; A100 SXM: 312 TFLOP/s).
PEAK_BF16_FLOPS = {
    "H100": 989.4e12,
    "H200": 989.4e12,
    "H800": 989.4e12,
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


WANDB_ID_FILE = "wandb_id"  # WORKDIR/wandb_id: a resumed run appends to the same W&B run


def check_tracking(cfg: config_lib.Config) -> None:
  """Refuses train.wandb_project without wandb installed, before the run writes anything."""
  if cfg.train.wandb_project and importlib.util.find_spec("wandb") is None:
    raise config_lib.ConfigError(
        f"train.wandb_project={cfg.train.wandb_project!r} needs wandb: pip install -e \".[track]\" "
        f"(or pip install wandb), or drop the key")


class MetricWriter:
  """Appends one JSON object per logged step to WORKDIR/metrics.jsonl, writes TensorBoard scalars
  to WORKDIR/tensorboard/ and, when `cfg.train.wandb_project` is set, logs the same scalars to
  Weights & Biases. Only process 0 writes; elsewhere every call is a no-op."""

  def __init__(self, workdir: str, enabled: Optional[bool] = None,
               cfg: Optional[config_lib.Config] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    self._wandb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
      from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      if cfg is not None and cfg.train.wandb_project:
        self._wandb = _wandb_run(workdir, cfg)

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if v is not None else None) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    for key, value in clean.items():
      if value is not None:
        self._tb.add_scalar(key, value, step)
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in clean.items() if v is not None}, step=step)

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


def _wandb_run(workdir: str, cfg: config_lib.Config):
  """A W&B run for this workdir: its id is kept in WORKDIR/wandb_id, so a resume continues the same
  W&B run; the resolved config is the run's config. Files go to WANDB_DIR, else the workdir."""
  import wandb  # pylint: disable=import-outside-toplevel  (optional: the 'track' extra)
  t = cfg.train
  id_path = os.path.join(workdir, WANDB_ID_FILE)
  if os.path.isfile(id_path):
    with open(id_path) as f:
      run_id = f.read().strip()
  else:
    run_id = secrets.token_hex(4)
    with open(id_path, "w") as f:
      f.write(run_id + "\n")
  return wandb.init(project=t.wandb_project, entity=t.wandb_entity or None,
                    name=t.wandb_run_name or os.path.basename(os.path.abspath(workdir)),
                    mode=t.wandb_mode or None, dir=os.environ.get("WANDB_DIR", workdir),
                    id=run_id, resume="allow", config=config_lib.to_dict(cfg))


class ConsoleLog:
  """One line per logged step for batch jobs, which have no progress bar (train.progress_bar=False,
  the big configs' default) and would otherwise print nothing between start and end:

    mai-jax: step 120/1000  loss 4.2310  52,113 tok/s  MFU 41.2%  ETA 1h02m

  and one line per evaluation. The ETA is the mean step time since the first step it saw (which
  carries the compile) times the steps left. Process 0 only."""

  def __init__(self, num_steps: int, enabled: Optional[bool] = None,
               clock: Callable[[], float] = time.perf_counter, out: Callable[[str], None] = None):
    self.num_steps = num_steps
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._clock, self._out = clock, out or (lambda line: print(line, flush=True))
    self._first: Optional[tuple[int, float]] = None  # (step, time) of the first step seen

  def step(self, step: int, loss: float, tokens_per_sec: float, utilization: Optional[float]):
    if not self.enabled:
      return
    now = self._clock()
    if self._first is None:
      self._first = (step, now)
    first_step, first_time = self._first
    eta = "n/a"
    if step > first_step:
      eta = _duration((now - first_time) / (step - first_step) * (self.num_steps - step))
    mfu_text = f"{utilization:.1%}" if utilization is not None else "n/a"
    self._out(f"mai-jax: step {step}/{self.num_steps}  loss {loss:.4f}  {tokens_per_sec:,.0f} "
              f"tok/s  MFU {mfu_text}  ETA {eta}")

  def eval(self, step: int, loss: float) -> None:
    if self.enabled:
      self._out(f"mai-jax: step {step}/{self.num_steps}  eval loss {loss:.4f}")


def _duration(seconds: float) -> str:
  seconds = max(int(round(seconds)), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
