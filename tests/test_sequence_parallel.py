"""Sequence parallelism (model.sequence_parallel): the residual stream split over 'tensor' along
the sequence computes the same loss and gradients, and the compiled step really splits it.

The reference is test_pipeline's: the same model, parameters and packed batch (segment ids,
padding, z-loss) on one device without a mesh. Decoding with sequence parallelism (prefill
split, one-token steps whole) is covered by test_sample's cached-logits test.
"""

import dataclasses
import re

import pytest
from jax.sharding import PartitionSpec

import test_pipeline as tp
from mai_jax import config as C, sharding as S


@pytest.fixture(scope="module")
def reference():
  return tp._reference("dense")


def _count_shape(hlo: str, shape: tuple) -> int:
  """Occurrences of per-device float32 arrays of `shape` in compiled HLO text."""
  return len(re.findall(rf"\bf32\[{','.join(map(str, shape))}\]", hlo))


@pytest.fixture(scope="module")
def tensor_runs(reference):
  """{sequence_parallel: ((loss, grads, MoE stats), compiled HLO)} on fsdp=2 x tensor=4."""
  runs = {}
  for sp in (False, True):
    cfg = tp._cfg(C.MeshConfig(fsdp=2, tensor=4), sequence_parallel=sp)
    C.validate(cfg, 8)
    runs[sp] = tp._pipelined_loss_and_grads(cfg, reference[0])
  return runs


def test_loss_and_grads_with_sequence_parallelism_equal_the_plain_step(reference, tensor_runs):
  tp._assert_close(tensor_runs[False][0], reference[1:])
  tp._assert_close(tensor_runs[True][0], reference[1:])
  tp._assert_close(tensor_runs[True][0], tensor_runs[False][0])


def test_the_residual_is_split_over_tensor_in_the_compiled_step(tensor_runs):
  """The residual's per-device shape is [B/fsdp, T/tensor, D] with SP, and never without (where
  it is [B/fsdp, T, D]). Counting shapes rather than collectives: XLA:CPU leaves the
  reduce-scatter as an all-reduce + dynamic-slice that the GPU pipeline fuses into one."""
  split = (tp.ROWS // 2, tp.SEQ // 4, tp.MODEL.d_model)
  whole = (tp.ROWS // 2, tp.SEQ, tp.MODEL.d_model)
  off, on = (tensor_runs[sp][1] for sp in (False, True))
  assert _count_shape(off, split) == 0 and _count_shape(off, whole) > 0
  assert _count_shape(on, split) > _count_shape(on, whole)


@pytest.mark.slow
def test_pipelined_step_with_sequence_parallelism_equals_the_plain_step(reference):
  """stage=2 x fsdp=2 x tensor=2: the stage buffers carry the sequence split over 'tensor', and
  the ppermute between stages (manual over 'stage' only) moves the split buffers. Slow: one more
  10 s compile of the pipelined step."""
  cfg = tp._cfg(C.MeshConfig(stage=2, fsdp=2, tensor=2), pipeline_microbatches=2,
                sequence_parallel=True)
  C.validate(cfg, 8)
  got, hlo = tp._pipelined_loss_and_grads(cfg, reference[0])
  tp._assert_close(got, reference[1:])
  # The stage buffers [S, B/M, T, D] hold [1, B/(M fsdp), T/tensor, D] per device.
  assert _count_shape(hlo, (1, tp.ROWS // 4, tp.SEQ // 2, tp.MODEL.d_model)) > 0


def test_a_sequence_the_tensor_axis_does_not_divide_is_a_one_line_error():
  cfg = tp._cfg(C.MeshConfig(fsdp=2, tensor=4), sequence_parallel=True)
  bad = dataclasses.replace(cfg, data=C.DataConfig(seq_len=18))
  with pytest.raises(C.ConfigError) as info:
    C.validate(bad, 8)
  message = str(info.value)
  assert "data.seq_len=18" in message and "mesh.tensor=4" in message and "\n" not in message
  C.validate(dataclasses.replace(bad, model=dataclasses.replace(cfg.model,
                                                                 sequence_parallel=False)), 8)


def test_residual_rules_derive_residual_seq_from_seq_and_heads():
  rules = S.residual_rules(C.DEFAULT_RULES, False)
  assert dict(rules)["residual_seq"] == ()
  assert dict(S.residual_rules(rules, True))["residual_seq"] == ("tensor",)
  # Off is exactly 'seq' (custom rules that split the sequence keep doing so)...
  custom = tuple((n, ("data",) if n == "seq" else a) for n, a in C.DEFAULT_RULES)
  assert dict(S.residual_rules(custom, False))["residual_seq"] == ("data",)
  assert dict(S.residual_rules(custom, True))["residual_seq"] == ("data", "tensor")
  # ...and the residual [B, T, D] spec gives 'tensor' to T, fsdp to the batch.
  assert S.logical_to_spec(("batch", "residual_seq", "embed"),
                           S.residual_rules(C.DEFAULT_RULES, True)) == (
      PartitionSpec(("data", "fsdp", "expert"), "tensor", None))
