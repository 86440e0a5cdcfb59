"""Analytic planner: parameters, FLOPs, memory per device, communication and step time of a config
on a GPU type x GPU count x mesh, without allocating anything. Formulas, sources: docs/planner.md.

Why analytic and not measured: nobody here has 15,360 H100s. Parameter counts and shardings are
exact (they come from the model's own abstract shapes and the config's logical-axis rules, the same
path the trainer takes); memory, communication and time are models with their assumptions named
below as constants, checked against XLA's compiled memory analysis on fake CPU devices (tests and
`mai-jax plan --compile`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

from mai_jax import config as config_lib
from mai_jax import hardware, metrics
from mai_jax import plan_moe
from mai_jax import plan_pipeline as pp
from mai_jax import plan_remat
from mai_jax.model.pipeline import bubble_fraction
from mai_jax.config import Config, ConfigError, ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
# The compute model: one set of constants for every GPU, layout and model, calibrated as a whole
# against published runs (plan_calibration.py, docs/planner.md "Calibration"); no per-run factor.
# Fraction of the dense bf16 peak that large bf16 GEMMs sustain in training: the 989 TFLOP/s peak
# assumes the 1.98 GHz boost clock, which an H100 SXM at its 700 W limit does not hold under dense
# tensor-core load (~1.4-1.6 GHz); cuBLAS GEMMs of transformer shapes measure ~600-700 TFLOP/s.
GEMM_EFFICIENCY = 0.65
# A GEMM whose smallest dimension is m reaches m / (m + GEMM_HALF_DIM) of that (tile and wave
# quantization, launch overheads: narrow tensor-parallel shards and few tokens run slower).
GEMM_HALF_DIM = 128
# The attention core (QK^T, softmax, AV; cuDNN/FlashAttention forward and backward) reaches a lower
# fraction of peak than a GEMM: FlashAttention-2 measures ~50% forward, ~40% backward on H100.
ATTENTION_EFFICIENCY = 0.45
# Elementwise work (norms, residual adds, RoPE, SwiGLU's product, softmax cross-entropy, the
# optimizer update) is bound by HBM bandwidth, of which streaming kernels reach ~80%.
HBM_EFFICIENCY = 0.8
# Fraction of link bandwidth NCCL ring/tree collectives reach as bus bandwidth (nccl-tests on
# DGX H100 report ~360-400 GB/s of 450 GB/s NVLink and ~40-45 GB/s of 50 GB/s NDR per GPU).
COLLECTIVE_EFFICIENCY = 0.8
# Per-hop latency of one collective step; a collective over n ranks pays log2(n) hops (NCCL's
# tree/PAT algorithms at scale).
COLLECTIVE_LATENCY_S = {"nvlink": 3e-6, "internode": 10e-6}
# HBM the XLA allocator may use (XLA_PYTHON_CLIENT_MEM_FRACTION=0.9); the CUDA context, NCCL's own
# buffers and fragmentation take the rest.
USABLE_HBM_FRACTION = 0.9
# Allowance for cuBLAS/cuDNN workspaces and collective staging buffers inside XLA's pool.
WORKSPACE_BYTES = 1 << 30
REMATS = ("none", "dots", "attn_proj", "qkv_proj", "full")  # model/remat.py, most kept first
# Dtype of the weights and gradients that fsdp/data collectives move: 'compute' or 'param'. The
# model casts each weight to the compute dtype right before its matmul, and SPMD sharding
# propagation keeps an elementwise cast sharded like its input, so the all-gather lands after the
# cast (bf16). Unverified on GPU: XLA:CPU runs every bf16 op in f32, so its HLO gathers f32 either
# way. With 'param' (float32 on the wire) MAI-1 dense drops from ~31% to ~16% MFU.
WIRE_DTYPE = "compute"
# How the step reduces the gradient over 'data' under mesh.zero1 (moments split over 'data'):
# 'reduce_scatter' (each replica receives the 1/data slice its moments update) or 'all_reduce'.
# The SPMD partitioner's output for the zero1 step on 8 CPU devices (data 4 x tensor 2) has no
# reduce-scatter: the whole gradient is all-reduced (the global-norm clip reads all of it), each
# replica slices its moments' part, and the updated float32 parameters are all-gathered. GPU XLA
# may rewrite an all-reduce + slice into a reduce-scatter; unverified, so modelled as emitted.
ZERO1_GRAD_COLLECTIVE = "all_reduce"
# Mesh axes from the innermost (fastest links) outwards: the order a hybrid mesh fills a node.
AXES_INNER_FIRST = ("tensor", "expert", "fsdp", "stage", "data")


@dataclasses.dataclass(frozen=True)
class Layout:
  """One way to run a config: mesh sizes (all resolved), remat policy, gradient-accumulation
  microbatches and, with mesh stage > 1, the pipeline schedule (repeats R, pipeline microbatches M
  per accumulation microbatch) and the implementation whose costs are modelled; zero1 is
  mesh.zero1 (the optimizer moments also split over 'data', train/state.py); sequence_parallel is
  model.sequence_parallel (the residual stream split over 'tensor' along the sequence)."""
  mesh: tuple[tuple[str, int], ...]  # ((axis, size), ...) in config.MESH_AXES order
  remat: str
  microbatches: int
  repeats: int = 1
  pipeline_microbatches: int = 1
  impl: pp.PipelineImpl = pp.THIS_CODEBASE
  zero1: bool = False
  sequence_parallel: bool = False
  # model.expert_devices_per_node: the expert all-to-all as inter-node x intra-node phases (0: flat)
  expert_devices_per_node: int = 0

  def size(self, axis: str) -> int:
    return dict(self.mesh).get(axis, 1)

  @property
  def stages(self) -> int:
    return self.size("stage")


def layout_of(cfg: Config, num_gpus: int) -> Layout:
  sizes = config_lib.mesh_shape(cfg.mesh, num_gpus)
  stages = sizes["stage"]
  return Layout(tuple((a, sizes[a]) for a in config_lib.MESH_AXES), cfg.model.remat,
                cfg.train.microbatches, cfg.model.pipeline_repeats if stages > 1 else 1,
                config_lib.pipeline_microbatches(cfg, stages) if stages > 1 else 1,
                impl=codebase_impl(cfg), zero1=cfg.mesh.zero1,
                sequence_parallel=cfg.model.sequence_parallel,
                expert_devices_per_node=cfg.model.expert_devices_per_node)


def codebase_impl(cfg: Config) -> pp.PipelineImpl:
  """The pipeline implementation this codebase runs for `cfg` (plan_pipeline.this_codebase)."""
  return pp.this_codebase(cfg.model.pipeline_stage_remat)


def residual_split(layout: Layout) -> int:
  """Devices each D-sized activation of the residual stream is split over: tensor with sequence
  parallelism (Korthikanti et al. 2022), else 1 (replicated over 'tensor')."""
  return layout.size("tensor") if layout.sequence_parallel else 1


def p2p_impl(layout: Layout) -> pp.PipelineImpl:
  """layout.impl as far as its stage-to-stage sends go: with sequence parallelism this codebase's
  stage buffers carry the sequence split over 'tensor' (model/pipeline.py STAGE_ACT), so each
  tensor rank sends 1/t of them, as Megatron's scatter/gather does."""
  if layout.sequence_parallel and not layout.impl.p2p_split_over_tensor:
    return dataclasses.replace(layout.impl, p2p_split_over_tensor=True)
  return layout.impl


# ----------------------------------------------------------------------------------------------
# Parameters


def is_moe(model: ModelConfig) -> bool:
  return model.num_experts > 0


def param_counts(model: ModelConfig) -> tuple[int, int]:
  """(total, active per token), exact from the shapes alone; active == total for dense models
  (the model's own counts, checked against the abstract init and Mixtral's published numbers)."""
  from mai_jax.model.transformer import count_active_params, count_params
  return count_params(model), count_active_params(model)


