"""Checkpoints through orbax's CheckpointManager: async, sharded, atomic.

One checkpoint step holds four items: `state` (the TrainState pytree, each process writing its own
shards), `data` (the grain iterator state, one file per process), `config` (the resolved config as
JSON) and `metadata` (versions, mesh, process count, tokenizer hash). Orbax writes into a temporary
directory and renames it when every item is finalized, so a crash mid-save never leaves a step that
`latest_step()` would pick. Restoring into an abstract state whose leaves carry *new* shardings
reshards on the fly: a checkpoint from one mesh loads onto another.

This module stores pytrees; it never imports model classes.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import grain
import orbax.checkpoint as ocp

from mai_jax.config import CheckpointConfig


class Checkpointer:
  """Saves and restores train state + data iterator state under WORKDIR/checkpoints."""

  def __init__(self, directory: str, cfg: CheckpointConfig):
    self.directory = os.path.abspath(directory)
    self.cfg = cfg
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.max_to_keep,
        enable_async_checkpointing=cfg.async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
            "metadata": ocp.JsonCheckpointHandler(),
        })

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

  def save(self, step: int, state: Any, data_iterator: Any, config: dict,
           metadata: dict) -> None:
    """Starts a save of `step` (async when configured); returns once the state is copied off the
    devices, so the caller may donate/overwrite `state` right away."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config),
        metadata=ocp.args.JsonSave(metadata),
    )
    self._manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """Restores `step` into `abstract_state`'s shapes and shardings; `data_iterator` is set in place."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
    ))
    return restored["state"]

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params(directory: str, step: int, abstract_params: Any) -> Any:
  """Restores only `state.params` of checkpoint `step` into `abstract_params`' shapes/shardings.

  Evaluation and sampling need no optimizer state, so they never build or read it: orbax's
  partial restore reads the params subtree alone, from a training checkpoint (a full TrainState)
  or from a params-only one written by `save_params`.
  """
  manager = ocp.CheckpointManager(os.path.abspath(directory),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  target = {"params": abstract_params}
  args = ocp.args.PyTreeRestore(target, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  try:
    return manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]
  finally:
    manager.close()


def save_params(directory: str, step: int, params: Any, config: dict, metadata: dict) -> None:
  """Writes a params-only checkpoint (item `state` = {'params': ...}), e.g. imported weights;
  `restore_params` reads it. Synchronous: returns once it is on disk."""
  manager = ocp.CheckpointManager(
      os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "config": ocp.JsonCheckpointHandler(),
                     "metadata": ocp.JsonCheckpointHandler()})
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params}),
                                             config=ocp.args.JsonSave(config),
                                             metadata=ocp.args.JsonSave(metadata)), force=True)
  manager.wait_until_finished()
  manager.close()


def latest_step(directory: str) -> Optional[int]:
  """The newest finalized step under `directory`, or None (no manager with write options)."""
  if not os.path.isdir(directory):
    return None
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  try:
    return manager.latest_step()
  finally:
    manager.close()
