"""`mai-jax plan --search` and the planner's text output: the candidate layouts of a config on N
GPUs (mesh x remat x microbatches x pipeline schedule), ranked by plan.plan's step time.

Why apart from plan.py: the cost model answers "what does this layout cost"; this module decides
which layouts are worth asking about (the pruning that keeps a 15,360-GPU search at ~1-3 s) and
how answers are printed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from mai_jax import config as config_lib
from mai_jax import hardware
from mai_jax.config import Config
from mai_jax.plan import (REMATS, USABLE_HBM_FRACTION, Layout, Plan, codebase_impl, gpu_spec, is_moe,
                          memory_per_device, plan)


# ----------------------------------------------------------------------------------------------
# Search


# --search's pipeline candidates: stages up to MAX_STAGES (each needs a copy of the head's work
# and adds a bubble), repeats up to MAX_REPEATS, at most MAX_PIPELINE_MICROBATCH_CHOICES
# pipeline microbatch counts (the smallest divisors >= S: more only adds saved stage inputs).
MAX_STAGES = 32
MAX_REPEATS = 16
MAX_PIPELINE_MICROBATCH_CHOICES = 4
MAX_ACCUMULATION = 16


def candidate_meshes(cfg: Config, num_gpus: int, gpu: hardware.GpuSpec):
  """Every {axis: size} mesh for `num_gpus` that the model allows, whatever the batch.

  tensor stays inside a node and divides the query heads; expert keeps the config's size (MoE
  layouts are chosen with the expert count); stage divides the pipelined units (up to
  MAX_STAGES): the layers of a dense model, an MoE model's MoE blocks (or groups) after its first
  dense layers (pipelined_units); fsdp x data take the rest.
  """
  expert = cfg.mesh.expert if cfg.mesh.expert > 0 else 1
  if num_gpus % expert:
    return
  for tensor in (1, 2, 4, 8):
    if tensor > gpu.gpus_per_node or num_gpus % (tensor * expert) or cfg.model.num_heads % tensor:
      continue
    rest = num_gpus // (tensor * expert)
    for stage in _divisors(rest):
      if stage > 1 and (stage > MAX_STAGES or not cfg.model.scan_layers
                        or pipelined_units(cfg.model) % stage):
        continue
      for fsdp in _divisors(rest // stage):
        yield {"data": rest // (stage * fsdp), "stage": stage, "fsdp": fsdp, "expert": expert,
               "tensor": tensor}


def pipelined_units(model) -> int:
  """What the stages split (config._validate_pipeline): the layers of a dense model; an MoE
  model's stack of MoE blocks (or groups of moe_layer_interval blocks) after first_dense_layers."""
  if not is_moe(model):
    return model.num_layers
  return (model.num_layers - model.first_dense_layers) // model.moe_layer_interval


def batch_shards(cfg: Config, sizes: dict[str, int]) -> int:
  """Devices the batch is split over on a mesh of `sizes` (the 'batch' rule's axes)."""
  return math.prod(sizes[a] for a in dict(cfg.mesh.rules).get("batch", ()))


def candidate_layouts(cfg: Config, num_gpus: int, gpu: hardware.GpuSpec):
  """Every candidate mesh x remat x microbatches whose batch split is even; with stages, every
  repeat count that divides the layers per stage (up to MAX_REPEATS) x the smallest pipeline
  microbatch counts >= S that divide the rows, under a few gradient-accumulation counts
  (_accumulation_choices). Each with and without mesh.zero1 where data > 1."""
  for base in _layouts_without_zero1(cfg, num_gpus, gpu):
    for layout in _with_hierarchical_dispatch(cfg, base, gpu):
      yield layout
      if layout.size("data") > 1:
        yield dataclasses.replace(layout, zero1=True)


def _with_hierarchical_dispatch(cfg: Config, layout: Layout, gpu: hardware.GpuSpec):
  """The layout with the config's model.expert_devices_per_node, and, where the expert axis
  spans several nodes, with the other choice too: flat (0) or hierarchical with a node's expert
  devices (gpus_per_node / tensor), the view of the axis that matches the hardware. Not under
  pipeline stages: model/hierarchical_dispatch.py groups its all-to-alls with axis_index_groups,
  which jax cannot vmap over the stages (config.py refuses that combination)."""
  yield layout
  e, t = layout.size("expert"), layout.size("tensor")
  per_node = gpu.gpus_per_node // t
  if (not is_moe(cfg.model) or layout.stages > 1 or e * t <= gpu.gpus_per_node
      or e % per_node):
    return
  other = 0 if layout.expert_devices_per_node > 1 else per_node
  yield dataclasses.replace(layout, expert_devices_per_node=other)


