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
from mai_jax.config import Config, ConfigError, ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
# Fraction of the dense bf16 peak that the model's large matmuls reach end to end (an assumption:
# cuBLAS bf16 GEMMs of these sizes run at ~70-80% of peak on H100; elementwise work, norms and
# kernel gaps take the rest). Calibrate with benchmarks/ on a real GPU.
MATMUL_EFFICIENCY = 0.7
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
REMATS = ("none", "dots", "full")
# Dtype of the weights and gradients that fsdp/data collectives move: 'compute' or 'param'. The
# model casts each weight to the compute dtype right before its matmul, and SPMD sharding
# propagation keeps an elementwise cast sharded like its input, so the all-gather lands after the
# cast (bf16). Unverified on GPU: XLA:CPU runs every bf16 op in f32, so its HLO gathers f32 either
# way. With 'param' (float32 on the wire) MAI-1 dense drops from ~31% to ~16% MFU.
WIRE_DTYPE = "compute"
# Mesh axes from the innermost (fastest links) outwards: the order a hybrid mesh fills a node.
AXES_INNER_FIRST = ("tensor", "expert", "fsdp", "stage", "data")


@dataclasses.dataclass(frozen=True)
class Layout:
  """One way to run a config: mesh sizes (all resolved), remat policy and microbatch count."""
  mesh: tuple[tuple[str, int], ...]  # ((axis, size), ...) in config.MESH_AXES order
  remat: str
  microbatches: int

  def size(self, axis: str) -> int:
    return dict(self.mesh).get(axis, 1)


def layout_of(cfg: Config, num_gpus: int) -> Layout:
  sizes = config_lib.mesh_shape(cfg.mesh, num_gpus)
  return Layout(tuple((a, sizes[a]) for a in config_lib.MESH_AXES), cfg.model.remat,
                cfg.train.microbatches)


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