def ffn_width(model: ModelConfig) -> float:
  """Feed-forward width per token, averaged over the layers (for activation memory): d_ff for
  dense layers; for MoE layers the routed experts' experts_per_token x d_ff_expert (x the capacity
  factor: the padded expert buffers) plus the shared experts."""
  if not is_moe(model):
    return float(model.d_ff)
  from mai_jax.model.moe import expert_d_ff, num_moe_layers
  n_moe, L = num_moe_layers(model), model.num_layers
  routed = model.experts_per_token * (model.capacity_factor or 1.0)
  moe_width = (routed + model.num_shared_experts) * expert_d_ff(model)
  return ((L - n_moe) * model.d_ff + n_moe * moe_width) / L


@functools.lru_cache(maxsize=16)
def _abstract_params(model: ModelConfig):
  """[(shape, logical axes)] of every parameter, from the model's own abstract init (no memory)."""
  import jax
  from jax.sharding import PartitionSpec
  from mai_jax.model import Decoder
  from mai_jax.train import state as state_lib
  _, shapes, logical = state_lib.abstract_model(lambda rngs: Decoder(model, rngs=rngs))
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  specs = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
  out = []
  for (path, leaf), spec in zip(leaves, specs, strict=True):
    names = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
    out.append((tuple(leaf.shape), names, _block_unit(path)))
  return tuple(out)


def _block_unit(path) -> Optional[tuple]:
  """The repeated unit a parameter belongs to: (stack,) for a scanned stack (its leading dim counts
  the units: blocks, or groups of blocks with moe_layer_interval > 1), (stack, i) for block i of an
  unscanned list, None outside the blocks (embeddings, final norm)."""
  keys = [getattr(k, "key", None) for k in path]
  if keys[0] not in ("blocks", "dense_blocks"):
    return None
  return (keys[0], keys[1]) if isinstance(keys[1], int) else (keys[0],)


@dataclasses.dataclass(frozen=True)
class ParamShards:
  """Per-device element counts of the parameters under a layout."""
  per_device: int  # elements of all parameter shards on one device
  fsdp_gathered: int  # elements the fsdp-sharded leaves have on one device once all-gathered
  fsdp_sharded: int  # elements (per device) of the leaves that are sharded over fsdp
  # the largest repeated unit's (block, or MoE group) gathered elements: the transient during its
  # matmuls (with MoE, the MoE blocks' local experts outweigh a dense block)
  per_layer_gathered: int
  stacked: int = 0  # elements (per device) of the scanned block stacks
  # elements (per device) of one optimizer moment under mesh.zero1: each leaf's parameter shard
  # further split over 'data' along the first dim that divides (train/state.zero1_spec)
  zero1_moment: int = 0


def param_shards(cfg: Config, layout: Layout) -> ParamShards:
  """Shard sizes exactly as the trainer lays parameters out (sharding.logical_to_spec)."""
  return _param_shards(cfg.model, cfg.mesh.rules, layout.mesh)


@functools.lru_cache(maxsize=4096)
def _param_shards(model: ModelConfig, rules, mesh_sizes) -> ParamShards:
  """param_shards, cached per mesh (--search plans many layouts of one mesh)."""
  from jax.sharding import AbstractMesh
  from mai_jax.sharding import logical_to_spec
  from mai_jax.train.state import zero1_spec
  layout = Layout(mesh_sizes, "full", 1)
  mesh = AbstractMesh(tuple(s for _, s in mesh_sizes), tuple(a for a, _ in mesh_sizes))
  per_device = gathered = sharded = stacked = zero1_moment = 0
  unit_elems: dict[tuple, float] = {}
  for shape, names, unit in _abstract_params(model):
    spec = logical_to_spec(names, rules, mesh, shape)
    axes = _spec_axes(spec)
    elems = _shard_elems(shape, axes, unit, layout)
    per_device += elems
    moment_spec = zero1_spec(tuple(spec), shape, dict(mesh_sizes))
    zero1_moment += elems if moment_spec is None else _shard_elems(
        shape, _spec_axes(moment_spec), unit, layout)
    fsdp = layout.size("fsdp") if "fsdp" in axes else 1
    if fsdp > 1:
      gathered += elems * fsdp
      sharded += elems
    if unit is not None:
      units = shape[0] if len(unit) == 1 else 1  # a scanned stack's leading dim
      stacked += elems if len(unit) == 1 else 0
      unit_elems[unit] = unit_elems.get(unit, 0) + elems * fsdp / units
  return ParamShards(per_device, gathered, sharded, int(max(unit_elems.values(), default=0)),
                     stacked, zero1_moment)


def _spec_axes(spec) -> list[str]:
  return [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]