def _layouts_without_zero1(cfg: Config, num_gpus: int, gpu: hardware.GpuSpec):
  """The candidates, model.sequence_parallel as the config has it (where the tensor size divides
  data.seq_len): not searched, because the planner charges sequence parallelism nothing (the
  same bytes over 'tensor', less memory and elementwise time), so a searched option would always
  come out on."""
  batch = cfg.train.global_batch_size
  for sizes in candidate_meshes(cfg, num_gpus, gpu):
    shards, stage = batch_shards(cfg, sizes), sizes["stage"]
    mesh = tuple((a, sizes[a]) for a in config_lib.MESH_AXES)
    sp = cfg.model.sequence_parallel and cfg.data.seq_len % sizes["tensor"] == 0
    hier = cfg.model.expert_devices_per_node
    if stage > 1:
      if batch % shards:
        continue
      repeats = [r for r in _divisors(pipelined_units(cfg.model) // stage) if r <= MAX_REPEATS]
      for accumulate in _accumulation_choices(batch // shards, stage):
        rows = batch // shards // accumulate
        micros = [k for k in _divisors(rows) if k >= stage]
        for pipe in micros[:MAX_PIPELINE_MICROBATCH_CHOICES]:
          for r in repeats:
            for remat in REMATS:
              yield Layout(mesh, remat, accumulate, r, pipe, impl=codebase_impl(cfg),
                           sequence_parallel=sp, expert_devices_per_node=hier)
      continue
    for micro in _divisors(batch):
      if (batch // micro) % shards:
        continue
      for remat in REMATS:
        yield Layout(mesh, remat, micro, sequence_parallel=sp, expert_devices_per_node=hier)


def _accumulation_choices(rows: int, stages: int) -> list[int]:
  """Gradient accumulation under stages: 1, and powers of two while each accumulation
  microbatch keeps >= `stages` rows per device. An accumulation microbatch refills the pipeline
  (its bubble again), so it only earns its place when one pipeline run of all the rows does not
  fit; the memory filter in `search` drops the rest before they are timed."""
  out, k = [1], 2
  while k <= MAX_ACCUMULATION and rows % k == 0 and rows // k >= stages:
    out.append(k)
    k *= 2
  return out


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
  usable = spec.hbm_bytes * USABLE_HBM_FRACTION
  fitting = [plan(cfg, gpu, num_gpus, layout, attention)
             for layout in candidate_layouts(cfg, num_gpus, spec)
             if memory_per_device(cfg, layout, attention)["total"] <= usable]
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
      f"microbatches={p.layout.microbatches}{'   zero1' if p.layout.zero1 else ''}"
      f"{'   sequence_parallel' if p.layout.sequence_parallel else ''}"
      f"{f'   expert_devices_per_node={p.layout.expert_devices_per_node}' if p.layout.expert_devices_per_node > 1 else ''}",
      *([f"pipeline: {p.layout.stages} stages x {p.layout.repeats} repeats, "
         f"{p.layout.pipeline_microbatches} pipeline microbatches, bubble "
         f"{p.bubble_fraction:.1%}"] if p.layout.stages > 1 else []),
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
    limit = v.get("nodes_per_token_limit")
    if v.get("expert_nodes", 1) > 1 or limit is not None:  # plan_moe.routing
      lines.append(f"          routing: experts on {v['nodes_per_token']:.2f} of "
                   f"{v['expert_nodes']} nodes per token (expected"
                   f"{f', at most {limit}' if limit is not None else ''}); "
                   + (f"hierarchical all-to-all: {_gb(v['internode_bytes'])} inter-node, "
                      f"{_gb(v['intranode_bytes'])} intra-node" if v.get("hierarchical") else
                      f"flat all-to-all: bytes independent of it ({_gb(v['internode_bytes'])} "
                      f"inter-node, {_gb(v['intranode_bytes'])} intra-node)"))
    if "overlappable_s" in v:  # plan_moe.overlap (model.moe_overlap_halves)
      lines.append(f"          overlap halves: {v['all_to_all_s']:.3f} s of all-to-all, up to "
                   f"{v['overlappable_s']:.3f} s under one half's expert GEMMs")
  parts = "  ".join(f"{k} {v:.3f}" for k, v in p.compute_times.items()
                    if k not in ("total", "pipeline_stretch"))
  lines += [
      f"compute per device (s): {parts}",
      f"compute {p.compute_time_s:.3f} s   step {p.step_time_s:.3f} s "
      f"(no overlap {p.step_time_no_overlap_s:.3f} s)   MFU {p.mfu:.1%}",
      f"tokens/step {p.tokens_per_step:,}   tokens/day {p.tokens_per_day:.4g}   "
      f"budget {p.token_budget:.4g} tokens -> {p.days_to_train:.1f} days",
  ]
  return "\n".join(lines)


def format_search(plans: list[Plan]) -> str:
  if not plans:
    return "no layout fits"
  header = (f"{'rank':>4} {'data':>5} {'stage':>5} {'fsdp':>5} {'exp':>4} {'tp':>3} {'rep':>3} "
            f"{'pmb':>4} {'remat':>9} {'micro':>5} {'z1':>2} {'epn':>3} {'mem/dev':>10} {'step s':>8} "
            f"{'bubble':>6} {'MFU':>6} {'days':>7}")
  rows = [header]
  for i, p in enumerate(plans, 1):
    s = dict(p.layout.mesh)
    rows.append(f"{i:>4} {s['data']:>5} {s['stage']:>5} {s['fsdp']:>5} {s['expert']:>4} "
                f"{s['tensor']:>3} {p.layout.repeats:>3} {p.layout.pipeline_microbatches:>4} "
                f"{p.layout.remat:>9} {p.layout.microbatches:>5} "
                f"{'y' if p.layout.zero1 else '-':>2} {p.layout.expert_devices_per_node or '-':>3} "
                f"{_gb(p.memory['total']):>10} "
                f"{p.step_time_s:>8.3f} {p.bubble_fraction:>6.1%} {p.mfu:>6.1%} "
                f"{p.days_to_train:>7.1f}")
  return "\n".join(rows)
