"""Reading a run directory for inference: its config, the params of one checkpoint, its tokenizer.

Evaluation, sampling and export need the model, not the optimizer, so only `state.params` of a
checkpoint (default: the latest good one) is restored (orbax partial restore), directly into the
mesh's shardings. A workdir written by `convert from-hf` holds a params-only checkpoint and the HF
tokenizer files; one written by `train` holds full train states and tokenizer.model.

Every reader checks before it restores, and says what is wrong in one line: the config is the one
the checkpoint was written with (its `config` item; WORKDIR/config.json only for checkpoints without
one) plus the command's overrides, the array shapes it describes must be the checkpoint's, and the
tokenizer it would read must be the one the checkpoint records. The mesh is fitted to the devices
present, so a run trained with mesh.tensor=2 or mesh.expert=2 on 8 devices reads on 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
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
  """WORKDIR/config.json (the last accepted config of a run)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{path} not found: --workdir must be a directory written by `mai-jax train` "
                      f"or `mai-jax convert from-hf`")
  return config_lib.load_json(path)


def choose_step(workdir: str, step: Optional[int] = None) -> int:
  """`step` if it is a good checkpoint of the workdir, else (None) the newest good one. Only the
  chosen step's manifest is verified (a run's older checkpoints are not read)."""
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
  if not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir}: no such directory")
  steps = sorted((int(n) for n in (os.listdir(directory) if os.path.isdir(directory) else ())
                  if n.isdigit()), reverse=True)
  for candidate in steps if step is None else [step] if step in steps else []:
    if checkpoint_lib.verify_step(os.path.join(directory, str(candidate)))[0] != "corrupt":
      return candidate
  good = checkpoint_lib.good_steps(directory) if steps else []
  if not good and not os.path.isfile(os.path.join(workdir, "config.json")):
    raise ConfigError(f"--workdir {workdir} holds no config.json and no checkpoint: pass a "
                      f"directory written by `mai-jax train` or `mai-jax convert from-hf`")
  if not good:
    raise ConfigError(f"no restorable checkpoint in {directory}: train first (`mai-jax train`) or "
                      f"import weights (`mai-jax convert from-hf`); `mai-jax checkpoints --workdir "
                      f"{workdir}` says why")
  raise ConfigError(f"--step {step} is not a good checkpoint in {directory}; good steps: "
                    f"{', '.join(map(str, good))}")


def checkpoint_config(workdir: str, step: int,
                      overrides: Optional[dict[str, str]] = None) -> Config:
  """The config checkpoint `step` was written with (WORKDIR/config.json for a checkpoint that
  holds none), with the command's --config overrides applied, validated."""
  stored = checkpoint_lib.stored_json(os.path.join(workdir, CHECKPOINTS), step, "config")
  cfg = config_lib.from_dict(stored) if stored is not None else load_config(workdir)
  cfg = config_lib.apply_overrides(cfg, overrides or {})
  config_lib.validate(cfg)
  return cfg


