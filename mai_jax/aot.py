"""Ahead-of-time compile check: the exact sharded train step of a (big) config, at reduced depth,
on the devices at hand (fake CPU devices), from abstract shapes only.

Why: a 500B layout cannot be run here, but XLA's SPMD partitioner can prove that its shardings are
consistent (every parameter, optimizer moment, activation constraint and collective) and report
what one device would need. Depth is reduced because scanned blocks repeat the same program; the
mesh keeps the full layout's pattern (config.scaled_to_devices) and per-device batch shapes.
Nothing is allocated: the state and batch are ShapeDtypeStructs carrying their shardings.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from mai_jax import config as config_lib
from mai_jax import plan as plan_lib
from mai_jax import sharding as sharding_lib
from mai_jax.config import Config
from mai_jax.model import moe as moe_lib
from mai_jax.train import step as step_lib
from mai_jax.train.trainer import build_trainer


def model_at_depth(model, num_layers: int):
  """`model` with about `num_layers` layers of the same kinds: an MoE model keeps one of its first
  dense layers (if it has any) and whole groups of moe_layer_interval layers (at least one)."""
  if not model.num_experts:
    return dataclasses.replace(model, num_layers=num_layers)
  dense = min(model.first_dense_layers, 1)
  k = model.moe_layer_interval
  sparse = max((num_layers - dense) // k, 1) * k
  return dataclasses.replace(model, num_layers=dense + sparse, first_dense_layers=dense)


def reduced_config(cfg: Config, num_layers: int, num_devices: int,
                   full_num_devices: Optional[int]) -> Config:
  """`cfg` at `num_layers` depth, its mesh pattern scaled from `full_num_devices` to the devices at
  hand (None: the mesh already fits them)."""
  small = dataclasses.replace(cfg, model=model_at_depth(cfg.model, num_layers))
  if full_num_devices and full_num_devices != num_devices:
    small = config_lib.scaled_to_devices(small, num_devices, full_num_devices)
  small = _whole_pipeline_schedule(small, num_devices)
  config_lib.validate(small, num_devices)
  return small


def _whole_pipeline_schedule(cfg: Config, num_devices: int) -> Config:
  """With stages, the depth rounded up to a multiple of stages x repeats: the reduced step keeps
  the full layout's schedule (its repeats, its pipeline microbatches) at the fewest layers."""
  stages = config_lib.mesh_shape(cfg.mesh, num_devices)["stage"]
  unit = stages * cfg.model.pipeline_repeats
  if stages == 1 or cfg.model.num_layers % unit == 0:
    return cfg
  layers = -(-cfg.model.num_layers // unit) * unit
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=layers))


def compile_train_step(cfg: Config, devices=None):
  """Lowers and compiles the jitted, sharded train step of `cfg` on `devices` (default: all)."""
  devices = list(devices) if devices is not None else jax.devices()
  mesh = sharding_lib.make_mesh(cfg.mesh, devices)
  trainer = build_trainer(cfg, mesh)
  state = trainer.abstract_state()
  batch = step_lib.abstract_batch(cfg, trainer.batch_sharding)
  with sharding_lib.activate(mesh, cfg.mesh.rules):
    lowered = trainer.jit_train_step().lower(state, batch)
  return lowered.compile()


