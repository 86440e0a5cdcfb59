"""Train state, born sharded.

Why this shape: the model is created abstractly (`nnx.eval_shape`, no memory), its parameters' logical
axis names are translated into mesh shardings by the config's rules, and one jitted init with those
`out_shardings` materializes each shard on its own device. No host ever holds the whole model, which
is what lets the same code start a 500B run. Parameters live in the state as a plain nested dict (the
NNX graph definition is kept outside), so optax, orbax and `jax.tree` see an ordinary pytree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mai_jax import sharding as sharding_lib
from mai_jax.config import Config

Params = dict[str, Any]


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: step counter, parameters, optimizer state, RNG key."""
  step: jax.Array
  params: Params
  opt_state: optax.OptState
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the pure step functions need to rebuild the NNX model from a params dict."""
  graphdef: Any
  abstract_state: Any  # nnx.State of ShapeDtypeStructs, the template for `replace_by_pure_dict`

  def merge(self, params: Params) -> nnx.Module:
    state = jax.tree.map(lambda x: x, self.abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)


def abstract_model(model_factory: Callable[[nnx.Rngs], nnx.Module]):
  """Returns (ModelSpec, abstract params dict, logical PartitionSpecs dict) without allocating."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: model_factory(nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(state))
  return ModelSpec(graphdef, state), nnx.to_pure_dict(state), logical


def param_shardings(mesh: Mesh, rules, abstract_params: Params, logical: Params) -> Params:
  """Mesh NamedShardings for each parameter from its logical PartitionSpec."""
  def one(shape_dtype, spec):
    names = tuple(spec) if isinstance(spec, PartitionSpec) else (None,) * len(shape_dtype.shape)
    names = names + (None,) * (len(shape_dtype.shape) - len(names))
    return sharding_lib.named_sharding(mesh, rules, names, shape_dtype.shape)
  return jax.tree.map(one, abstract_params, logical,
                      is_leaf=lambda x: isinstance(x, (PartitionSpec, jax.ShapeDtypeStruct)))


def zero1_sharding(sharding: NamedSharding, shape) -> NamedSharding:
  """`sharding` with 'data' added to the first dimension it splits evenly (and does not already
  use): a parameter's optimizer moment under ZeRO-1, so each data-parallel replica keeps 1/data
  of it while the parameter itself stays replicated over 'data'. Unchanged if no dim divides."""
  spec = zero1_spec(tuple(sharding.spec), shape, dict(sharding.mesh.shape))
  return sharding if spec is None else NamedSharding(sharding.mesh, PartitionSpec(*spec))


def zero1_spec(spec: tuple, shape, axis_sizes: dict) -> Optional[tuple]:
  """zero1_sharding on plain values (the planner counts moment shards with it, no mesh needed):
  the spec entries with 'data' prepended to the first dim it divides, or None if unchanged."""
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  data = axis_sizes.get("data", 1)
  used = {a for entry in spec for a in ((entry,) if isinstance(entry, str) else entry or ())}
  if data == 1 or "data" in used:
    return None
  for i, entry in enumerate(spec):
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    if shape[i] % (data * int(np.prod([axis_sizes[a] for a in axes]))) == 0:
      return spec[:i] + (("data",) + axes,) + spec[i + 1:]
  return None


def state_shardings(mesh: Mesh, tx: optax.GradientTransformation, abstract_params: Params,
                    params_sharding: Params, zero1: bool = False) -> TrainState:
  """Shardings of the whole TrainState: optimizer moments follow their parameters (with `zero1`
  also split over 'data', see `zero1_sharding`)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  moments_sharding = params_sharding
  if zero1:
    moments_sharding = jax.tree.map(lambda s, p: zero1_sharding(s, p.shape), params_sharding,
                                    abstract_params)
  opt_sharding = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, moments_sharding,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))
  return TrainState(step=replicated, params=params_sharding, opt_state=opt_sharding,
                    rng=replicated)


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """The abstract shape of training: model spec, parameter shapes and every leaf's sharding."""
  model_spec: ModelSpec
  abstract_params: Params
  shardings: TrainState

  def abstract_state(self, tx: optax.GradientTransformation) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings: orbax's restore target (a checkpoint from
    another mesh is resharded on restore because each leaf names the new sharding)."""
    shapes = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=self.abstract_params,
        opt_state=jax.eval_shape(tx.init, self.abstract_params),
        rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.shardings)


def make_layout(cfg: Config, mesh: Mesh, model_factory, tx: optax.GradientTransformation):
  spec, abstract_params, logical = abstract_model(model_factory)
  shardings = state_shardings(mesh, tx, abstract_params,
                              param_shardings(mesh, cfg.mesh.rules, abstract_params, logical),
                              zero1=cfg.mesh.zero1)
  return StateLayout(spec, abstract_params, shardings)


def init_train_state(cfg: Config, mesh: Mesh, model_factory, tx: optax.GradientTransformation,
                     layout: StateLayout) -> TrainState:
  """Materializes a fresh TrainState directly into its shardings (one jitted init)."""
  def init(seed):
    init_key, train_key = jax.random.split(jax.random.key(seed))
    with nnx.use_eager_sharding(False):
      model = model_factory(nnx.Rngs(params=init_key))
    return _state_at_step_0(nnx.to_pure_dict(nnx.state(model)), tx, train_key)

  with sharding_lib.activate(mesh, cfg.mesh.rules):
    return jax.jit(init, out_shardings=layout.shardings)(cfg.train.seed)


def init_train_state_from_params(cfg: Config, mesh: Mesh, tx: optax.GradientTransformation,
                                 layout: StateLayout, params: Params) -> TrainState:
  """A TrainState at step 0 around existing `params` (already in layout's shardings, e.g.
  restored from another run): a fresh optimizer state and the same training RNG as
  `init_train_state`, so only the weights differ from a random start. `params` is donated."""
  def init(params, seed):
    _, train_key = jax.random.split(jax.random.key(seed))
    return _state_at_step_0(params, tx, train_key)

  with sharding_lib.activate(mesh, cfg.mesh.rules):
    return jax.jit(init, in_shardings=(layout.shardings.params, None),
                   out_shardings=layout.shardings, donate_argnums=0)(params, cfg.train.seed)


def _state_at_step_0(params: Params, tx: optax.GradientTransformation, train_key) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(train_key))