def fit_mesh(cfg: Config, num_devices: Optional[int] = None) -> Config:
  """`cfg` with a mesh that fits `num_devices` (default: the devices present). The run's own mesh
  when it fits; else tensor and expert shrink to the largest sizes that divide the device count
  (and the experts), data and stage to 1, and fsdp takes the rest. A reader's layout changes no result."""
  n = jax.device_count() if num_devices is None else num_devices
  try:
    config_lib.mesh_shape(cfg.mesh, n)
    config_lib.validate(cfg, n)
    return cfg
  except ConfigError:
    pass
  tensor = math.gcd(cfg.mesh.tensor, n)
  expert = math.gcd(cfg.mesh.expert, n // tensor)
  if cfg.model.num_experts:
    expert = math.gcd(expert, cfg.model.num_experts)
  # No pipeline stages for reading: stage=1 needs no microbatch split of the reader's batches.
  mesh = dataclasses.replace(cfg.mesh, data=1, stage=1, fsdp=-1, expert=expert, tensor=tensor)
  fitted = dataclasses.replace(cfg, mesh=mesh)
  try:
    config_lib.validate(fitted, n)
  except ConfigError as e:
    raise ConfigError(f"the run's mesh does not fit the {n} device(s) here and neither does "
                      f"data=1, fsdp=-1, expert={expert}, tensor={tensor} ({e}); pass "
                      f"--config.mesh.* sizes that fit") from None
  if jax.process_index() == 0:
    print(f"mai-jax: the run's mesh (data={cfg.mesh.data}, fsdp={cfg.mesh.fsdp}, expert="
          f"{cfg.mesh.expert}, tensor={cfg.mesh.tensor}) does not fit the {n} device(s) here; "
          f"reading with data=1, fsdp=-1, expert={expert}, tensor={tensor}", file=sys.stderr,
          flush=True)
  return fitted


def abstract_params(cfg: Config, mesh: jax.sharding.Mesh):
  """(ModelSpec, params as ShapeDtypeStructs carrying this mesh's shardings); nothing allocated."""
  spec, abstract, logical = state_lib.abstract_model(lambda r: Decoder(cfg.model, rngs=r))
  shardings = state_lib.param_shardings(mesh, cfg.mesh.rules, abstract, logical)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  return spec, target


def check_shapes(cfg: Config, workdir: str, step: int, target) -> None:
  """One line naming the first parameter whose shape differs between checkpoint and config."""
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
  mismatch = checkpoint_lib.params_shape_mismatch(directory, step, target)
  if mismatch is None:
    return
  key, have, want = mismatch
  stored = checkpoint_lib.stored_json(directory, step, "config")
  hint = ""
  if stored is not None:
    mine = json.loads(config_lib.to_json(cfg))["model"]
    changed = [f"model.{k}={v!r} (here {mine.get(k)!r})"
               for k, v in stored.get("model", {}).items() if mine.get(k) != v]
    hint = f"; it was written with {', '.join(changed[:4])}" if changed else ""
  raise ConfigError(f"checkpoint step {step} in {directory} holds params/{key} of shape {have}, "
                    f"but the config gives {want}{hint}: drop the --config.model.* overrides "
                    f"that change it")


def load_params(cfg: Config, workdir: str, mesh: jax.sharding.Mesh, step: Optional[int] = None):
  """(step, ModelSpec, params) of checkpoint `step` (default: the latest good one), sharded over
  `mesh`; the shapes are checked first (one-line ConfigError)."""
  step = choose_step(workdir, step)
  spec, target = abstract_params(cfg, mesh)
  check_shapes(cfg, workdir, step, target)
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
  return step, spec, checkpoint_lib.restore_params(directory, step, target)


def check_tokenizer(cfg: Config, workdir: str, step: int) -> None:
  """The tokenizer a reader would use must be the one checkpoint `step` was trained with (its
  metadata, else WORKDIR/tokenizer_record.json); other ids for the same text give wrong losses
  and garbage samples, so a mismatch is an error. Nothing recorded (imported weights): no check."""
  from mai_jax.data.tokenizer import RECORD_FILE

  metadata = checkpoint_lib.stored_json(os.path.join(workdir, CHECKPOINTS), step, "metadata") or {}
  want = metadata.get("tokenizer") or {}
  record = os.path.join(workdir, RECORD_FILE)
  if not want.get("sha256") and os.path.isfile(record):
    with open(record) as f:
      want = json.load(f)
  if not want.get("sha256"):
    return
  try:
    tokenizer = load_tokenizer(cfg, workdir)
  except ConfigError:
    return  # no tokenizer at all: the reader that needs one says so
  if tokenizer.content_hash != want["sha256"]:
    raise ConfigError(
        f"checkpoint step {step} in {workdir} was trained with tokenizer {want.get('path')} "
        f"(sha256 {want['sha256'][:12]}) but this command reads {tokenizer.path} (sha256 "
        f"{tokenizer.content_hash[:12]}): token ids would not match the weights; drop "
        f"--config.data.tokenizer_path or point it at the run's tokenizer")


def open_checkpoint(workdir: str, step: Optional[int] = None,
                    overrides: Optional[dict[str, str]] = None) -> tuple[Config, int]:
  """(config, step) a reader uses: the checkpoint's config with `overrides` and a mesh fitted to
  the devices present, tokenizer checked."""
  step = choose_step(workdir, step)
  cfg = fit_mesh(checkpoint_config(workdir, step, overrides))
  check_tokenizer(cfg, workdir, step)
  return cfg, step


def export_params(workdir: str, out: str, step: Optional[int] = None) -> int:
  """Writes the parameters of checkpoint `step` (default: the latest good one) of `workdir` as a
  new workdir `out`: config.json (the checkpoint's config), a params-only checkpoint (about a
  third of a training checkpoint with AdamW's two float32 moments) and the tokenizer files and
  record. `eval`, `sample` and `convert to-hf` read it like any workdir."""
  if os.path.exists(os.path.join(out, CHECKPOINTS)):
    raise ConfigError(f"{out}/{CHECKPOINTS} already exists; pass a new --export-params directory")
  cfg, step = open_checkpoint(workdir, step)
  _, _, params = load_params(cfg, workdir, sharding_lib.make_mesh(cfg.mesh), step)
  metadata = checkpoint_lib.stored_json(os.path.join(workdir, CHECKPOINTS), step, "metadata") or {}
  record = {"exported_from": os.path.abspath(workdir), "step": step}
  if "tokenizer" in metadata:
    record["tokenizer"] = metadata["tokenizer"]
  written = checkpoint_config(workdir, step)  # the run's own mesh, not the one fitted here
  checkpoint_lib.save_params(os.path.join(out, CHECKPOINTS), step, params,
                             config_lib.to_dict(written), record)
  if jax.process_index() == 0:
    with open(os.path.join(out, "config.json"), "w") as f:
      f.write(config_lib.to_json(written))
    for name in os.listdir(workdir):
      if name.startswith("tokenizer") and os.path.isfile(os.path.join(workdir, name)):
        shutil.copy2(os.path.join(workdir, name), os.path.join(out, name))
  return step


def load_model(workdir: str, mesh: Optional[jax.sharding.Mesh] = None,
               cfg: Optional[Config] = None,
               step: Optional[int] = None) -> tuple[Config, nnx.Module, int, jax.sharding.Mesh]:
  """(config, Decoder with the params of checkpoint `step` (default: the latest good one), step,
  mesh). Without `cfg`, the checkpoint's own config with a mesh fitted to the devices present."""
  if cfg is None:
    cfg, step = open_checkpoint(workdir, step)
  else:
    step = choose_step(workdir, step)
    check_tokenizer(cfg, workdir, step)
  mesh = mesh if mesh is not None else sharding_lib.make_mesh(cfg.mesh)
  step, spec, params = load_params(cfg, workdir, mesh, step)
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
