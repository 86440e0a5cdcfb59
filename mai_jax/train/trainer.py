"""`Trainer`: everything derived from (config, mesh) that a training run needs before its loop.

The loop, the step benchmark, notebooks and tests all need the same chain: schedule and optimizer,
the abstract model and its shardings, a sharded initial state, the batch sharding and the jitted
steps. Building it in one place keeps them from drifting apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mai_jax import optim
from mai_jax.config import Config
from mai_jax.model import Decoder
from mai_jax.train import distill, distill_teacher, frozen, reference
from mai_jax.train import state as state_lib
from mai_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Trainer:
  cfg: Config
  mesh: Mesh
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  layout: state_lib.StateLayout
  batch_sharding: NamedSharding
  model_factory: Callable[[nnx.Rngs], nnx.Module]
  # A frozen model the step runs besides the trained one, its params the jitted step's extra
  # argument: distillation's online teacher (train.distill_teacher) or DPO's online reference
  # (train.dpo_reference='online', train/reference.py: it completes the batches itself with
  # `.prepare_batch`). Both have `.params` (restored on first use) and `.shardings`.
  frozen: Optional[Any] = None

  @property
  def teacher(self) -> Optional[distill_teacher.Teacher]:
    """The online teacher of a distillation run, or None."""
    return self.frozen if self.cfg.train.objective == "distill" else None

  def init_state(self) -> state_lib.TrainState:
    """A fresh TrainState, born in its shardings."""
    return state_lib.init_train_state(self.cfg, self.mesh, self.model_factory, self.tx,
                                      self.layout)

  def init_state_from_params(self, params: state_lib.Params) -> state_lib.TrainState:
    """A TrainState at step 0 with these params (in `abstract_state().params`' shardings) and a
    fresh optimizer state: the start of a fine-tuning run (train.init_from)."""
    return state_lib.init_train_state_from_params(self.cfg, self.mesh, self.tx, self.layout,
                                                  params)

  def abstract_state(self) -> state_lib.TrainState:
    """The restore target for a checkpoint (carries this mesh's shardings)."""
    return self.layout.abstract_state(self.tx)

  def jit_train_step(self) -> Callable:
    """step(state, batch) -> (state, metrics), jitted. Distillation completes the batch inside the
    step; a frozen model's params are the jitted function's third argument, bound here (and
    restored on this first call)."""
    if self.cfg.train.objective == "distill":
      prepare = distill.make_prepare_batch(self.cfg, self.teacher)
    else:
      prepare = self.frozen.prepare_batch if self.frozen is not None else None
    step = step_lib.jit_train_step(
        step_lib.make_train_step(self.cfg, self.layout.model_spec, self.tx, self.schedule,
                                 prepare),
        self.layout.shardings, self.batch_sharding, step_lib.batch_keys(self.cfg),
        frozen.extra_shardings(self.frozen))
    return frozen.bind(step, self.frozen)

  def jit_eval_step(self) -> Callable:
    """eval(params, batch) -> (loss sum, count); DPO's online reference scores each batch first
    (a distillation teacher takes no part: its runs are scored by the CE)."""
    reference = self.frozen if self.teacher is None else None
    fn = step_lib.jit_eval_step(
        step_lib.make_eval_step(self.cfg, self.layout.model_spec,
                                reference.prepare_batch if reference is not None else None),
        self.layout.shardings.params, self.batch_sharding, step_lib.batch_keys(self.cfg),
        frozen.extra_shardings(reference))
    return frozen.bind(fn, reference)


def build_trainer(cfg: Config, mesh: Mesh, num_steps: Optional[int] = None) -> Trainer:
  """`num_steps` sets the schedule's length (default: train.num_steps). A distillation run's
  online teacher is checked here (reads only); DPO's online reference is read on first use."""
  steps = cfg.train.num_steps if num_steps is None else num_steps
  tx = optim.make_optimizer(cfg.optim, steps)
  factory = lambda rngs: Decoder(cfg.model, rngs=rngs)  # noqa: E731
  layout = state_lib.make_layout(cfg, mesh, factory, tx)
  return Trainer(cfg=cfg, mesh=mesh, tx=tx, schedule=optim.make_schedule(cfg.optim, steps),
                 layout=layout, batch_sharding=step_lib.batch_sharding(mesh, cfg),
                 model_factory=factory,
                 frozen=distill_teacher.for_run(cfg, mesh) or reference.for_run(cfg, mesh))
