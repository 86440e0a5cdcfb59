"""Weights a train step holds without training them (distillation's online teacher, DPO's online
reference): a workdir's step restored into this run's abstract params, on first use, so building
a trainer reads nothing. Trainer binds `.params` as the jitted step's extra argument, sharded by
`.shardings`."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax

from mai_jax.train import init_from as init_from_lib


class FrozenWeights:
  """Subclasses set `source` (an init_from.InitSource) and `abstract_params`."""

  source: init_from_lib.InitSource
  abstract_params: Any

  @functools.cached_property
  def params(self) -> Any:
    return init_from_lib.restore_params(self.source, self.abstract_params)

  @property
  def shardings(self) -> Any:
    return jax.tree.map(lambda a: a.sharding, self.abstract_params)


def bind(fn: Callable, frozen: Optional[FrozenWeights]) -> Callable:
  """fn(first, batch, frozen params) as fn(first, batch) (the params restored now); `fn` itself
  without frozen weights."""
  if frozen is None:
    return fn
  params = frozen.params
  return lambda first, batch: fn(first, batch, params)


def extra_shardings(frozen: Optional[FrozenWeights]) -> tuple:
  """The jitted step's `extra_shardings` for `bind`'s extra argument."""
  return (frozen.shardings,) if frozen is not None else ()