def _shard_elems(shape, axes, unit, layout: Layout) -> int:
  """Elements of one device's shard of a leaf split over `axes`."""
  elems = math.prod(shape) // math.prod(layout.size(a) for a in axes)
  if unit == ("blocks",) and layout.stages > 1 and "stage" not in axes:
    # a pipelined stack the stages do not divide (126 layers over 16): the fullest stage's share
    # (the MoE models' dense_blocks run before the pipeline, laid out as their spec says)
    elems = elems * -(-shape[0] // layout.stages) // shape[0]
  return elems


def flops_per_token(cfg: Config) -> float:
  """Model training FLOPs per token: 6 x active matmul params + causal attention (metrics.py)."""
  _, active = param_counts(cfg.model)
  return metrics.train_flops_per_token(cfg.model, active, cfg.data.seq_len)


def recompute_flops_per_token(cfg: Config, remat: str) -> float:
  """Extra forward FLOPs per token that rematerialization costs (not counted in MFU), without a
  pipeline's stage checkpoint: the attention core's forward (QK^T and AV, batched dots no policy
  saves) plus 2 x the matmul parameters each block's backward runs again (plan_remat: the needed
  projection outputs the policy does not keep; the routed experts' three projections under any
  policy; a dense block's mlp_down never). 'none': nothing."""
  if remat == "none":
    return 0.0
  m = cfg.model
  attention_fwd = 2.0 * m.num_layers * cfg.data.seq_len * m.num_heads * m.head_dim
  return attention_fwd + 2.0 * _recomputed_layer_params(m, remat, range(m.num_layers))


def _recomputed_layer_params(m: ModelConfig, remat: str, layers: range,
                             this_codebase: bool = True) -> float:
  """Matmul parameters per token whose forward the backward of `layers` (block indices) reruns
  under `remat` (plan_remat), MoE blocks with their shared experts, router and routed experts (the
  chosen experts' gate and up; implementations other than this one keep them under selective
  recompute, 'full' aside). Unlike a dense block's mlp_down, the routed experts' down projection
  is rerun: the gradient of the router weights that combine them needs their outputs (XLA's FLOP
  count of an MoE block: 3 k D F_e per token under 'dots')."""
  if remat == "none":
    return 0.0
  from mai_jax.model.moe import expert_d_ff
  D, H, KV, K = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
  dense = plan_remat.recomputed_params(plan_remat.projection_params(D, H, KV, K, m.d_ff), remat)
  n_moe = _moe_layers_in(m, layers.start, layers.stop)
  if not n_moe:
    return len(layers) * dense
  Fe = expert_d_ff(m)
  sparse = plan_remat.recomputed_params(
      plan_remat.projection_params(D, H, KV, K, m.num_shared_experts * Fe), remat)
  if not plan_remat.saves_router(remat):
    sparse += D * m.num_experts
  if this_codebase or remat == "full":  # gate, up and down: the combine's weight gradient
    sparse += 3 * m.experts_per_token * D * Fe  # needs the chosen experts' outputs
  return (len(layers) - n_moe) * dense + n_moe * sparse


@functools.lru_cache(maxsize=None)
def _moe_layers_in(m: ModelConfig, start: int, stop: int) -> int:
  """MoE blocks among layers [start, stop) (cached: --search plans tens of thousands of layouts of
  one model)."""
  from mai_jax.model.moe import is_moe_layer
  return sum(is_moe_layer(m, i) for i in range(start, stop)) if is_moe(m) else 0


# ----------------------------------------------------------------------------------------------
# Memory


def pipeline_rows_per_device(cfg: Config, layout: Layout) -> int:
  """Sequences per device in one pipeline microbatch (rows_per_device without stages)."""
  rows = rows_per_device(cfg, layout)
  if rows % layout.pipeline_microbatches:
    raise ConfigError(f"{rows} rows per device per microbatch do not split into "
                      f"model.pipeline_microbatches={layout.pipeline_microbatches}; pick a "
                      f"divisor of {rows} or a larger train.global_batch_size")
  return rows // layout.pipeline_microbatches


def rows_per_device(cfg: Config, layout: Layout) -> int:
  """Sequences per device per microbatch (the batch is sharded over the 'batch' rule's axes; with
  stages, every stage sees all of them, one pipeline microbatch at a time)."""
  shards = math.prod(layout.size(a) for a in dict(cfg.mesh.rules).get("batch", ()))
  per_micro = cfg.train.global_batch_size // layout.microbatches
  if cfg.train.global_batch_size % layout.microbatches or per_micro % shards:
    raise ConfigError(
        f"train.global_batch_size={cfg.train.global_batch_size} with {layout.microbatches} "
        f"microbatches does not split evenly over the {shards} devices the batch is sharded over")
  return per_micro // shards


def layer_activation_bytes(cfg: Config, layout: Layout, attention: str,
                           d_ff: Optional[float] = None,
                           rows: Optional[int] = None) -> dict[str, float]:
  """Bytes one block keeps for its backward pass on one device, per remat policy.

  Korthikanti et al. 2022 (34 s b h + 5 a s^2 b for GPT) adapted to this model's ops, with
  n = rows x seq tokens per device, c bytes per compute-dtype element, t = tensor size and
  s = residual_split (t with sequence parallelism, else 1):
    none: n c (4 D / s + (2 H + 2 KV) K / t + 3 F / t) + attention core
          (norm in/out twice, q k v after RoPE, attention output, gate, up, silu(gate)*up)
    proj: the projection outputs a block's backward needs, by checkpoint_name (plan_remat):
          n c (H K / t, KV K / t, KV K / t, D / s, F / t, F / t) for q, k, v, o, gate, up
    dots: their sum, n c (D / s + (H + 2 KV) K / t + 2 F / t) (mlp_down's output is not needed)
    carry: n c D / s                                    (the residual stream between blocks)
  Without sequence parallelism the D-sized terms are replicated over 'tensor' and do not shrink
  with t: at MAI-1's D = 18,432 they are most of a block's activations.
  attention core: 'flash' keeps a float32 log-sum-exp per head; 'xla' materializes the float32
  logits and probabilities [b, H/t, T, T] and the boolean causal/document masks [b, T, T].
  F is `d_ff` (default: ffn_width, the average over the layers); an MoE block passes the shared
  experts' width and adds moe_layer_bytes for the routed experts. `rows`: sequences per device
  (default rows_per_device; a pipeline stage works on pipeline_rows_per_device at a time).
  """
  m, c, t = cfg.model, DTYPE_BYTES[cfg.model.compute_dtype], layout.size("tensor")
  T = cfg.data.seq_len
  rows = rows_per_device(cfg, layout) if rows is None else rows
  n = rows * T
  D, H, KV, K = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
  F = ffn_width(m) if d_ff is None else d_ff
  r = residual_split(layout)
  Ht = H // t if H % t == 0 else H
  if attention == "flash":
    core = n * Ht * 4
  else:
    core = 2 * rows * Ht * T * T * 4 + 2 * rows * T * T
  proj = {"q_proj": n * c * H * K / t, "k_proj": n * c * KV * K / t,
          "v_proj": n * c * KV * K / t, "o_proj": n * c * D / r, "mlp_gate": n * c * F / t,
          "mlp_up": n * c * F / t}
  return {
      "none": n * c * (4 * D / r + (2 * H + 2 * KV) * K / t + 3 * F / t) + core,
      "dots": sum(proj.values()),
      "proj": proj,
      "carry": n * c * D / r,
      "core": core,
  }


def moe_buffer_rows(cfg: Config, layout: Layout, expert_ffn: str = "ragged_dot",
                    rows: Optional[int] = None) -> dict[str, int]:
  """Rows of one MoE layer's expert buffers on one device (model/moe.py), per microbatch.

  assignments A = n k. capacity mode: the [E, b, C] slots, R = E b C (~capacity_factor x A,
  whatever the expert-parallel size). dropless with expert parallelism: ep destination buffers of
  M = A rows (or ceil(expert_buffer_factor A / ep)), R = ep M; dropless on one device: R = A.
  expert_ffn 'tiled' (the CPU path, dropless only) also pads every local expert's group to a tile:
  padded = R + E_local (tile - 1), rounded up to a tile. `rows`: sequences per device (default
  rows_per_device; a pipeline stage holds pipeline_rows_per_device at a time).
  """
  from mai_jax.model import moe as moe_lib
  m = cfg.model
  b, T = rows_per_device(cfg, layout) if rows is None else rows, cfg.data.seq_len
  A = b * T * m.experts_per_token
  ep = math.prod(layout.size(a) for a in dict(cfg.mesh.rules).get("experts", ()))
  cap = moe_lib.capacity(m, T)
  if cap is not None:
    return {"assignments": A, "rows": m.num_experts * b * cap,
            "padded": m.num_experts * b * cap}
  rows = ep * moe_lib.expert_buffer_rows(m.expert_buffer_factor, A, ep) if ep > 1 else A
  padded = moe_lib.tiled_rows(rows, m.num_experts // ep) if expert_ffn == "tiled" else rows
  return {"assignments": A, "rows": rows, "padded": padded}


def moe_layer_bytes(cfg: Config, layout: Layout, expert_ffn: str = "ragged_dot",
                    rows: Optional[int] = None) -> dict[str, float]:
  """Bytes of one MoE layer's routed experts on one device (the dense part of the block, attention
  and shared experts, is layer_activation_bytes with the shared width), c bytes per element,
  R rows (moe_buffer_rows), F_e = d_ff_expert / t:
    saved (what the layer keeps for its backward without remat):
        R c (D + 3 F_e) + A c D + 8 n E
        (expert input rows, gate, up and silu(gate) * up, the A expert outputs the combine
        weights, float32 router logits and probabilities); the CPU tiled path rematerializes each
        tile and keeps its padded input rows instead of gate/up: (R + padded) c D + A c D + 8 n E.
        With expert parallelism over fsdp-sharded experts, the shard_map's all-gathered expert
        weights are residuals too (remat none only: E_local 3 D F_e c).
    live: on top while the layer runs (calibrated on the CPU compile of mai1_500b:moe at 2
        layers, within 10%): capacity mode R c D (the all-to-all's second copy of the slots);
        dropless 6 R c D (send, received, expert-sorted, output, unsorted output and returned
        buffers are all [R, D]) plus, on the tiled path, 2 padded c D (its padded input and
        output).
    dots: 8 n E (the router's dot has no batch dims; the expert matmuls are batched or ragged,
        which dots_with_no_batch_dims_saveable does not save: the layer is recomputed).
  """
  from mai_jax.model.moe import expert_d_ff
  m, c, t = cfg.model, DTYPE_BYTES[cfg.model.compute_dtype], layout.size("tensor")
  D, Fe, E = m.d_model, expert_d_ff(m) / t, m.num_experts
  n = (rows_per_device(cfg, layout) if rows is None else rows) * cfg.data.seq_len
  rows = moe_buffer_rows(cfg, layout, expert_ffn, rows)
  R, A = rows["rows"], rows["assignments"]
  router = 8 * n * E
  if m.capacity_factor is not None:
    saved, live = R * c * (D + 3 * Fe) + A * c * D + router, R * c * D
  elif expert_ffn == "tiled":
    saved = (R + rows["padded"]) * c * D + A * c * D + router
    live = 6 * R * c * D + 2 * rows["padded"] * c * D
  else:
    saved, live = R * c * (D + 3 * Fe) + A * c * D + router, 6 * R * c * D
  rules = dict(cfg.mesh.rules)
  ep = math.prod(layout.size(a) for a in rules.get("experts", ()))
  fsdp_experts = math.prod(layout.size(a) for a in rules.get("embed", ())) > 1
  gathered = E // ep * 3 * D * Fe * c if ep > 1 and fsdp_experts else 0.0
  return {"saved": saved, "live": live, "dots": router, "gathered_weights": gathered}


def activation_bytes(cfg: Config, layout: Layout, attention: str,
                     expert_ffn: str = "ragged_dot") -> float:
  """Activations alive at the peak (start of the backward pass) on one device.

  MoE models: the dense blocks and the MoE blocks (attention + shared experts, plus
  moe_layer_bytes for the routed experts) are counted separately; with full remat the peak is the
  larger of one recomputed dense block and one recomputed MoE block."""
  m = cfg.model
  L = m.num_layers
  if layout.stages > 1:
    return pipeline_activation_bytes(cfg, layout, attention)
  per = layer_activation_bytes(cfg, layout, attention, None if not is_moe(m) else m.d_ff)
  if not is_moe(m):
    saved, live = plan_remat.block_bytes(per, layout.remat)
    return L * saved + live + logits_bytes(cfg, layout)
  from mai_jax.model.moe import expert_d_ff, num_moe_layers
  L_moe = num_moe_layers(m)
  sparse = layer_activation_bytes(cfg, layout, attention, m.num_shared_experts * expert_d_ff(m))
  moe = moe_layer_bytes(cfg, layout, expert_ffn)
  moe_block = sparse["none"] + moe["saved"]
  if layout.remat == "none":
    blocks = ((L - L_moe) * per["none"] + L_moe * (moe_block + moe["gathered_weights"])
              + moe["live"])
  elif layout.remat == "full":
    blocks = L * per["carry"] + max(per["none"], moe_block + moe["live"])
  else:  # a policy that keeps projections: the routed experts are recomputed, one layer at once
    dense_saved, dense_live = plan_remat.block_bytes(per, layout.remat)
    sparse_saved, sparse_live = plan_remat.block_bytes(sparse, layout.remat)
    router = moe["dots"] if plan_remat.saves_router(layout.remat) else 0.0
    blocks = ((L - L_moe) * dense_saved + L_moe * (sparse_saved + router)
              + max(dense_live, sparse_live + moe["saved"] + moe["live"]))
  return blocks + logits_bytes(cfg, layout)


def pipeline_activation_bytes(cfg: Config, layout: Layout, attention: str) -> float:
  """Activations at the peak on one device of a pipeline stage.

  With b = pipeline_rows_per_device, Lc = layers per virtual stage, F the in-flight stage inputs
  (plan_pipeline.in_flight_microbatches: every iteration's, R M + S - 1, in this codebase's scan;
  ~S with 1F1B) and `per` the per-layer formulas at b rows:
    iterations checkpointed as a whole (this codebase), remat full/dots: F carry (the saved stage
        inputs) + the backward of one iteration, which recomputes its stage under the model's
        policy: Lc x saved + live;
    otherwise (and with remat none): F Lc x saved + live;
    with saved / live plan_remat.block_bytes' (none: all / 0; full: carry / one layer's none;
    a policy keeping projections: carry + the kept ones / core + the rest); without 1F1B add the inbox, M carry (the microbatches waiting for their
    next repeat; it ends as the stack's output).
  MoE models: a pipelined unit is an MoE block (or a group of moe_layer_interval blocks), its
  saved / live bytes _moe_unit_activations's; the first_dense_layers, run before the schedule on
  all the rows, keep their policy's saved bytes until their backward, after the pipeline's.
  plus the head: the embedded input [rows, T, D] and the float32 logits and final hidden state of
  the rows the stage scores: 1 / S of them with the head split over stages (this codebase), all
  with it replicated; with the head on the last stage, one pipeline microbatch's logits.
  """
  m, S, R, M = cfg.model, layout.stages, layout.repeats, layout.pipeline_microbatches
  b = pipeline_rows_per_device(cfg, layout)
  per = layer_activation_bytes(cfg, layout, attention, None if not is_moe(m) else m.d_ff, rows=b)
  saved, live = plan_remat.block_bytes(per, layout.remat)
  pre, piped = stage_layers(m, layout)
  if is_moe(m):  # a pipelined unit: moe_layer_interval - 1 dense blocks and one MoE block
    saved, live = _moe_unit_activations(cfg, layout, attention, b, per, saved)
  Lc = piped // (m.moe_layer_interval if is_moe(m) else 1) // R
  in_flight = pp.in_flight_microbatches(S, R, M, layout.impl)
  if layout.impl.stage_checkpointed and layout.remat != "none":
    blocks = in_flight * per["carry"] + Lc * saved + live
  else:
    blocks = in_flight * Lc * saved + live
  if not layout.impl.one_f_one_b:
    blocks += M * per["carry"]  # the inbox
  if pre:  # MoE: the first dense layers ran before the schedule on all the rows; theirs wait
    dense = layer_activation_bytes(cfg, layout, attention, m.d_ff)
    blocks += pre * plan_remat.block_bytes(dense, layout.remat)[0]
  if layout.impl.head == "last_stage":
    return blocks + logits_bytes(cfg, layout, rows=b)
  rows = rows_per_device(cfg, layout)
  head_rows = rows / S if layout.impl.head == "split" else rows
  # the embedded input (on every stage) and the stack's output where the head reads it
  hidden = ((rows + head_rows) * cfg.data.seq_len * m.d_model * DTYPE_BYTES[m.compute_dtype]
            / residual_split(layout))
  return blocks + logits_bytes(cfg, layout, rows=head_rows) + hidden


def _moe_unit_activations(cfg: Config, layout: Layout, attention: str, b: int, dense: dict,
                          dense_saved: float) -> tuple[float, float]:
  """(saved, live) under layout.remat of one pipelined MoE unit at b rows (moe_layer_interval - 1
  dense blocks, `dense` at b rows keeping `dense_saved` each, then an MoE block: attention and the
  shared experts plus moe_layer_bytes), as activation_bytes counts an MoE block without stages."""
  from mai_jax.model.moe import expert_d_ff
  m, remat = cfg.model, layout.remat
  sparse = layer_activation_bytes(cfg, layout, attention, m.num_shared_experts * expert_d_ff(m),
                                  rows=b)
  moe = moe_layer_bytes(cfg, layout, rows=b)
  k = m.moe_layer_interval - 1
  if remat == "none":
    return (k * dense_saved + sparse["none"] + moe["saved"] + moe["gathered_weights"],
            moe["live"])
  if remat == "full":
    return (k * dense_saved + sparse["carry"],
            max(dense["none"], sparse["none"] + moe["saved"] + moe["live"]))
  # a policy that keeps projections: the routed experts are recomputed
  sparse_saved, sparse_live = plan_remat.block_bytes(sparse, remat)
  router = moe["dots"] if plan_remat.saves_router(remat) else 0.0
  return k * dense_saved + sparse_saved + router, sparse_live + moe["saved"] + moe["live"]


def logits_bytes(cfg: Config, layout: Layout, rows: Optional[int] = None) -> float:
  """float32 logits and their gradient, vocabulary sharded over 'tensor'."""
  n = (rows_per_device(cfg, layout) if rows is None else rows) * cfg.data.seq_len
  return 2 * n * cfg.model.vocab_size / layout.size("tensor") * 4


def fsdp_gather_scope(cfg: Config, layout: Layout) -> str:
  """How often a pipelined step all-gathers its fsdp-sharded weights.

  'layer' without stages (each block gathered as it runs). This codebase's schedule gathers either
  the whole stage once per step (model.pipeline_gather_once: the stage's weights then stay whole
  along fsdp, with their unreduced gradient) or each virtual stage in every iteration that uses it
  ('iteration': M times per repeat). 'repeat' (once per repeat, the repeat's layers kept) is the
  idealized schedule the calibration rows' implementation stands for."""
  if layout.stages == 1:
    return "layer"
  if not layout.impl.this_codebase:
    return "repeat"
  return "step" if cfg.model.pipeline_gather_once else "iteration"


def _gathered_layers(cfg: Config, layout: Layout) -> int:
  """Blocks whose gathered weights are alive at once: 3 (in use, prefetched, one unreduced
  gradient); a stage gathered once per step holds all its Ld layers and their unreduced gradient;
  one gathered per repeat or iteration its Lc layers, plus the prefetched and the gradient ones."""
  if layout.stages == 1 or layout.size("fsdp") == 1:
    return 3
  m = cfg.model
  Ld = stage_layers(m, layout)[1] // (m.moe_layer_interval if is_moe(m) else 1)  # stacked units
  if fsdp_gather_scope(cfg, layout) == "step":
    return 2 * Ld
  return Ld // layout.repeats + 2


def _regrouped_weights(layout: Layout, shards: ParamShards, p: int) -> float:
  """With R > 1 repeats, this codebase's compiled step holds ~(R - 1) extra copies of the
  device's stacked weights (param dtype): measured, not derived. MAI-1 dense at 30 layers on 8
  CPU devices compiles to a peak ~14 stacked-weight copies above the plan without this term
  (R = 15), at d_model 256 ~15 (R = 15) and ~1.6 (R = 3). pipeline._regroup_for_repeats (the
  [L] -> [R, S, Lc] all_to_all and its one-hot selects) is the suspect; docs/planner.md."""
  if layout.stages == 1 or layout.repeats == 1 or not layout.impl.this_codebase:
    return 0.0
  return (layout.repeats - 1) * shards.stacked * p


def memory_per_device(cfg: Config, layout: Layout, attention: str = "flash",
                      workspace: int = WORKSPACE_BYTES,
                      expert_ffn: str = "ragged_dot") -> dict[str, int]:
  """Bytes per device by kind; 'total' is their sum.

  params, grads, optimizer: exact shard sizes x dtype. The step keeps gradients in the parameter
  dtype (plus float32 accumulators when microbatches > 1); optax.adamw keeps both moments in the
  parameter dtype (mu_dtype=None). master_params is 0: this codebase has no separate master copy,
  a float32 param_dtype *is* the master and bfloat16 params are updated in place. With mesh.zero1
  only the moments are split further over 'data' (ParamShards.zero1_moment); the parameters
  (float32 masters included) and their gradients stay replicated over 'data', as
  train/state.state_shardings lays them out.
  temporaries: two blocks' gathered weights in the compute dtype (the one in use and the one being
  prefetched) plus one block's unreduced weight gradient, and `workspace`; the largest block
  (an MoE block's local experts) sets the size.
  activations: activation_bytes; `expert_ffn` is the grouped-matmul path the MoE layers take
  ('ragged_dot' on GPU, 'tiled' on CPU: model/moe.py).
  batch: this device's rows of the step's int32 batch arrays.
  """
  shards = param_shards(cfg, layout)
  p = DTYPE_BYTES[cfg.model.param_dtype]
  c = DTYPE_BYTES[cfg.model.compute_dtype]
  # microbatches > 1: a float32 accumulator, then the averaged gradient in the parameter dtype
  grad_bytes = 4 + p if layout.microbatches > 1 else p
  out = {
      "params": shards.per_device * p,
      "grads": shards.per_device * grad_bytes,
      "optimizer": 2 * (shards.zero1_moment if layout.zero1 else shards.per_device) * p,
      "master_params": 0,
      "activations": int(activation_bytes(cfg, layout, attention, expert_ffn)),
      "temporaries": int(_gathered_layers(cfg, layout) * shards.per_layer_gathered * c
                         + _regrouped_weights(layout, shards, p) + workspace),
      # inputs, targets, segment_ids, positions: int32 [rows, T] per microbatch
      "batch": 4 * 4 * rows_per_device(cfg, layout) * layout.microbatches * cfg.data.seq_len,
  }
  out["total"] = sum(out.values())
  return out


# ----------------------------------------------------------------------------------------------
# Communication and time


def axis_link(layout: Layout, axis: str, gpu: hardware.GpuSpec) -> str:
  """'nvlink' if the axis and every axis inside it fit in one node, else 'internode'.

  The hybrid mesh fills a node from the innermost axis outwards (tensor, expert, fsdp, data), so
  an axis whose inner product exceeds a node has at least one inter-node hop in its ring.
  """
  inner = 1
  for a in AXES_INNER_FIRST:
    inner *= layout.size(a)
    if a == axis:
      return "nvlink" if inner <= gpu.gpus_per_node else "internode"
  raise KeyError(axis)


def communication(cfg: Config, layout: Layout, gpu: hardware.GpuSpec) -> dict[str, dict]:
  """Bytes each device sends per step on each mesh axis, the link it uses and the time it takes.

  ring all-gather / reduce-scatter of S bytes over n ranks: S (n-1)/n per device;
  all-reduce: 2 S (n-1)/n. Per accumulation microbatch (the step accumulates inside a scan, so
  every collective runs once per microbatch); Ld = the layers one device computes
  (plan_pipeline.layers_per_device: L without stages):
    fsdp:   each block's weights all-gathered for the forward and again for the backward, its
            gradient reduce-scattered, in WIRE_DTYPE; overlapped. With stages, once per step or
            per repeat (each layer belongs to one repeat), or once per pipeline microbatch when
            each iteration gathers its virtual stage (fsdp_gather_scope).
    data:   all-reduce of the gradient shards, in WIRE_DTYPE; overlapped with the backward.
            With mesh.zero1 the moments are split over 'data' and the parameters are not:
            ZERO1_GRAD_COLLECTIVE of the gradient (overlapped), and after the update an
            all-gather of the updated parameters in the parameter dtype ('data_gather': the
            step's last collective, nothing left to overlap it with, exposed); a leaf whose
            moments no dim lets split stays all-reduced and is updated on every replica.
    tensor: Megatron all-reduces of the residual stream [n, D]: 2 per block forward, 2 backward,
            2 more per whole-block recompute (the pipeline's stage checkpoint,
            recompute_forwards) and 1 where the policy recomputes o_proj (full, qkv_proj:
            plan_remat.recomputed_all_reduces; mlp_down is never recomputed), plus 2 for the vocab-sharded embedding/unembedding;
            on the critical path (not overlapped). With sequence parallelism each all-reduce
            becomes a reduce-scatter (sub-layer output) and an all-gather (next sub-layer's
            input), which together move the same bytes, so the bytes are unchanged (the calls,
            i.e. the latency term, are still counted as one per all-reduce).
    expert: MoE all-to-all (moe_communication), on the critical path, its bytes and time split
            into inter- and intra-node parts, flat or hierarchical (moe_all_to_all,
            plan_moe.all_to_all); its entry also carries plan_moe.routing (nodes the expert axis
            spans, expected nodes per token, which the hierarchical bytes follow).
    stage:  the stage-to-stage sends (plan_pipeline.p2p_bytes) and the move of the stack's
            output to the head (plan_pipeline.head_broadcast_bytes); exposed unless the implementation
            overlaps its sends (plan_pipeline.PipelineImpl; split over tensor with sequence
            parallelism, p2p_impl).
  """
  m, c = cfg.model, DTYPE_BYTES[cfg.model.compute_dtype]
  w = DTYPE_BYTES[cfg.model.compute_dtype if WIRE_DTYPE == "compute" else cfg.model.param_dtype]
  M, S, R, Mp = layout.microbatches, layout.stages, layout.repeats, layout.pipeline_microbatches
  pre, piped = stage_layers(m, layout)  # MoE with stages: first dense layers outside the pipeline
  Ld = pre + piped
  shards = param_shards(cfg, layout)
  rows = rows_per_device(cfg, layout)
  n_tokens = rows * cfg.data.seq_len
  f, d, t = layout.size("fsdp"), layout.size("data"), layout.size("tensor")
  rerun = plan_remat.recomputed_all_reduces(layout.remat) if layout.remat != "none" else 0
  per_layer = 4 + 2 * recompute_forwards(layout)[0] + rerun
  # the unpipelined layers: their own remat policy only, once per microbatch (not per pipeline one)
  pre_layer = (4 + rerun) * pre
  # A virtual stage gathered in every iteration that runs it is gathered once per microbatch.
  G = Mp if fsdp_gather_scope(cfg, layout) == "iteration" else 1
  stage_bytes, stage_calls = 0.0, 0
  if S > 1:
    b = pipeline_rows_per_device(cfg, layout)
    stage_bytes = M * (pp.p2p_bytes(b, cfg.data.seq_len, m.d_model, c, t, S, R, Mp,
                                    p2p_impl(layout))
                       + pp.head_broadcast_bytes(rows, cfg.data.seq_len, m.d_model, c, S,
                                                 layout.impl))
    stage_calls = M * (pp.p2p_sends(S, R, Mp, layout.impl) + 1)
  grad_elems, gather_elems = 2 * shards.per_device * (d - 1) / d, 0.0
  if layout.zero1 and d > 1:
    # each replica receives the (d-1)/d of the split leaves it did not update (the leaves whose
    # moments no dim lets split keep a replicated, all-reduced update): per_device - zero1_moment
    gather_elems = float(shards.per_device - shards.zero1_moment)
    if ZERO1_GRAD_COLLECTIVE == "reduce_scatter":
      grad_elems -= gather_elems
  plan = {
      "fsdp": (3 * M * G * shards.fsdp_gathered * w * (f - 1) / f, 3 * M * G * Ld, True),
      "data": (M * grad_elems * w, M * Ld, True),
      "data_gather": (gather_elems * DTYPE_BYTES[m.param_dtype], Ld, False),
      "tensor": ((per_layer * piped + pre_layer + 2) * M * 2 * n_tokens * m.d_model * c
                 * (t - 1) / t, (per_layer * piped * Mp + pre_layer + 2) * M, False),
      "expert": (0.0, 0, False),
      "stage": (stage_bytes, stage_calls, layout.impl.p2p_overlapped),
  }
  if is_moe(m):
    plan["expert"] = moe_communication(cfg, layout)
  out = {}
  for key, (nbytes, calls, overlapped) in plan.items():
    axis = key.split("_")[0]
    size = layout.size(axis)
    link = axis_link(layout, axis, gpu)
    bandwidth = gpu.nvlink_bandwidth if link == "nvlink" else gpu.internode_bandwidth
    seconds = 0.0
    if size > 1 and nbytes:
      hops = 1 if axis == "stage" else math.ceil(math.log2(size))  # point-to-point sends
      seconds = (nbytes / (bandwidth * COLLECTIVE_EFFICIENCY)
                 + calls * COLLECTIVE_LATENCY_S[link] * hops)
    out[key] = {"size": size, "bytes": int(nbytes), "link": link, "time_s": seconds,
                 "overlapped": overlapped}
  if is_moe(m):
    out["expert"].update(moe_all_to_all(cfg, layout, gpu))
  return out


def expert_devices_per_node(layout: Layout, gpu: hardware.GpuSpec) -> int:
  """Expert devices sharing a node: model.expert_devices_per_node when set (the code's view of
  the axis), else the node the hybrid mesh fills (gpus_per_node / tensor positions of 'expert',
  all of it when expert x tensor fits in a node)."""
  if layout.expert_devices_per_node > 1:
    return layout.expert_devices_per_node
  e = layout.size("expert")
  return min(e, max(1, gpu.gpus_per_node // layout.size("tensor")))


def moe_all_to_all(cfg: Config, layout: Layout, gpu: hardware.GpuSpec) -> dict:
  """The 'expert' entry's bytes and time split into inter- and intra-node parts
  (plan_moe.all_to_all: flat, or hierarchical with model.expert_devices_per_node), plus the
  routing terms (plan_moe.routing: nodes per token, which the hierarchical bytes use)."""
  m, e = cfg.model, layout.size("expert")
  n = expert_devices_per_node(layout, gpu)
  if e % n:
    raise ConfigError(f"model.expert_devices_per_node={n} must divide mesh.expert={e}")
  routing = plan_moe.routing(cfg, layout, gpu, per_node=n)
  entry = dict(routing)
  if e == 1:
    return entry
  buffers = moe_buffer_rows(cfg, layout)
  nbytes, calls, _ = moe_communication(cfg, layout)
  row_bytes = nbytes / (buffers["rows"] * (e - 1) / e)  # one buffer row over the whole step
  # the intra-node phase crosses nodes only when a "node" of n x tensor GPUs does not fit in one
  intra = "nvlink" if n * layout.size("tensor") <= gpu.gpus_per_node else "internode"
  inter = axis_link(layout, "expert", gpu)
  bandwidth = {"nvlink": gpu.nvlink_bandwidth * COLLECTIVE_EFFICIENCY,
               "internode": gpu.internode_bandwidth * COLLECTIVE_EFFICIENCY}
  split = plan_moe.all_to_all(row_bytes, buffers["rows"], buffers["assignments"],
                              buffers["assignments"] / m.experts_per_token, calls, e, n,
                              layout.expert_devices_per_node > 1, routing["nodes_per_token"],
                              (inter, intra), bandwidth, COLLECTIVE_LATENCY_S)
  entry.update(split)
  entry["bytes"] = int(split["internode_bytes"] + split["intranode_bytes"])
  return entry


def moe_communication(cfg: Config, layout: Layout) -> tuple[float, int, bool]:
  """Expert-parallel all-to-all (bytes, calls, overlapped) per step on one device.

  Per MoE layer and microbatch: dispatch + combine in the forward, the same two in the backward,
  two more for the full-remat recompute; each moves this device's whole send buffer, R rows
  (moe_buffer_rows: ~capacity_factor x n x experts_per_token in capacity mode, ep x that without
  expert_buffer_factor when dropless: padding travels too) x D in the compute dtype, of which
  (e-1)/e leave the device. On the critical path (the experts wait for their tokens).
  model.moe_dispatch_dtype='float8_e4m3fn': the forward dispatches (the recompute's too) move
  moe_dispatch_row_bytes per row instead (D fp8 codes + their float32 scales); the combines and
  both backward all-to-alls stay in the compute dtype (model/fp8_dispatch.py).
  Node-limited routing (model.router_groups) changes none of this: the buffers are fixed-size and
  every device sends one to every device; it only bounds the nodes a token's rows reach, which
  the hierarchical all-to-all's inter-node share follows (moe_all_to_all). With stages the
  device's MoE layers are its stage's (moe_layers_per_device), each called once per pipeline
  microbatch.
  """
  m, e = cfg.model, layout.size("expert")
  c = DTYPE_BYTES[m.compute_dtype]
  rows = moe_buffer_rows(cfg, layout)["rows"]
  # with stages: the stage checkpoint's recompute; the block's policy reruns the routed experts
  forwards = 1 + recompute_forwards(layout)[0] + moe_routed_recompute(layout)
  per_layer = (forwards * rows * moe_dispatch_row_bytes(m)  # dispatches
               + (forwards + 2) * rows * m.d_model * c)  # combines, the two backward all-to-alls
  units = moe_layers_per_device(m, layout) * layout.microbatches
  calls = 2 * (forwards + 1) * units * layout.pipeline_microbatches
  return units * per_layer * (e - 1) / e, calls, False


def moe_dispatch_row_bytes(model: ModelConfig) -> int:
  """Bytes of one token row in the forward dispatch: D in the compute dtype, or the fp8 wire row
  (model/fp8_dispatch.wire_row_bytes: D + 4 per float32 scale, a scale per 1x128 block)."""
  if model.moe_dispatch_dtype == "float8_e4m3fn":
    from mai_jax.model.fp8_dispatch import wire_row_bytes
    return wire_row_bytes(model.d_model)
  return model.d_model * DTYPE_BYTES[model.compute_dtype]


@dataclasses.dataclass(frozen=True)
class Plan:
  """The planner's answer for one config x GPU x layout (as_dict() is the stable --json form)."""
  gpu: str
  num_gpus: int
  layout: Layout
  params_total: int
  params_active: int
  flops_per_token: float
  memory: dict[str, int]
  usable_hbm_bytes: int
  communication: dict[str, dict]
  compute_time_s: float
  step_time_s: float
  step_time_no_overlap_s: float
  tokens_per_step: int
  mfu: float
  token_budget: int
  compute_times: dict = dataclasses.field(default_factory=dict)

  @property
  def fits(self) -> bool:
    return self.memory["total"] <= self.usable_hbm_bytes

  @property
  def bubble_fraction(self) -> float:
    S = self.layout.stages
    return bubble_fraction(S, self.layout.repeats, self.layout.pipeline_microbatches) if S > 1 \
        else 0.0

  @property
  def tokens_per_day(self) -> float:
    return self.tokens_per_step / self.step_time_s * 86400

  @property
  def days_to_train(self) -> float:
    return self.token_budget / self.tokens_per_day

  def as_dict(self) -> dict:
    return {
        "gpu": self.gpu, "num_gpus": self.num_gpus, "mesh": dict(self.layout.mesh),
        "remat": self.layout.remat, "microbatches": self.layout.microbatches,
        "zero1": self.layout.zero1, "sequence_parallel": self.layout.sequence_parallel,
        "params_total": self.params_total, "params_active": self.params_active,
        "flops_per_token": self.flops_per_token,
        "memory_per_device_bytes": dict(self.memory),
        "usable_hbm_bytes": self.usable_hbm_bytes, "fits": self.fits,
        "communication": self.communication, "compute_time_s": self.compute_time_s,
        "step_time_s": self.step_time_s, "step_time_no_overlap_s": self.step_time_no_overlap_s,
        "tokens_per_step": self.tokens_per_step, "mfu": self.mfu,
        "tokens_per_day": self.tokens_per_day, "token_budget": self.token_budget,
        "days_to_train": self.days_to_train,
        "repeats": self.layout.repeats,
        "pipeline_microbatches": self.layout.pipeline_microbatches,
        "bubble_fraction": self.bubble_fraction,
        "compute_times_s": dict(self.compute_times),
    }


def gpu_spec(name: str) -> hardware.GpuSpec:
  if name not in hardware.GPUS:
    raise ConfigError(f"unknown GPU {name!r}{config_lib._did_you_mean(name, hardware.GPUS)}; "
                      f"known: {', '.join(hardware.GPUS)}")
  return hardware.GPUS[name]


def plan(cfg: Config, gpu: str, num_gpus: int, layout: Optional[Layout] = None,
         attention: str = "flash") -> Plan:
  """Plans `cfg` on `num_gpus` GPUs of type `gpu` with `layout` (default: the config's own).

  step = max(compute, overlapped communication) + exposed communication, where compute is
  compute_times' total and the exposed tensor all-reduces, which run inside the pipeline's
  iterations, are stretched by the bubble as the blocks are. With model.moe_overlap_halves the
  expert all-to-all's exposed part is plan_moe.overlap's (the share of the GEMM time that is expert
  and shared-expert matmuls, plan_moe.expert_gemm_share, hides up to half of it)."""
  spec = gpu_spec(gpu)
  layout = layout or layout_of(cfg, num_gpus)
  total, active = param_counts(cfg.model)
  model_flops = flops_per_token(cfg)
  tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
  memory = memory_per_device(cfg, layout, attention)
  times = compute_times(cfg, layout, spec)
  compute_s = times["total"]
  comm = communication(cfg, layout, spec)
  hidden = 0.0  # expert all-to-all time under the other half's experts (moe_overlap_halves)
  m = cfg.model
  if is_moe(m) and m.moe_overlap_halves:
    share = plan_moe.expert_gemm_share(m, metrics.matmul_params(m, active)
                                       - m.vocab_size * m.d_model)  # the blocks' (no unembedding)
    comm["expert"].update(plan_moe.overlap(comm["expert"]["time_s"], share * times["gemm"]))
    hidden = comm["expert"]["all_to_all_s"] - comm["expert"]["time_s"]
  stretch = times["pipeline_stretch"]
  overlapped = sum(v["time_s"] for v in comm.values() if v["overlapped"])
  # the tensor all-reduces and expert all-to-alls run inside the pipeline's iterations, the bubble's
  # too (every stage computes every iteration of the scan)
  exposed = sum(v["time_s"] * (stretch if a in ("tensor", "expert") else 1.0)
                for a, v in comm.items() if not v["overlapped"])
  step_s = max(compute_s, overlapped) + exposed
  mfu = tokens_per_step * model_flops / (step_s * num_gpus * spec.peak_bf16_flops)
  return Plan(gpu=gpu, num_gpus=num_gpus, layout=layout, params_total=total, params_active=active,
              flops_per_token=model_flops, memory=memory,
              usable_hbm_bytes=int(spec.hbm_bytes * USABLE_HBM_FRACTION), communication=comm,
              compute_time_s=compute_s, step_time_s=step_s,
              step_time_no_overlap_s=compute_s + overlapped + exposed + hidden,
              tokens_per_step=tokens_per_step, mfu=mfu, token_budget=config_lib.token_budget(cfg),
              compute_times=times)


def compute_times(cfg: Config, layout: Layout, gpu: hardware.GpuSpec) -> dict[str, float]:
  """Seconds one device computes per step, by kind (docs/planner.md "Time").

  With tokens = rows_per_device x microbatches x T (what one tensor group of one stage works
  on), Ld / L the share of the layers it holds and t the tensor size:
    gemm:        tokens (Ld / L) (6 N_blocks + remat recompute 2 N_blocks) / t
                 / (peak GEMM_EFFICIENCY m / (m + GEMM_HALF_DIM)), m the smallest GEMM dimension
                 (pipeline microbatch tokens, D, H K / t, F / t);
    attention:   tokens (Ld / L) (6 + 2 with remat) L T H K / t / (peak ATTENTION_EFFICIENCY);
    elementwise: tokens Ld c (10 D / s + 2 (H + KV) K / t + 3 F / t) x (3 passes: forward and
                 backward; 4 with remat) / (HBM bandwidth HBM_EFFICIENCY), s = residual_split
                 (the norms and residual adds run on 1/t of the tokens with sequence parallelism);
    head:        the unembedding GEMM (6 V D / t per token) and the float32 cross-entropy
                 (4 passes over V / t logits), on every stage when the head is replicated over
                 stages, once (1 / S of it per device) when it sits on the last stage;
    optimizer:   AdamW reads p, g, mu, nu and writes p, mu, nu: 7 p bytes per local parameter;
                 with mesh.zero1 on the moments' 1/data slice, plus reading the gathered update
                 and p and writing p on the whole replicated shard (3 p bytes per parameter).
  The block terms are stretched by the bubble, 1 / (1 - (S-1)/(R M + S - 1)).
  """
  m, S, R = cfg.model, layout.stages, layout.repeats
  t, c, T = layout.size("tensor"), DTYPE_BYTES[m.compute_dtype], cfg.data.seq_len
  peak = gpu.peak_bf16_flops
  rows = rows_per_device(cfg, layout)
  tokens = rows * layout.microbatches * T
  pre, Ld = stage_layers(m, layout)  # MoE with stages: the first dense layers run unpipelined
  share = Ld / (m.num_layers - pre)
  _, active = param_counts(m)
  head_params = m.vocab_size * m.d_model
  pre_params = pre * _dense_block_matmul_params(m)
  block_params = metrics.matmul_params(m, active) - head_params - pre_params
  gemm_forwards, attention_forwards = recompute_forwards(layout)
  pre_gemm, pre_attention = recompute_forwards(layout, pipelined=False)
  this = layout.impl.this_codebase
  gemm_flops = ((6 + 2 * gemm_forwards) * block_params
                + 2 * _recomputed_layer_params(m, layout.remat, range(pre, m.num_layers), this))
  pre_recomputed = _recomputed_layer_params(m, layout.remat, range(pre), this)
  attention_flops = ((6 + 2 * attention_forwards) * (m.num_layers - pre)
                     * T * m.num_heads * m.head_dim)
  F = ffn_width(m)
  ffn_gemm = F if not is_moe(m) else _expert_width(m)
  micro_tokens = (pipeline_rows_per_device(cfg, layout) if S > 1 else rows) * T
  smallest = min(micro_tokens, m.d_model, m.num_heads * m.head_dim / t, ffn_gemm / t)
  gemm_rate = peak * GEMM_EFFICIENCY * smallest / (smallest + GEMM_HALF_DIM)
  hbm = gpu.hbm_bandwidth * HBM_EFFICIENCY
  passes = 3 + (1 if layout.remat != "none" else 0)
  elementwise_per_layer = c * (10 * m.d_model / residual_split(layout)
                               + 2 * (m.num_heads + m.num_kv_heads) * m.head_dim / t
                               + 3 * F / t)
  out = {
      "gemm": tokens * share * gemm_flops / t / gemm_rate,
      "attention": tokens * share * attention_flops / t / (peak * ATTENTION_EFFICIENCY),
      "elementwise": tokens * Ld * elementwise_per_layer * passes / hbm,
  }
  pipelined = out["gemm"] + out["attention"] + out["elementwise"]
  if pre:  # on every stage, all its rows, not stretched by the bubble
    out["gemm"] += tokens * ((6 + 2 * pre_gemm) * pre_params + 2 * pre_recomputed) / t / gemm_rate
    out["attention"] += (tokens * (6 + 2 * pre_attention) * pre * T * m.num_heads * m.head_dim
                         / t / (peak * ATTENTION_EFFICIENCY))
    out["elementwise"] += tokens * pre * elementwise_per_layer * passes / hbm
  head_share = 1.0 if layout.impl.head == "replicated" else 1.0 / S
  out["head"] = head_share * tokens * (6 * head_params / t / gemm_rate
                                       + 4 * 4 * m.vocab_size / t / hbm)
  shards = param_shards(cfg, layout)
  updated = (7 * shards.zero1_moment + 3 * shards.per_device if layout.zero1
             else 7 * shards.per_device)
  out["optimizer"] = updated * DTYPE_BYTES[m.param_dtype] / hbm
  stretch = pp.stretch(S, R, layout.pipeline_microbatches) if S > 1 else 1.0
  out["bubble"] = (stretch - 1.0) * pipelined
  out["total"] = sum(out.values())
  out["pipeline_stretch"] = stretch
  return out


def recompute_forwards(layout: Layout, pipelined: bool = True) -> tuple[int, int]:
  """(whole-block forwards the pipeline's stage checkpoint reruns, attention-core forwards) that
  remat costs; the projections each block's own policy reruns are _recomputed_layer_params'.

  Without stages: (0, 1) for every policy but none (0, 0): no policy saves the attention core.
  A pipeline whose iterations are checkpointed as a whole (PipelineImpl.stage_checkpointed, this
  codebase) reruns its stage's forward once more (nested remat: the outer recompute runs every
  block's whole forward, mlp_down included, then each block's policy recomputes inside it): (1, 2).
  pipelined=False: layers outside the schedule (an MoE model's first dense layers under
  stages), which only their own policy recomputes.
  """
  if layout.remat == "none":
    return 0, 0
  if pipelined and layout.stages > 1 and layout.impl.stage_checkpointed:
    return 1, 2
  return 0, 1


def stage_layers(model: ModelConfig, layout: Layout) -> tuple[int, int]:
  """(layers every device runs outside the pipeline, layers of the pipelined stack one device
  runs). Dense models: (0, plan_pipeline.layers_per_device). MoE models with stages
  (model/transformer.py): the first_dense_layers run before the schedule as a plain scan, on
  every stage over all its rows (other implementations, the calibration's, pipeline them too); the stack of MoE blocks (or groups of moe_layer_interval
  blocks) is pipelined, each device running R ceil(units / (S R)) of its units. Without stages
  (0, L)."""
  S, R, L = layout.stages, layout.repeats, model.num_layers
  if S == 1:
    return 0, L
  if not is_moe(model) or not layout.impl.this_codebase:  # Megatron / DualPipe pipeline them all
    return 0, pp.layers_per_device(L, S, R)
  units = (L - model.first_dense_layers) // model.moe_layer_interval
  return model.first_dense_layers, pp.layers_per_device(units, S, R) * model.moe_layer_interval


def moe_routed_recompute(layout: Layout) -> int:
  """Extra forwards of the routed experts (dispatch, expert GEMMs, combine) that a block's own
  remat policy costs: every policy but 'none' (model/remat.py saves tagged projections and the
  router logits, never the routed experts' batched or ragged matmuls), so each MoE layer's routed
  part runs again in its backward (moe_layer_bytes counts its memory so). Megatron's and
  DeepSeek's selective recompute (the calibration rows) keeps them unless remat is 'full'."""
  if layout.remat == "none":
    return 0
  return 1 if layout.impl.this_codebase or layout.remat == "full" else 0


def moe_layers_per_device(model: ModelConfig, layout: Layout) -> int:
  """MoE layers one device runs: all of them without stages, its stage's units with them (one MoE
  block per unit)."""
  from mai_jax.model.moe import num_moe_layers
  if layout.stages == 1:
    return num_moe_layers(model)
  return stage_layers(model, layout)[1] // model.moe_layer_interval


def _dense_block_matmul_params(model: ModelConfig) -> int:
  """Matmul parameters of one dense block (attention and the SwiGLU of d_ff): the projections a
  backward needs (plan_remat.projection_params) and mlp_down."""
  D, H, KV, K = model.d_model, model.num_heads, model.num_kv_heads, model.head_dim
  return sum(plan_remat.projection_params(D, H, KV, K, model.d_ff).values()) + D * model.d_ff


def _expert_width(model: ModelConfig) -> float:
  from mai_jax.model.moe import expert_d_ff
  return float(expert_d_ff(model))