def compiled_figures(compiled) -> dict:
  """Per-device FLOPs and memory as XLA reports them for the compiled SPMD program."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  args, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
  return {"flops": float(cost.get("flops", 0.0)), "argument_bytes": int(args),
          "output_bytes": int(out), "alias_bytes": int(alias), "temp_bytes": int(temp),
          "peak_bytes": int(args + out - alias + temp)}


def compile_check(cfg: Config, num_layers: int, full_num_devices: Optional[int],
                  devices=None) -> dict:
  """Compiles `cfg` at `num_layers` depth on the devices at hand and sets the compiled per-device
  FLOPs and memory next to the planner's figures for the same reduced config and mesh.

  The planner side uses the 'xla' attention memory model (CPU has no flash kernel), no GPU
  workspace, the MoE grouped-matmul path this backend takes (CPU: tiled, with its padded rows)
  and, on CPU, float32 activations (as_this_backend); planner FLOPs are per device:
  tokens x (model + recompute FLOPs) / devices.
  """
  devices = list(devices) if devices is not None else jax.devices()
  small = reduced_config(cfg, num_layers, len(devices), full_num_devices)
  compiled = compile_train_step(small, devices)
  layout = plan_lib.layout_of(small, len(devices))
  memory = plan_lib.memory_per_device(as_this_backend(small), layout, attention="xla", workspace=0,
                                      expert_ffn=moe_lib.expert_ffn_impl())
  pipelined = layout.stages > 1
  return {"num_layers": small.model.num_layers, "num_devices": len(devices),
          "mesh": dict(layout.mesh), "repeats": layout.repeats,
          "pipeline_microbatches": layout.pipeline_microbatches,
          "global_batch_size": small.train.global_batch_size, "seq_len": small.data.seq_len,
          "remat": layout.remat, "microbatches": layout.microbatches,
          "compiled": compiled_figures(compiled),
          "planned": {"flops": planned_flops(small, len(devices)),
                      # XLA counts the pipeline's nested loops (iterations, stage layers)
                      # once each: no comparable figure is modelled for them
                      "flops_as_xla_counts": None if pipelined
                      else planned_flops_as_xla_counts(small, len(devices)),
                      "memory_per_device_bytes": memory}}


def as_this_backend(cfg: Config) -> Config:
  """The config as the local backend executes it: XLA:CPU computes bfloat16 in float32 (a 2-layer
  bfloat16 step and its float32 twin compile to temporaries within 5% of each other), so the plan it
  is compared with uses float32 activations there."""
  if jax.default_backend() != "cpu":
    return cfg
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, compute_dtype="float32"))


def planned_flops(cfg: Config, num_devices: int) -> float:
  """Planner FLOPs per device per step: tokens x (model + remat recompute FLOPs) / devices."""
  tokens = cfg.train.global_batch_size * cfg.data.seq_len
  per_token = (plan_lib.flops_per_token(cfg)
               + plan_lib.recompute_flops_per_token(cfg, cfg.model.remat))
  return tokens * per_token / num_devices


def planned_flops_as_xla_counts(cfg: Config, num_devices: int) -> float:
  """The same, counted the way XLA's cost analysis does: the body of a while loop (the scan over
  layers, and over microbatches) once, whatever its trip count. So the comparable figure is one
  block's FLOPs (with scan_layers) for one microbatch's tokens."""
  model = cfg.model
  if model.scan_layers:  # MoE: one body per stack (exact for moe_layer_interval <= 2)
    model = model_at_depth(model, 1)
  train = dataclasses.replace(cfg.train,
                              global_batch_size=cfg.train.global_batch_size
                              // cfg.train.microbatches, microbatches=1)
  return planned_flops(dataclasses.replace(cfg, model=model, train=train), num_devices)


def format_check(check: dict) -> str:
  """Compiled vs planned, per device, as a small table."""
  c, p = check["compiled"], check["planned"]
  mem = p["memory_per_device_bytes"]
  mesh = " ".join(f"{a}={s}" for a, s in check["mesh"].items())
  rows = [
      f"--compile: {check['num_layers']} layers on {check['num_devices']} CPU devices, "
      f"mesh {mesh}, "
      f"batch {check['global_batch_size']} x {check['seq_len']}, remat={check['remat']}, "
      f"microbatches={check['microbatches']}"
      + (f", {check['mesh']['stage']} stages x {check['repeats']} repeats, "
         f"{check['pipeline_microbatches']} pipeline microbatches" if check["mesh"]["stage"] > 1
         else "") + ": shardings consistent, compiled",
      f"  {'per device':<38} {'compiled':>14} {'planned':>14}",
      f"  {'FLOPs (loop bodies counted once)':<38} {c['flops']:>14.4g} "
      + (f"{p['flops_as_xla_counts']:>14.4g}" if p["flops_as_xla_counts"] is not None
         else f"{'n/a (pipeline)':>14}"),
      f"  {'params + optimizer + batch (arguments)':<38} {c['argument_bytes']:>14,} "
      f"{mem['params'] + mem['optimizer'] + mem['batch']:>14,}",
      f"  {'peak bytes (args + temps, donated)':<38} {c['peak_bytes']:>14,} {mem['total']:>14,}",
      "  (planned as this backend runs it: materialized 'xla' attention, no GPU workspace and, "
      "on CPU, float32 activations; tolerance: docs/planner.md)",
  ]
  return "\n".join(rows)
