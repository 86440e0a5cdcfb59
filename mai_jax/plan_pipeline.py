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
  head: where the output layer and loss run. 'last_stage': once, on the last stage, one
    microbatch at a time (in a slot a removed block frees); 'split': after the schedule, each
    stage on 1/S of the rows (the stack's output scattered from stage 0, its gradient gathered
    back); 'replicated': every stage on the whole batch (the output broadcast to all stages).
  one_f_one_b: a stage holds at most ~S microbatches' activations (1F1B); otherwise every
    iteration's stage input is kept until the backward pass (all forwards, then all backwards).
  this_codebase: the schedule of model/pipeline.py, whose FSDP gathers follow
    model.pipeline_gather_once and whose repeat regrouping's copies are measured; otherwise an
    idealized implementation that gathers each repeat's weights once.
  stage_checkpointed: with any remat policy, each iteration's whole stage is checkpointed (only
    its input saved), so the backward recomputes the stage's forward: remat 'dots' costs the
    FLOPs of 'full' (its policy then only shapes the recompute's memory). Otherwise 'dots' is
    selective recomputation (Korthikanti et al. 2022: the attention core only).
  """
  p2p_split_over_tensor: bool
  p2p_overlapped: bool
  head: str
  one_f_one_b: bool
  stage_checkpointed: bool
  this_codebase: bool = False


# model/pipeline.py with the default config: one lax.scan over R M + S - 1 iterations, the stage
# buffer [S, b, T, D] sharded ('stage', batch axes) and replicated over tensor, the shift a
# collective-permute between two iterations' compute, each iteration's stage checkpointed, the
# head split over the stages by rows (model/transformer.py). `this_codebase` gives a config's.
THIS_CODEBASE = PipelineImpl(p2p_split_over_tensor=False, p2p_overlapped=False, head="split",
                             one_f_one_b=False, stage_checkpointed=True, this_codebase=True)
# Megatron-LM / Llama 3 (Narayanan et al. 2021; Dubey et al. 2024 section 3.3.2).
MEGATRON = PipelineImpl(p2p_split_over_tensor=True, p2p_overlapped=True, head="last_stage",
                        one_f_one_b=True, stage_checkpointed=False)


def this_codebase(pipeline_stage_remat: bool) -> PipelineImpl:
  """What model/pipeline.py does under a config: model.pipeline_stage_remat=False keeps each
  iteration's activations under the blocks' own remat policy instead of checkpointing the stage."""
  return dataclasses.replace(THIS_CODEBASE, stage_checkpointed=pipeline_stage_remat)


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
  """Bytes the stack's output [rows, T, D] (on stage 0 after the schedule) moves to reach the
  head, per pipeline run. Replicated head: one broadcast over 'stage' (its gradient needs none:
  every stage computes it). Split head: stage 0 scatters (S - 1) / S of the rows and gathers
  their gradient back. On the last stage: nothing (the head runs where the output is)."""
  if stages == 1 or impl.head == "last_stage":
    return 0.0
  moved = rows * seq_len * d_model * dtype_bytes * (stages - 1) / stages
  return moved if impl.head == "replicated" else 2 * moved


def in_flight_microbatches(stages: int, repeats: int, microbatches: int,
                           impl: PipelineImpl) -> float:
  """Stage inputs a device keeps at the peak (start of the backward pass) per pipeline run.

  Counted in virtual-stage passes (one microbatch through Lc = L / (S R) layers). This
  codebase: every iteration's, R M + S - 1 (the scan saves them all). 1F1B: stage 0 holds S
  microbatches of its L / S layers, S R passes; interleaved it holds (1 + (S - 1) / (S R)) times
  that (Korthikanti et al. 2022 section 4.2.3; Narayanan et al. 2021), S R + S - 1 passes; never
  more than the schedule has (so with M = S, 1F1B keeps as much as all-forwards-first)."""
  if stages == 1:
    return 0.0
  every_iteration = float(iterations(stages, repeats, microbatches))
  if not impl.one_f_one_b:
    return every_iteration
  return min(float(stages * repeats + stages - 1), every_iteration)