def param_shards(cfg: Config, layout: Layout) -> ParamShards:
  """Shard sizes exactly as the trainer lays parameters out (sharding.logical_to_spec)."""
  from jax.sharding import AbstractMesh
  from mai_jax.sharding import logical_to_spec
  mesh = AbstractMesh(tuple(s for _, s in layout.mesh), tuple(a for a, _ in layout.mesh))
  per_device = gathered = sharded = 0
  unit_elems: dict[tuple, float] = {}
  for shape, names, unit in _abstract_params(cfg.model):
    spec = logical_to_spec(names, cfg.mesh.rules, mesh, shape)
    axes = [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
    elems = math.prod(shape) // math.prod(layout.size(a) for a in axes)
    per_device += elems
    fsdp = layout.size("fsdp") if "fsdp" in axes else 1
    if fsdp > 1:
      gathered += elems * fsdp
      sharded += elems
    if unit is not None:
      units = shape[0] if len(unit) == 1 else 1  # a scanned stack's leading dim
      unit_elems[unit] = unit_elems.get(unit, 0) + elems * fsdp / units
  return ParamShards(per_device, gathered, sharded, int(max(unit_elems.values(), default=0)))


def flops_per_token(cfg: Config) -> float:
  """Model training FLOPs per token: 6 x active matmul params + causal attention (metrics.py)."""
  _, active = param_counts(cfg.model)
  return metrics.train_flops_per_token(cfg.model, active, cfg.data.seq_len)


def recompute_flops_per_token(cfg: Config, remat: str) -> float:
  """Extra forward FLOPs per token that rematerialization costs (not counted in MFU).

  full: every block's forward again (2 x block matmul params + the causal attention forward);
  dots: the saved matmul outputs make projections free, only attention QK^T/AV (batched dots,
  which dots_with_no_batch_dims_saveable does not save) is recomputed; none: nothing.
  """
  m = cfg.model
  attention_fwd = 2.0 * m.num_layers * cfg.data.seq_len * m.num_heads * m.head_dim
  if remat == "none":
    return 0.0
  if remat == "dots":
    return attention_fwd
  _, active = param_counts(m)
  block_params = metrics.matmul_params(m, active) - m.vocab_size * m.d_model  # minus unembed
  return 2.0 * block_params + attention_fwd


# ----------------------------------------------------------------------------------------------
# Memory


def rows_per_device(cfg: Config, layout: Layout) -> int:
  """Sequences per device per microbatch (the batch is sharded over the 'batch' rule's axes)."""
  shards = math.prod(layout.size(a) for a in dict(cfg.mesh.rules).get("batch", ()))
  per_micro = cfg.train.global_batch_size // layout.microbatches
  if cfg.train.global_batch_size % layout.microbatches or per_micro % shards:
    raise ConfigError(
        f"train.global_batch_size={cfg.train.global_batch_size} with {layout.microbatches} "
        f"microbatches does not split evenly over the {shards} devices the batch is sharded over")
  return per_micro // shards


def layer_activation_bytes(cfg: Config, layout: Layout, attention: str,
                           d_ff: Optional[float] = None) -> dict[str, float]:
  """Bytes one block keeps for its backward pass on one device, per remat policy.

  Korthikanti et al. 2022 (34 s b h + 5 a s^2 b for GPT) adapted to this model's ops, with
  n = rows x seq tokens per device, c bytes per compute-dtype element, t = tensor size:
    none: n c (4 D + (2 H + 2 KV) K / t + 3 F / t) + attention core
          (norm in/out twice, q k v after RoPE, attention output, gate, up, silu(gate)*up)
    dots: n c (2 D + (H + 2 KV) K / t + 2 F / t)   (projection outputs only)
    carry: n c D                                    (the residual stream between blocks)
  attention core: 'flash' keeps a float32 log-sum-exp per head; 'xla' materializes the float32
  logits and probabilities [b, H/t, T, T] and the boolean causal/document masks [b, T, T].
  F is `d_ff` (default: ffn_width, the average over the layers); an MoE block passes the shared
  experts' width and adds moe_layer_bytes for the routed experts.
  """
  m, c, t = cfg.model, DTYPE_BYTES[cfg.model.compute_dtype], layout.size("tensor")
  T = cfg.data.seq_len
  rows = rows_per_device(cfg, layout)
  n = rows * T
  D, H, KV, K = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
  F = ffn_width(m) if d_ff is None else d_ff
  Ht = H // t if H % t == 0 else H
  if attention == "flash":
    core = n * Ht * 4
  else:
    core = 2 * rows * Ht * T * T * 4 + 2 * rows * T * T
  return {
      "none": n * c * (4 * D + (2 * H + 2 * KV) * K / t + 3 * F / t) + core,
      "dots": n * c * (2 * D + (H + 2 * KV) * K / t + 2 * F / t),
      "carry": n * c * D,
      "core": core,
  }


def moe_buffer_rows(cfg: Config, layout: Layout, expert_ffn: str = "ragged_dot") -> dict[str, int]:
  """Rows of one MoE layer's expert buffers on one device (model/moe.py), per microbatch.

  assignments A = n k. capacity mode: the [E, b, C] slots, R = E b C (~capacity_factor x A,
  whatever the expert-parallel size). dropless with expert parallelism: ep destination buffers of
  M = A rows (or ceil(expert_buffer_factor A / ep)), R = ep M; dropless on one device: R = A.
  expert_ffn 'tiled' (the CPU path, dropless only) also pads every local expert's group to a tile:
  padded = R + E_local (tile - 1), rounded up to a tile.
  """
  from mai_jax.model import moe as moe_lib
  m = cfg.model
  b, T = rows_per_device(cfg, layout), cfg.data.seq_len
  A = b * T * m.experts_per_token
  ep = math.prod(layout.size(a) for a in dict(cfg.mesh.rules).get("experts", ()))
  cap = moe_lib.capacity(m, T)
  if cap is not None:
    return {"assignments": A, "rows": m.num_experts * b * cap,
            "padded": m.num_experts * b * cap}
  rows = ep * moe_lib.expert_buffer_rows(m.expert_buffer_factor, A, ep) if ep > 1 else A
  padded = moe_lib.tiled_rows(rows, m.num_experts // ep) if expert_ffn == "tiled" else rows
  return {"assignments": A, "rows": rows, "padded": padded}


def moe_layer_bytes(cfg: Config, layout: Layout, expert_ffn: str = "ragged_dot") -> dict[str, float]:
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
  n = rows_per_device(cfg, layout) * cfg.data.seq_len
  rows = moe_buffer_rows(cfg, layout, expert_ffn)
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
  per = layer_activation_bytes(cfg, layout, attention, None if not is_moe(m) else m.d_ff)
  if not is_moe(m):
    if layout.remat == "none":
      blocks = L * per["none"]
    elif layout.remat == "dots":
      blocks = L * (per["carry"] + per["dots"]) + per["core"]
    else:
      blocks = L * per["carry"] + per["none"]
    return blocks + logits_bytes(cfg, layout)
  from mai_jax.model.moe import expert_d_ff, num_moe_layers
  L_moe = num_moe_layers(m)
  sparse = layer_activation_bytes(cfg, layout, attention, m.num_shared_experts * expert_d_ff(m))
  moe = moe_layer_bytes(cfg, layout, expert_ffn)
  moe_block = sparse["none"] + moe["saved"]
  if layout.remat == "none":
    blocks = ((L - L_moe) * per["none"] + L_moe * (moe_block + moe["gathered_weights"])
              + moe["live"])
  elif layout.remat == "dots":
    blocks = ((L - L_moe) * (per["carry"] + per["dots"])
              + L_moe * (sparse["carry"] + sparse["dots"] + moe["dots"])
              + sparse["core"] + moe["saved"] + moe["live"])
  else:
    blocks = L * per["carry"] + max(per["none"], moe_block + moe["live"])
  return blocks + logits_bytes(cfg, layout)


def logits_bytes(cfg: Config, layout: Layout) -> float:
  """float32 logits and their gradient, vocabulary sharded over 'tensor'."""
  n = rows_per_device(cfg, layout) * cfg.data.seq_len
  return 2 * n * cfg.model.vocab_size / layout.size("tensor") * 4


def memory_per_device(cfg: Config, layout: Layout, attention: str = "flash",
                      workspace: int = WORKSPACE_BYTES,
                      expert_ffn: str = "ragged_dot") -> dict[str, int]:
  """Bytes per device by kind; 'total' is their sum.

  params, grads, optimizer: exact shard sizes x dtype. The step keeps gradients in the parameter
  dtype (plus float32 accumulators when microbatches > 1); optax.adamw keeps both moments in the
  parameter dtype (mu_dtype=None). master_params is 0: this codebase has no separate master copy,
  a float32 param_dtype *is* the master and bfloat16 params are updated in place.
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
      "optimizer": 2 * shards.per_device * p,
      "master_params": 0,
      "activations": int(activation_bytes(cfg, layout, attention, expert_ffn)),
      "temporaries": int(3 * shards.per_layer_gathered * c + workspace),
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
  all-reduce: 2 S (n-1)/n. Per microbatch (the step accumulates inside a scan, so every collective
  runs once per microbatch):
    fsdp:   each block's weights all-gathered for the forward and again for the backward, its
            gradient reduce-scattered, in WIRE_DTYPE; overlapped.
    data:   all-reduce of the gradient shards, in WIRE_DTYPE; overlapped with the backward.
    tensor: Megatron all-reduces of the residual stream [n, D]: 2 per block forward, 2 backward,
            2 more for the full-remat recompute, plus 2 for the vocab-sharded embedding/unembedding;
            on the critical path (not overlapped).
    expert: MoE all-to-all (moe_communication), on the critical path.
  """
  m, c = cfg.model, DTYPE_BYTES[cfg.model.compute_dtype]
  w = DTYPE_BYTES[cfg.model.compute_dtype if WIRE_DTYPE == "compute" else cfg.model.param_dtype]
  M, L = layout.microbatches, m.num_layers
  shards = param_shards(cfg, layout)
  n_tokens = rows_per_device(cfg, layout) * cfg.data.seq_len
  f, d, t = layout.size("fsdp"), layout.size("data"), layout.size("tensor")
  tensor_calls = (6 if layout.remat == "full" else 4) * L + 2
  plan = {
      "fsdp": (3 * M * shards.fsdp_gathered * w * (f - 1) / f, 3 * M * L, True),
      "data": (2 * M * shards.per_device * w * (d - 1) / d, M * L, True),
      "tensor": (tensor_calls * M * 2 * n_tokens * m.d_model * c * (t - 1) / t, tensor_calls * M,
                 False),
      "expert": (0.0, 0, False),
  }
  if is_moe(m):
    plan["expert"] = moe_communication(cfg, layout)
  out = {}
  for axis, (nbytes, calls, overlapped) in plan.items():
    size = layout.size(axis)
    link = axis_link(layout, axis, gpu)
    bandwidth = gpu.nvlink_bandwidth if link == "nvlink" else gpu.internode_bandwidth
    seconds = 0.0
    if size > 1 and nbytes:
      seconds = (nbytes / (bandwidth * COLLECTIVE_EFFICIENCY)
                 + calls * COLLECTIVE_LATENCY_S[link] * math.ceil(math.log2(size)))
    out[axis] = {"size": size, "bytes": int(nbytes), "link": link, "time_s": seconds,
                 "overlapped": overlapped}
  return out


def moe_communication(cfg: Config, layout: Layout) -> tuple[float, int, bool]:
  """Expert-parallel all-to-all (bytes, calls, overlapped) per step on one device.

  Per MoE layer and microbatch: dispatch + combine in the forward, the same two in the backward,
  two more for the full-remat recompute; each moves this device's whole send buffer, R rows
  (moe_buffer_rows: ~capacity_factor x n x experts_per_token in capacity mode, ep x that without
  expert_buffer_factor when dropless: padding travels too) x D in the compute dtype, of which
  (e-1)/e leave the device. On the critical path (the experts wait for their tokens).
  """
  from mai_jax.model.moe import num_moe_layers
  m, e = cfg.model, layout.size("expert")
  c = DTYPE_BYTES[m.compute_dtype]
  per_call = moe_buffer_rows(cfg, layout)["rows"] * m.d_model * c
  calls = (6 if layout.remat == "full" else 4) * num_moe_layers(m) * layout.microbatches
  return calls * per_call * (e - 1) / e, calls, False


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

  @property
  def fits(self) -> bool:
    return self.memory["total"] <= self.usable_hbm_bytes

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
        "params_total": self.params_total, "params_active": self.params_active,
        "flops_per_token": self.flops_per_token,
        "memory_per_device_bytes": dict(self.memory),
        "usable_hbm_bytes": self.usable_hbm_bytes, "fits": self.fits,
        "communication": self.communication, "compute_time_s": self.compute_time_s,
        "step_time_s": self.step_time_s, "step_time_no_overlap_s": self.step_time_no_overlap_s,
        "tokens_per_step": self.tokens_per_step, "mfu": self.mfu,
        "tokens_per_day": self.tokens_per_day, "token_budget": self.token_budget,
        "days_to_train": self.days_to_train,
    }


def gpu_spec(name: str) -> hardware.GpuSpec:
  if name not in hardware.GPUS:
    raise ConfigError(f"unknown GPU {name!r}{config_lib._did_you_mean(name, hardware.GPUS)}; "
                      f"known: {', '.join(hardware.GPUS)}")
  return hardware.GPUS[name]


def plan(cfg: Config, gpu: str, num_gpus: int, layout: Optional[Layout] = None,
         attention: str = "flash") -> Plan:
  """Plans `cfg` on `num_gpus` GPUs of type `gpu` with `layout` (default: the config's own)."""
  spec = gpu_spec(gpu)
  layout = layout or layout_of(cfg, num_gpus)
  _refuse_pipeline_stages(layout)
  total, active = param_counts(cfg.model)
  model_flops = flops_per_token(cfg)
  tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
  hardware_flops = tokens_per_step * (model_flops + recompute_flops_per_token(cfg, layout.remat))
  compute_s = hardware_flops / num_gpus / (spec.peak_bf16_flops * MATMUL_EFFICIENCY)
  comm = communication(cfg, layout, spec)
  overlapped = sum(v["time_s"] for v in comm.values() if v["overlapped"])
  exposed = sum(v["time_s"] for v in comm.values() if not v["overlapped"])
  step_s = max(compute_s, overlapped) + exposed
  mfu = tokens_per_step * model_flops / (step_s * num_gpus * spec.peak_bf16_flops)
  return Plan(gpu=gpu, num_gpus=num_gpus, layout=layout, params_total=total, params_active=active,
              flops_per_token=model_flops, memory=memory_per_device(cfg, layout, attention),
              usable_hbm_bytes=int(spec.hbm_bytes * USABLE_HBM_FRACTION), communication=comm,
              compute_time_s=compute_s, step_time_s=step_s,
              step_time_no_overlap_s=compute_s + overlapped + exposed,
              tokens_per_step=tokens_per_step, mfu=mfu, token_budget=config_lib.token_budget(cfg))


def _refuse_pipeline_stages(layout: Layout) -> None:
  """The cost model has no pipeline terms yet (bubble, stage-to-stage sends, per-stage memory):
  a plan for mesh.stage > 1 would be silently wrong, so it is refused."""
  if layout.size("stage") > 1:
    raise config_lib.ConfigError(f"mesh.stage={layout.size('stage')}: the planner does not model "
                                 f"pipeline stages yet; plan with mesh.stage=1")


# ----------------------------------------------------------------------------------------------
# Search


def candidate_meshes(cfg: Config, num_gpus: int, gpu: hardware.GpuSpec):
  """Every {axis: size} mesh for `num_gpus` that the model allows, whatever the batch.

  tensor stays inside a node and divides the query heads; expert keeps the config's size (MoE
  layouts are chosen with the expert count); fsdp x data take the rest.
  """
  expert = cfg.mesh.expert if cfg.mesh.expert > 0 else 1
  if num_gpus % expert:
    return
  for tensor in (1, 2, 4, 8):
    if tensor > gpu.gpus_per_node or num_gpus % (tensor * expert) or cfg.model.num_heads % tensor:
      continue
    rest = num_gpus // (tensor * expert)
    for fsdp in _divisors(rest):
      yield {"data": rest // fsdp, "stage": 1, "fsdp": fsdp, "expert": expert,
             "tensor": tensor}


def batch_shards(cfg: Config, sizes: dict[str, int]) -> int:
  """Devices the batch is split over on a mesh of `sizes` (the 'batch' rule's axes)."""
  return math.prod(sizes[a] for a in dict(cfg.mesh.rules).get("batch", ()))


def candidate_layouts(cfg: Config, num_gpus: int, gpu: hardware.GpuSpec):
  """Every candidate mesh x remat x microbatches whose batch split is even."""
  for sizes in candidate_meshes(cfg, num_gpus, gpu):
    shards = batch_shards(cfg, sizes)
    for micro in _divisors(cfg.train.global_batch_size):
      if (cfg.train.global_batch_size // micro) % shards:
        continue
      for remat in REMATS:
        yield Layout(tuple((a, sizes[a]) for a in config_lib.MESH_AXES), remat, micro)


def search_any_batch(cfg: Config, gpu: str, num_gpus: int, top: int = 10,
                     attention: str = "flash") -> tuple[list[Plan], Optional[str]]:
  """(search(...), note): the search at the config's batch, or, when no layout of `num_gpus`
  splits it, at the nearest batch that one does (same token budget), with a note saying so."""
  batch = searchable_batch(cfg, gpu, num_gpus)
  if batch == cfg.train.global_batch_size:
    return search(cfg, gpu, num_gpus, top, attention), None
  train = dataclasses.replace(cfg.train, global_batch_size=batch,
                              token_budget=config_lib.token_budget(cfg))
  note = (f"train.global_batch_size={cfg.train.global_batch_size} splits evenly over no layout of "
          f"{num_gpus} GPUs; ranking layouts at the nearest batch that does: {batch} "
          f"(--config.train.global_batch_size={batch}, {batch * cfg.data.seq_len:,} tokens/step)")
  return search(dataclasses.replace(cfg, train=train), gpu, num_gpus, top, attention), note


def searchable_batch(cfg: Config, gpu: str, num_gpus: int) -> int:
  """train.global_batch_size if some candidate layout splits it evenly over `num_gpus`, else the
  nearest batch that one does (a planner answers "how would this run on N GPUs" even when the
  config's batch was chosen for another count)."""
  units = {batch_shards(cfg, sizes) for sizes in candidate_meshes(cfg, num_gpus, gpu_spec(gpu))}
  batch = cfg.train.global_batch_size
  if not units or any(batch % unit == 0 for unit in units):
    return batch
  return min((config_lib.nearest_multiple(batch, u) for u in units),
             key=lambda b: (abs(b - batch), -b))


def _divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


def search(cfg: Config, gpu: str, num_gpus: int, top: int = 10,
           attention: str = "flash") -> list[Plan]:
  """The fitting layouts, fastest first (ties: less memory)."""
  spec = gpu_spec(gpu)
  plans = [plan(cfg, gpu, num_gpus, layout, attention)
           for layout in candidate_layouts(cfg, num_gpus, spec)]
  fitting = [p for p in plans if p.fits]
  fitting.sort(key=lambda p: (p.step_time_s, p.memory["total"]))
  return fitting[:top]


# ----------------------------------------------------------------------------------------------
# Human-readable output


def _gb(nbytes: float) -> str:
  return f"{nbytes / 1e9:.2f} GB"


def format_plan(p: Plan) -> str:
  mesh = " ".join(f"{a}={s}" for a, s in p.layout.mesh)
  lines = [
      f"{p.num_gpus} x {hardware.GPUS[p.gpu].name}   mesh {mesh}   remat={p.layout.remat}   "
      f"microbatches={p.layout.microbatches}",
      f"params total {p.params_total:,}   active {p.params_active:,}   "
      f"FLOPs/token {p.flops_per_token:.4g}",
      "memory per device:",
  ]
  for key, value in p.memory.items():
    lines.append(f"  {key:<14} {_gb(value):>12}")
  lines.append(f"  {'usable HBM':<14} {_gb(p.usable_hbm_bytes):>12}   "
               f"{'fits' if p.fits else 'DOES NOT FIT'}")
  lines.append("communication per step:")
  for axis, v in p.communication.items():
    lines.append(f"  {axis:<7} size {v['size']:<6} {_gb(v['bytes']):>12} over {v['link']:<9} "
                 f"{v['time_s']:8.3f} s {'(overlapped)' if v['overlapped'] else '(exposed)'}")
  lines += [
      f"compute {p.compute_time_s:.3f} s   step {p.step_time_s:.3f} s "
      f"(no overlap {p.step_time_no_overlap_s:.3f} s)   MFU {p.mfu:.1%}",
      f"tokens/step {p.tokens_per_step:,}   tokens/day {p.tokens_per_day:.4g}   "
      f"budget {p.token_budget:.4g} tokens -> {p.days_to_train:.1f} days",
  ]
  return "\n".join(lines)


def format_search(plans: list[Plan]) -> str:
  if not plans:
    return "no layout fits"
  header = (f"{'rank':>4} {'data':>5} {'fsdp':>5} {'exp':>4} {'tp':>3} {'remat':>5} {'micro':>5} "
            f"{'mem/dev':>10} {'step s':>8} {'MFU':>6} {'days':>7}")
  rows = [header]
  for i, p in enumerate(plans, 1):
    s = dict(p.layout.mesh)
    rows.append(f"{i:>4} {s['data']:>5} {s['fsdp']:>5} {s['expert']:>4} {s['tensor']:>3} "
                f"{p.layout.remat:>5} {p.layout.microbatches:>5} {_gb(p.memory['total']):>10} "
                f"{p.step_time_s:>8.3f} {p.mfu:>6.1%} {p.days_to_train:>7.1f}")
  return "\n".join(rows)
