"""Reading a run directory for inference: its config, the latest params and its tokenizer.

Evaluation, sampling and export need the model, not the optimizer, so only `state.params` of the
latest checkpoint is restored (orbax partial restore), directly into the mesh's shardings. A workdir
written by `convert from-hf` holds a params-only checkpoint and the HF tokenizer files; one written
by `train` holds full train states and tokenizer.model.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import jax
from flax import nnx

from mai_jax import checkpoint as checkpoint_lib
from mai_jax import config as config_lib
from mai_jax import sharding as sharding_lib
from mai_jax.config import Config, ConfigError
from mai_jax.model import Decoder
from mai_jax.train import state as state_lib

CHECKPOINTS = "checkpoints"
HF_TOKENIZER_FILE = "tokenizer.json"


def load_config(workdir: str) -> Config:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{path} not found: --workdir must be a directory written by `mai-jax train` "
                      f"or `mai-jax convert from-hf`")
  return config_lib.load_json(path)


def abstract_params(cfg: Config, mesh: jax.sharding.Mesh):
  """(ModelSpec, params as ShapeDtypeStructs carrying this mesh's shardings); nothing allocated."""
  spec, abstract, logical = state_lib.abstract_model(lambda r: Decoder(cfg.model, rngs=r))
  shardings = state_lib.param_shardings(mesh, cfg.mesh.rules, abstract, logical)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  return spec, target


def load_params(cfg: Config, workdir: str, mesh: jax.sharding.Mesh, step: Optional[int] = None):
  """(step, ModelSpec, params) of checkpoint `step` (default: the latest), sharded over `mesh`."""
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
  step = checkpoint_lib.latest_step(directory) if step is None else step
  if step is None:
    raise ConfigError(f"no checkpoint in {directory}: train first (`mai-jax train`) or import "
                      f"weights (`mai-jax convert from-hf`)")
  spec, target = abstract_params(cfg, mesh)
  return step, spec, checkpoint_lib.restore_params(directory, step, target)


def export_params(workdir: str, out: str, step: Optional[int] = None) -> int:
  """Writes the parameters of checkpoint `step` (default: the latest good one) of `workdir` as a
  new workdir `out`: config.json, a params-only checkpoint (about a third of a training checkpoint
  with AdamW's two float32 moments) and the tokenizer files. `eval`, `sample` and `convert to-hf`
  read it like any workdir."""
  checkpoints = os.path.join(workdir, CHECKPOINTS)
  good = checkpoint_lib.good_steps(checkpoints)
  if not good:
    raise ConfigError(f"{checkpoints} holds no restorable checkpoint; run "
                      f"`mai-jax checkpoints --workdir {workdir}` to see why")
  step = good[-1] if step is None else step
  if step not in good:
    raise ConfigError(f"--step {step} is not a good checkpoint in {checkpoints}; good steps: "
                      f"{', '.join(map(str, good))}")
  if os.path.exists(os.path.join(out, CHECKPOINTS)):
    raise ConfigError(f"{out}/{CHECKPOINTS} already exists; pass a new --export-params directory")
  cfg = load_config(workdir)
  _, _, params = load_params(cfg, workdir, sharding_lib.make_mesh(cfg.mesh), step)
  checkpoint_lib.save_params(os.path.join(out, CHECKPOINTS), step, params,
                             config_lib.to_dict(cfg),
                             {"exported_from": os.path.abspath(workdir), "step": step})
  if jax.process_index() == 0:
    for name in os.listdir(workdir):
      if name == "config.json" or (name.startswith("tokenizer")
                                   and os.path.isfile(os.path.join(workdir, name))):
        shutil.copy2(os.path.join(workdir, name), os.path.join(out, name))
  return step


def load_model(workdir: str, mesh: Optional[jax.sharding.Mesh] = None,
               cfg: Optional[Config] = None) -> tuple[Config, nnx.Module, int, jax.sharding.Mesh]:
  """(config, Decoder with the latest params, step, mesh)."""
  cfg = cfg or load_config(workdir)
  mesh = mesh if mesh is not None else sharding_lib.make_mesh(cfg.mesh)
  step, spec, params = load_params(cfg, workdir, mesh)
  return cfg, spec.merge(params), step, mesh


def load_tokenizer(cfg: Config, workdir: str):
  """The run's tokenizer: data.tokenizer_path, else WORKDIR/tokenizer.model (trained by the run),
  else WORKDIR/tokenizer.json (a Hugging Face tokenizer imported with the weights)."""
  from mai_jax.data.tokenizer import TOKENIZER_FILE, load_tokenizer as load_file

  if cfg.data.tokenizer_path:
    return load_file(cfg.data.tokenizer_path, cfg.data.tokenizer_pattern)
  for name in (TOKENIZER_FILE, HF_TOKENIZER_FILE):
    if os.path.isfile(os.path.join(workdir, name)):
      return load_file(os.path.join(workdir, name))
  raise ConfigError(f"no tokenizer in {workdir} ({TOKENIZER_FILE} or {HF_TOKENIZER_FILE}) and "
                    f"data.tokenizer_path is empty")
