"""Parameters-only export: a directory that eval, sampling and conversion load without ever
building optimizer state (a third of the checkpoint's size with Adam's two moments in float32).

  OUT/config.json   the run's resolved config
  OUT/params/       orbax checkpoint of the parameter pytree (sharded on load like training)
  OUT/<tokenizer>   the tokenizer file the run trained with
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import jax

from mai_jax import checkpoint as checkpoint_lib
from mai_jax import config as config_lib
from mai_jax import sharding as sharding_lib
from mai_jax.train.trainer import build_trainer

PARAMS_DIR = "params"


def abstract_params(cfg: config_lib.Config, mesh) -> Any:
  """The parameter tree as ShapeDtypeStructs carrying this mesh's shardings (nothing allocated)."""
  layout = build_trainer(cfg, mesh).layout
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      layout.abstract_params, layout.shardings.params)


def export_params(workdir: str, out: str, step: Optional[int] = None) -> int:
  """Writes the parameters of `step` (default: the latest good one) of `workdir` to `out`."""
  cfg = config_lib.load_json(os.path.join(workdir, "config.json"))
  checkpoints = os.path.join(workdir, "checkpoints")
  good = [s.step for s in checkpoint_lib.list_checkpoints(checkpoints)
          if s.status in ("ok", "unverified") and s.name.isdigit()]
  if not good:
    raise config_lib.ConfigError(f"{checkpoints} holds no restorable checkpoint; run "
                                 f"`mai-jax checkpoints --workdir {workdir}` to see why")
  step = max(good) if step is None else step
  if step not in good:
    raise config_lib.ConfigError(f"--step {step} is not a good checkpoint in {checkpoints}; "
                                 f"good steps: {', '.join(map(str, sorted(good)))}")
  if os.path.exists(os.path.join(out, PARAMS_DIR)):
    raise config_lib.ConfigError(f"{out}/{PARAMS_DIR} already exists; pass an empty --out")
  mesh = sharding_lib.make_mesh(cfg.mesh)
  checkpointer = checkpoint_lib.Checkpointer(checkpoints, cfg.checkpoint)
  try:
    params = checkpointer.restore_params(step, abstract_params(cfg, mesh))
  finally:
    checkpointer.close()
  os.makedirs(out, exist_ok=True)
  checkpoint_lib.save_params(os.path.join(os.path.abspath(out), PARAMS_DIR), params)
  if jax.process_index() == 0:
    with open(os.path.join(out, "config.json"), "w") as f:
      f.write(config_lib.to_json(cfg))
    with open(os.path.join(out, "export.json"), "w") as f:
      json.dump({"source_workdir": os.path.abspath(workdir), "step": step}, f)
    for name in os.listdir(workdir):
      if name.startswith("tokenizer") and os.path.isfile(os.path.join(workdir, name)):
        shutil.copy2(os.path.join(workdir, name), os.path.join(out, name))
  return step


def load_params(directory: str, cfg: config_lib.Config, mesh) -> Any:
  """Parameters from an export directory, in this mesh's shardings."""
  return checkpoint_lib.restore_params_subtree(
      os.path.join(os.path.abspath(directory), PARAMS_DIR), abstract_params(cfg, mesh), key=None)
