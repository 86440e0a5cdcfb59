"""Weights a train step holds without training them (distillation's online teacher, DPO's online
reference): a workdir's step restored into this run's abstract params, on first use, so building
a trainer reads nothing. Trainer binds `.params` as the jitted step's extra argument, sharded by
`.shardings`."""

from __future__ import annotations

import functools
from typing import Any

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
