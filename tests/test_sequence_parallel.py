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
import test_plan as tpl
from mai_jax import aot, hardware
from mai_jax import config as C, plan as P, plan_pipeline as pp, sharding as S


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
  # Each device sends its [1, B/(M fsdp), T/tensor, D] part of the stage buffer (forward and
  # backward), not the [.., T, D] whole of it.
  sends = re.findall(r"= (f32\[[\d,]+\])\S* collective-permute(?:-start)?\(", hlo)
  split = "f32[%d,%d,%d,%d]" % (1, tp.ROWS // 4, tp.SEQ // 2, tp.MODEL.d_model)
  assert sends.count(split) >= 2, sends
  assert not [s for s in sends if s.count(",") == 3 and s != split], sends


def test_a_sequence_the_tensor_axis_does_not_divide_is_a_one_line_error():
  cfg = tp._cfg(C.MeshConfig(fsdp=2, tensor=4), sequence_parallel=True)
  bad = dataclasses.replace(cfg, data=C.DataConfig(seq_len=18))
  with pytest.raises(C.ConfigError) as info:
    C.validate(bad, 8)
  message = str(info.value)
  assert "data.seq_len=18" in message and "mesh.tensor=4" in message and "\n" not in message
  C.validate(dataclasses.replace(bad, model=dataclasses.replace(cfg.model,
                                                                 sequence_parallel=False)), 8)
  rules = C.DEFAULT_RULES + (("residual_seq", ("tensor",)),)
  with pytest.raises(C.ConfigError, match="'residual_seq' is derived"):
    C.validate(dataclasses.replace(cfg, mesh=C.MeshConfig(fsdp=2, tensor=4, rules=rules)), 8)


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


# ----------------------------------------------------------------------------------------------
# The planner


# MAI-1 dense on stage 4 x fsdp 192 x tensor 4 (R 10, M_p 4) with the stage checkpoint and no
# gradient accumulation: the layout before it had sequence parallelism.
STAGE4_T4 = {**tpl.PLAIN_KNOBS, "mesh.stage": "4", "mesh.fsdp": "192", "mesh.tensor": "4",
             "mesh.data": "-1", "model.pipeline_repeats": "10", "model.pipeline_microbatches": "4"}


def _mai1_plans():
  """MAI-1 dense at STAGE4_T4 on 15,360 H100, planned with sequence parallelism off and on."""
  cfg = C.apply_overrides(C.load_experiment(tpl.MAI1), STAGE4_T4)
  on = C.apply_overrides(cfg, {"model.sequence_parallel": "True"})
  return cfg, on, P.plan(cfg, "h100", 15360), P.plan(on, "h100", 15360)


def test_planner_splits_the_residual_terms_and_the_stage_sends_over_tensor():
  """With SP the D-sized activations, the 10 D elementwise bytes per token and the stage sends
  shrink t-fold; the tensor bytes stay (reduce-scatter + all-gather = all-reduce) and the layout
  keeps this codebase's implementation (its FSDP gather scope)."""
  cfg, cfg_on, off, on = _mai1_plans()
  layout = on.layout
  t, c, T, D = layout.size("tensor"), 2, cfg.data.seq_len, cfg.model.d_model
  assert layout.sequence_parallel and not off.layout.sequence_parallel and t == 4
  assert layout.impl.this_codebase and P.p2p_impl(layout).p2p_split_over_tensor
  assert P.fsdp_gather_scope(cfg_on, layout) == P.fsdp_gather_scope(cfg, off.layout)
  b = P.pipeline_rows_per_device(cfg, layout)
  n = b * T
  acts = [P.layer_activation_bytes(x, p.layout, "flash", rows=b)
          for x, p in ((cfg, off), (cfg_on, on))]
  assert acts[0]["carry"] == n * c * D == t * acts[1]["carry"]
  assert acts[0]["dots"] - acts[1]["dots"] == pytest.approx(n * c * D * (1 - 1 / t))  # o_proj
  assert acts[0]["none"] - acts[1]["none"] == pytest.approx(n * c * 4 * D * (1 - 1 / t))
  assert on.communication["tensor"] == off.communication["tensor"]
  S, R, M = layout.stages, layout.repeats, layout.pipeline_microbatches
  sends = 2 * (R * M + S - 1) * n * D * c  # every iteration's [b, T, D] forward and backward
  assert off.communication["stage"]["bytes"] - on.communication["stage"]["bytes"] == (
      pytest.approx(sends * (1 - 1 / t), rel=1e-6))
  tokens = P.rows_per_device(cfg, layout) * T
  Ld = pp.layers_per_device(cfg.model.num_layers, S, R)
  hbm = hardware.GPUS["h100"].hbm_bandwidth * P.HBM_EFFICIENCY
  saved = tokens * Ld * c * 10 * D * (1 - 1 / t) * 4 / hbm  # 4 passes with remat
  assert off.compute_times["elementwise"] - on.compute_times["elementwise"] == pytest.approx(saved)
  assert on.memory["activations"] < off.memory["activations"] and on.mfu > off.mfu


# A pipelined layout of the same model: stage 2 x fsdp 2 x tensor 2, 2 repeats of 4 layers, 4
# pipeline microbatches, remat dots (every iteration's saved stage input is split too).
PIPELINED = {"mesh.stage": "2", "mesh.data": "1", "model.num_layers": "4",
             "model.pipeline_repeats": "2", "model.pipeline_microbatches": "4",
             "train.global_batch_size": "16", "model.remat": "dots"}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, PIPELINED], ids=["plain", "pipelined"])
def test_planned_memory_saving_matches_the_compiled_step(extra):
  """test_plan's small Llama on data 2 x fsdp 2 x tensor 2 (and PIPELINED): what SP saves in the
  compiled step's peak (XLA's memory analysis) is what the planner says it saves, within 50%
  (measured on jax 0.10.2: plain 1.57 MB planned, 1.57 MB compiled; pipelined 5.77 MB planned,
  5.58 MB compiled). Slow: two ~6 s compiles each."""
  checks = [aot.compile_check(tpl.small_cfg(**extra, **{"model.sequence_parallel": str(sp)}),
                              int(extra.get("model.num_layers", 2)), None)
            for sp in (False, True)]
  compiled = [ch["compiled"]["peak_bytes"] for ch in checks]
  planned = [ch["planned"]["memory_per_device_bytes"]["total"] for ch in checks]
  assert planned[0] - planned[1] > 0
  assert compiled[0] - compiled[1] == pytest.approx(planned[0] - planned[1], rel=0.5)
