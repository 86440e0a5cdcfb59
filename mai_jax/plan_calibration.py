"""Published large-scale runs the planner's one set of constants is checked against.

Why: the planner's efficiencies (plan.GEMM_EFFICIENCY, ATTENTION_EFFICIENCY, HBM_EFFICIENCY,
COLLECTIVE_EFFICIENCY) are physics, not fitted per run; a prediction far from a published run
means a term is wrong. Each row is the published model, GPU count, mesh and batch, planned with
the implementation that run used (plan_pipeline.MEGATRON for Llama 3's 1F1B/interleaved pipeline;
no pipeline for MaxText). docs/planner.md ("Calibration") has the table, tests/test_plan.py
asserts every row within CALIBRATION_TOLERANCE.
"""

from __future__ import annotations

import dataclasses
import os

from mai_jax import config as config_lib
from mai_jax import plan as plan_lib
from mai_jax import plan_pipeline as pp
from mai_jax.config import Config

CALIBRATION_TOLERANCE = 0.05  # MFU points
EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")


@dataclasses.dataclass(frozen=True)
class PublishedRun:
  """One published training run: what it was, where it is reported, and its layout."""
  name: str
  source: str
  num_gpus: int
  published_mfu: float
  cfg: Config
  layout: plan_lib.Layout
  assumptions: str


def _mesh(**sizes) -> tuple:
  full = {a: 1 for a in config_lib.MESH_AXES}
  full.update(sizes)
  return tuple((a, full[a]) for a in config_lib.MESH_AXES)


def _llama3_405b(num_gpus: int, data: int, published: float) -> PublishedRun:
  """Dubey et al. 2024 (The Llama 3 Herd of Models), Table 4: TP8 CP1 PP16, 8,192 tokens,
  16M tokens per step (2,048 sequences; 32 per data-parallel rank on 8,192 GPUs, 16 on 16,384),
  micro-batch 1 sequence."""
  cfg = config_lib.load_experiment(os.path.join(EXPERIMENTS, "llama3_405b.py"))
  rows = cfg.train.global_batch_size // data
  layout = plan_lib.Layout(_mesh(data=data, stage=16, tensor=8), "dots", 1, repeats=8,
                           pipeline_microbatches=rows, impl=pp.MEGATRON)
  return PublishedRun(
      f"Llama 3 405B, {num_gpus:,} H100, TP8 PP16 DP{data}",
      "Dubey et al. 2024, Table 4", num_gpus, published, cfg, layout,
      "Megatron-style 1F1B interleaved pipeline (sends split over tensor and overlapped, output "
      "layer on the last stage), selective recomputation ('dots'), 8 virtual stages per GPU "
      "(126 layers in 128 one-layer slots: Meta removed a layer from the first and last stage; "
      "the virtual-stage count is not published)")


def _maxtext_llama2_7b() -> PublishedRun:
  """MaxText's GPU result for Llama 2 7B on one 8 x H100 node: FSDP 8, 4 sequences of 4,096 per
  GPU, cuDNN flash attention."""
  base = config_lib.load_experiment(os.path.join(EXPERIMENTS, "llama3_8b.py"))
  cfg = config_lib.apply_overrides(base, {
      "model.num_layers": "32", "model.d_model": "4096", "model.num_heads": "32",
      "model.num_kv_heads": "32", "model.head_dim": "128", "model.d_ff": "11008",
      "model.vocab_size": "32000", "data.seq_len": "4096", "train.global_batch_size": "32",
      "mesh.data": "1", "mesh.fsdp": "8", "mesh.tensor": "1", "mesh.target_num_gpus": "8"})
  layout = plan_lib.Layout(_mesh(fsdp=8), "dots", 1)
  return PublishedRun("MaxText Llama 2 7B, 8 H100, FSDP 8", "MaxText README (GPU, a3)", 8,
                      0.497, cfg, layout,
                      "remat 'dots' (projections saved: the fastest policy that fits)")


def published_runs() -> list[PublishedRun]:
  return [_llama3_405b(8192, 64, 0.43), _llama3_405b(16384, 128, 0.41), _maxtext_llama2_7b()]


def predict(run: PublishedRun) -> plan_lib.Plan:
  return plan_lib.plan(run.cfg, "h100", run.num_gpus, run.layout)


def calibration_table() -> list[dict]:
  """[{name, published, predicted, error}] (MFU as fractions)."""
  rows = []
  for run in published_runs():
    predicted = predict(run).mfu
    rows.append({"name": run.name, "source": run.source, "published": run.published_mfu,
                 "predicted": predicted, "error": predicted - run.published_mfu,
                 "assumptions": run.assumptions})
  return rows
