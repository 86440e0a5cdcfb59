"""The planner's pipeline-parallel terms: the bubble of a schedule, the stage-to-stage sends and the
activations a stage keeps in flight. Formulas and sources: docs/planner.md ("Pipeline stages").

Why a module of its own: these terms depend on how a pipeline is implemented (which buffers a
schedule keeps, whether sends overlap compute), and the planner predicts two implementations with
the same physics: this codebase's single-SPMD-program schedule (model/pipeline.py) and the
1F1B/interleaved schedule of Megatron-LM and Llama 3, against whose published runs the whole model
is calibrated (plan_calibration.py). Plain numbers in, numbers out: no config or layout types, so
plan.py can import it without a circle.
"""

from __future__ import annotations

import dataclasses

from mai_jax.model.pipeline import bubble_fraction


@dataclasses.dataclass(frozen=True)
class PipelineImpl:
  """What a pipeline implementation does, as far as time and memory go.

  p2p_split_over_tensor: each tensor rank sends 1/t of the stage activations and the next stage
    all-gathers them over NVLink (Megatron's scatter/gather optimization); otherwise every tensor
    rank sends the whole [b, T, D] buffer over its own NIC.
  p2p_overlapped: sends run while the stage computes (1F1B with overlapped p2p); otherwise each
    iteration waits for its collective-permute.
  head_on_last_stage: embedding, unembedding and loss run once (on their stage, in a slot a
    removed block frees); otherwise every stage runs them on the whole batch (replicated over
    'stage') and the last stage's output is broadcast to all stages.
  one_f_one_b: a stage holds at most ~S microbatches' activations (1F1B); otherwise every
    iteration's stage input is kept until the backward pass (all forwards, then all backwards).
  stage_checkpointed: with any remat policy, each iteration's whole stage is checkpointed (only
    its input saved), so the backward recomputes the stage's forward: remat 'dots' costs the
    FLOPs of 'full' (its policy then only shapes the recompute's memory). Otherwise 'dots' is
    selective recomputation (Korthikanti et al. 2022: the attention core only).
  """
  p2p_split_over_tensor: bool
  p2p_overlapped: bool
  head_on_last_stage: bool
  one_f_one_b: bool
  stage_checkpointed: bool


# model/pipeline.py as it is: one lax.scan over R M + S - 1 iterations, the stage buffer
# [S, b, T, D] sharded ('stage', batch axes) and replicated over tensor, the shift a
# collective-permute between two iterations' compute, the head replicated over stages.
THIS_CODEBASE = PipelineImpl(p2p_split_over_tensor=False, p2p_overlapped=False,
                             head_on_last_stage=False, one_f_one_b=False,
                             stage_checkpointed=True)
# Megatron-LM / Llama 3 (Narayanan et al. 2021; Dubey et al. 2024 section 3.3.2).
MEGATRON = PipelineImpl(p2p_split_over_tensor=True, p2p_overlapped=True,
                        head_on_last_stage=True, one_f_one_b=True, stage_checkpointed=False)


def iterations(stages: int, repeats: int, microbatches: int) -> int:
  """Schedule length in stage steps: R M + S - 1 (model/pipeline.py's scan)."""
  return repeats * microbatches + stages - 1


def stretch(stages: int, repeats: int, microbatches: int) -> float:
  """Wall time of the pipelined blocks over the time of their useful work: 1 / (1 - bubble)."""
  return 1.0 / (1.0 - bubble_fraction(stages, repeats, microbatches))


def layers_per_device(num_layers: int, stages: int, repeats: int) -> int:
  """Layers one device computes: R x ceil(L / (S R)). With L not divisible (Llama 3's 126 layers
  over 16 stages) the fullest virtual stage sets every iteration's time."""
  return repeats * -(-num_layers // (stages * repeats))


def p2p_bytes(rows: int, seq_len: int, d_model: int, dtype_bytes: int, tensor: int,
              stages: int, repeats: int, microbatches: int, impl: PipelineImpl) -> float:
  """Bytes one device sends to the next stage per pipeline run: every iteration passes its
  stage's [rows, T, D] output on (forward) and the gradient of its input back (backward)."""
  if stages == 1:
    return 0.0
  per_send = rows * seq_len * d_model * dtype_bytes
  if impl.p2p_split_over_tensor:
    per_send /= tensor
  return p2p_sends(stages, repeats, microbatches, impl) * per_send


def p2p_sends(stages: int, repeats: int, microbatches: int, impl: PipelineImpl) -> int:
  """Sends per pipeline run, forward and backward: one per iteration each way (1F1B sends only
  for its R M real items, its warm-up and cool-down overlap the bubble)."""
  if stages == 1:
    return 0
  return 2 * (iterations(stages, repeats, microbatches) if not impl.one_f_one_b
              else repeats * microbatches)


def head_broadcast_bytes(rows: int, seq_len: int, d_model: int, dtype_bytes: int, stages: int,
                         impl: PipelineImpl) -> float:
  """The replicated head needs the last stage's output [rows, T, D] on every stage: one
  broadcast over 'stage' per pipeline run (its gradient needs none: every stage computes it)."""
  if stages == 1 or impl.head_on_last_stage:
    return 0.0
  return rows * seq_len * d_model * dtype_bytes * (stages - 1) / stages


def in_flight_microbatches(stages: int, repeats: int, microbatches: int,
                           impl: PipelineImpl) -> float:
  """Stage inputs a device keeps at the peak (start of the backward pass) per pipeline run.

  This codebase: every iteration's input, R M + S - 1 (the scan saves them all). 1F1B: stage 0
  holds S microbatches; interleaved with R virtual stages it holds (1 + (S - 1) / (S R)) x S of
  its virtual stages' inputs (Narayanan et al. 2021), each of 1 / R of its layers."""
  if stages == 1:
    return 0.0
  if not impl.one_f_one_b:
    return float(iterations(stages, repeats, microbatches))
  return min(stages * (1 + (stages - 1) / (stages * repeats)), repeats * microbatches)
