"""Device mesh and logical-axis sharding.

The model names logical axes only ('batch', 'embed', 'mlp', ...); the rules in `MeshConfig` map them
to the mesh axes ('data', 'stage', 'fsdp', 'expert', 'tensor'). The same functions serve 1 device,
8 fake CPU devices and a multi-host pod: only the device list differs.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mai_jax.config import MESH_AXES, ConfigError, MeshConfig, mesh_shape

Rules = Sequence[tuple[str, Sequence[str]]]
LogicalAxes = Sequence[Optional[str]]


def make_mesh(mesh_cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds the ('data','stage','fsdp','expert','tensor') mesh with Auto axis types on all devices.

  Multi-host, this is the hybrid layout: jax orders devices by process, and the mesh axes run outer
  to inner, so `tensor` (then `expert`, then the part of `fsdp` that fits) stays inside one node on
  NVLink while the rest spans nodes (pipeline `stage`s and `data` outermost). A `tensor` axis
  larger than a node would put its per-layer all-reduces on the slow links, so it is refused.
  """
  devices = list(devices) if devices is not None else jax.devices()
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)
  _check_tensor_within_process(mesh)
  return mesh


def _check_tensor_within_process(mesh: Mesh) -> None:
  processes = np.vectorize(lambda d: d.process_index)(mesh.devices)
  if not (processes == processes[..., :1]).all():
    per_process = mesh.devices.size // len(np.unique(processes))
    raise ConfigError(f"mesh.tensor={mesh.shape['tensor']} spans several processes (hosts); tensor "
                      f"parallelism all-reduces every layer and needs the intra-node links: keep "
                      f"mesh.tensor <= {per_process} devices per process")


def logical_to_spec(logical: LogicalAxes, rules: Rules, mesh: Optional[Mesh] = None,
                    shape: Optional[Sequence[int]] = None) -> PartitionSpec:
  """Translates logical axis names to a mesh PartitionSpec.

  Each mesh axis is used at most once per array: the earliest dimension that asks for it wins, so
  activations ('batch','seq','embed') shard batch over fsdp while parameters ('embed','mlp') shard
  embed over fsdp. Given `mesh` and `shape`, axes of size 1 are dropped and a dimension that the
  mesh axes do not divide stays replicated along them (e.g. a batch of 1 when sampling).
  """
  table = {name: tuple(axes) for name, axes in rules}
  used: set[str] = set()
  out = []
  for dim, name in enumerate(logical):
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no rule; add it to mesh.rules "
                     f"(known: {', '.join(table)})")
    axes = [a for a in table[name] if a not in used]
    if mesh is not None:
      axes = [a for a in axes if mesh.shape[a] > 1]
      if shape is not None:
        while axes and shape[dim] % math.prod(mesh.shape[a] for a in axes):
          axes.pop()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*out)


def named_sharding(mesh: Mesh, rules: Rules, logical: LogicalAxes,
                   shape: Optional[Sequence[int]] = None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical, rules, mesh, shape))


# Rules used by `shard_act` inside traced model code; set with `use_rules` next to `jax.set_mesh`.
_active = threading.local()


# The residual stream's sequence dimension ([B, T, D] between sub-layers, model/transformer.py
# RESIDUAL, and the pipeline's stage buffers). Not a key of mesh.rules: its rule is derived from
# 'seq' and model.sequence_parallel by `residual_rules`.
RESIDUAL_SEQ = "residual_seq"


def residual_rules(rules: Rules, sequence_parallel: bool) -> tuple:
  """`rules` with the derived 'residual_seq' rule: the 'seq' axes, and with sequence parallelism
  also the axes 'heads' maps to ('tensor' by default; Megatron-LM's sequence parallelism,
  Korthikanti et al. 2022).

  Attention and the MLP need the whole sequence on every tensor rank (heads / mlp are split
  instead), but between sub-layers each token is independent, so the residual (and the norms,
  the residual adds, the saved scan carry, the pipeline sends) can be split over the tensor ranks:
  the partitioner then turns each sub-layer's output all-reduce over 'tensor' into a
  reduce-scatter and its input into an all-gather (the same bytes) and every D-sized activation
  shrinks by the tensor size. Off, 'residual_seq' is exactly 'seq', so nothing changes.
  """
  rules = tuple((name, tuple(axes)) for name, axes in rules if name != RESIDUAL_SEQ)
  table = dict(rules)
  seq = table.get("seq", ())
  extra = tuple(a for a in table.get("heads", ()) if a not in seq) if sequence_parallel else ()
  return rules + ((RESIDUAL_SEQ, seq + extra),)


@contextlib.contextmanager
def use_rules(rules: Rules):
  """Makes `rules` the logical-axis rules for `shard_act` within the block ('residual_seq', when
  `rules` lack it, derived without sequence parallelism; see `residual_rules`)."""
  previous = getattr(_active, "rules", None)
  rules = tuple((name, tuple(axes)) for name, axes in rules)
  _active.rules = rules if RESIDUAL_SEQ in dict(rules) else residual_rules(rules, False)
  try:
    yield
  finally:
    _active.rules = previous


def active_rules() -> Optional[tuple]:
  """The rules set by `use_rules` for the code being traced (None outside)."""
  return getattr(_active, "rules", None)


@contextlib.contextmanager
def sequence_parallelism(on: bool):
  """Within the block, the residual's 'residual_seq' axis is (on) or is not split over the axes
  'heads' maps to; the model sets it from model.sequence_parallel. No-op outside `use_rules`."""
  rules = active_rules()
  if rules is None:
    yield
    return
  with use_rules(residual_rules(rules, on)):
    yield


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
  """Sets the mesh and the rules for everything traced within the block."""
  with jax.set_mesh(mesh), use_rules(rules):
    yield


def shard_act(x: jax.Array, logical: LogicalAxes) -> jax.Array:
  """Constrains activation `x` to the sharding its logical axes map to (no-op without a mesh)."""
  rules = getattr(_active, "rules", None)
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh is None or mesh.empty:
    return x
  if len(logical) != x.ndim:
    raise ValueError(f"shard_act: logical axes {tuple(logical)} do not match shape {x.shape}")
  spec = logical_to_spec(logical, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, spec)
