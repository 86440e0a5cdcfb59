"""Starting a run from existing weights (`train.init_from`): fine-tuning and continued pretraining.

A new run normally starts from a random init. With `train.init_from=W` its state is built the same
way (abstract shapes -> shardings -> one jitted init, never whole on one host) except that the
parameters are restored from W's checkpoint straight into this mesh's shardings (orbax reshards
when W was written on another mesh), and the optimizer state is fresh (zero moments, count 0), the
step 0 and the data stream at its start. W is a params-only workdir (`convert from-hf`,
`checkpoints --export-params`) or a training workdir (its latest good step; W/checkpoints/STEP
picks one); only `state.params` is read either way.

Why resume wins: a preempted fine-tuning job is restarted with the same command. Once the run has
checkpoints of its own, starting again from W would throw its progress away, so W is ignored then.

Why the tokenizer is W's: token ids must mean what they meant when the weights were trained. Unless
data.tokenizer_path names one, W's tokenizer files are copied into the run's workdir, where
`load_or_train_tokenizer` (and a resumed run) find them instead of training a new tokenizer.

Why the vocabulary may grow: a fine-tuning run adds its chat template's special tokens to the
tokenizer (train/template_vocab.py), after the existing ids. W's embedding (and unembedding) then
has fewer rows than the run's model: the old rows are restored unchanged and each new row starts
at the mean of the old ones (a new token starts out as an "average" token instead of a random
vector whose logit could dominate every prediction). Every other shape must match exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from mai_jax import checkpoint as checkpoint_lib
from mai_jax import config as config_lib
from mai_jax.config import Config, ConfigError, ModelConfig
from mai_jax.data.tokenizer import HF_TOKENIZER_FILE, RECORD_FILE, TOKENIZER_FILE, Tokenizer
from mai_jax.model import Decoder
from mai_jax.train import state as state_lib

CHECKPOINTS = "checkpoints"
# Model fields that change how the weights are stored, computed in or trained, not the function
# they compute (or that only seed a random init): differing values need no warning.
NUMERICS_ONLY_FIELDS = ("remat", "scan_layers", "attention_impl", "init_std", "param_dtype",
                        "compute_dtype", "router_z_loss_weight", "load_balance_loss_weight",
                        "router_bias_update_rate", "pipeline_repeats", "pipeline_microbatches",
                        "pipeline_gather_once", "attention_max_segments")
# Tokenizer files a workdir may hold (SentencePiece or Hugging Face, with the files that declare a
# HF tokenizer's special tokens); the two main ones are copied last, as the run looks for them.
_MAIN_TOKENIZER_FILES = (TOKENIZER_FILE, HF_TOKENIZER_FILE)
_TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json",
                         "generation_config.json")
_FIX = ("set it to a workdir written by `mai-jax train`, `mai-jax convert from-hf` or `mai-jax "
        "checkpoints --export-params` (or WORKDIR/checkpoints/STEP), or to '' for a random init")

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class InitSource:
  """A checked checkpoint to take the initial parameters from."""
  workdir: str
  step: int
  cfg: Config  # the source's config.json (its arrays are checked against the run's shapes)
  metadata: dict = dataclasses.field(default_factory=dict)  # the checkpoint's metadata item

  @property
  def checkpoints(self) -> str:
    return os.path.join(self.workdir, CHECKPOINTS)

  @property
  def params_only(self) -> bool:
    """A training checkpoint also holds the data iterator's state; a params-only one does not."""
    return not os.path.isdir(os.path.join(self.checkpoints, str(self.step), "data"))

  def describe(self) -> str:
    kind = "params-only" if self.params_only else "training"
    return f"{self.workdir} step {self.step} ({kind} checkpoint)"

  def record(self) -> dict:
    """What checkpoint metadata keeps about the run's origin."""
    return {"path": self.workdir, "step": self.step, "params_only": self.params_only}


def with_absolute_path(cfg: Config) -> Config:
  """`cfg` with train.init_from (and train.distill_teacher, another workdir of weights) absolute,
  so config.json names them whatever the cwd of a restart."""
  paths = {key: getattr(cfg.train, key) for key in ("init_from", "distill_teacher")}
  changes = {key: os.path.abspath(p) for key, p in paths.items() if p and not os.path.isabs(p)}
  if not changes:
    return cfg
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def source_for_run(cfg: Config, workdir: str, log: Log) -> Optional[InitSource]:
  """The checked weights a run in `workdir` starts from; None without train.init_from, or when
  the run has checkpoints of its own (it resumes from those; W need not even exist any more)."""
  if not cfg.train.init_from:
    return None
  own = checkpoint_lib.latest_step(os.path.join(workdir, CHECKPOINTS))
  if own is not None:
    log(f"mai-jax: {workdir} has checkpoints (latest step {own}): resuming from them; "
        f"train.init_from={cfg.train.init_from} is ignored")
    return None
  return prepare(cfg, log)


def prepare(cfg: Config, log: Log) -> InitSource:
  """Resolves train.init_from and checks it against the run's model: a shape mismatch is a
  ConfigError naming the parameter; a model config that differs otherwise is a loud warning."""
  source = resolve(cfg.train.init_from)
  differences = model_differences(cfg.model, source.cfg.model)
  grows = vocab_grows(cfg, source)
  if grows:
    differences = [d for d in differences if not d.startswith("vocab_size:")]
    log(f"mai-jax: the vocabulary grows from {source.cfg.model.vocab_size} to "
        f"{cfg.model.vocab_size} tokens: the embedding rows of train.init_from are kept and the "
        f"new rows start at their mean")
  model = dataclasses.replace(cfg.model, vocab_size=source.cfg.model.vocab_size) if grows else (
      cfg.model)
  abstract = state_lib.abstract_model(lambda rngs: Decoder(model, rngs=rngs))[1]
  mismatch = checkpoint_lib.params_shape_mismatch(source.checkpoints, source.step, abstract)
  if mismatch is not None:
    key, have, want = mismatch
    differ = f"; the model configs differ in: {', '.join(differences)}" if differences else ""
    raise ConfigError(
        f"train.init_from={cfg.train.init_from}: parameter params/{key} is {have} in "
        f"{source.describe()} but {want} in this run's model{differ}. Set the run's model.* keys "
        f"to those of {os.path.join(source.workdir, 'config.json')} (or pass that file as "
        f"--config)")
  if differences:
    log(f"mai-jax: WARNING: train.init_from={cfg.train.init_from} was trained with another model "
        f"config, so its weights compute something else here: {', '.join(differences)} (this "
        f"run's value first). Intended (e.g. a longer context)? Go on. Otherwise set those "
        f"--config.model.* keys to the values in {source.workdir}/config.json")
  return source


def resolve(path: str, key: str = "train.init_from") -> InitSource:
  """The workdir and step `path` names: WORKDIR (its latest good step) or
  WORKDIR/checkpoints/STEP. `key` names the setting in the errors (another reader of weights,
  e.g. train.distill_teacher)."""
  where = f"{key}={path}"
  workdir, step = os.path.abspath(path), None
  head, tail = os.path.split(workdir.rstrip(os.sep))
  if tail.isdigit() and os.path.basename(head) == CHECKPOINTS:
    workdir, step = os.path.dirname(head), int(tail)
  if not os.path.isdir(workdir):
    raise ConfigError(f"{where}: no such directory; {_FIX}")
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise ConfigError(f"{where}: {config_path} not found, so this is no mai_jax workdir; {_FIX}")
  checkpoints = os.path.join(workdir, CHECKPOINTS)
  good = checkpoint_lib.good_steps(checkpoints) if os.path.isdir(checkpoints) else []
  if not good:
    raise ConfigError(f"{where}: {checkpoints} holds no restorable checkpoint (see `mai-jax "
                      f"checkpoints --workdir {workdir}`); {_FIX}")
  if step is not None and step not in good:
    raise ConfigError(f"{where}: step {step} is not a good checkpoint in {checkpoints}; good "
                      f"steps: {', '.join(map(str, good))}")
  step = good[-1] if step is None else step
  return InitSource(workdir=workdir, step=step, cfg=config_lib.load_json(config_path),
                    metadata=checkpoint_lib.stored_json(checkpoints, step, "metadata") or {})


def model_differences(run: ModelConfig, source: ModelConfig) -> list[str]:
  """'field: run value vs source value' for each model field that changes the computed function."""
  out = []
  for field in dataclasses.fields(ModelConfig):
    mine, theirs = getattr(run, field.name), getattr(source, field.name)
    if field.name not in NUMERICS_ONLY_FIELDS and mine != theirs:
      out.append(f"{field.name}: {mine!r} vs {theirs!r}")
  return out


def vocab_grows(cfg: Config, source: InitSource) -> bool:
  """The run's vocabulary is the source's plus added tokens (see the module docstring)."""
  return source.cfg.model.vocab_size < cfg.model.vocab_size


def restore_params(source: InitSource, abstract_params: Any) -> Any:
  """The source's params in `abstract_params`' shapes, dtypes and shardings (this mesh's); when
  the vocabulary grew, the embedding tables gain mean-initialized rows (`grow_rows`)."""
  stored_shapes = checkpoint_lib.stored_param_shapes(source.checkpoints, source.step,
                                                     abstract_params)
  resized = jax.tree.map(lambda a, s: tuple(a.shape) != s, abstract_params, stored_shapes)
  if not any(jax.tree.leaves(resized)):
    return checkpoint_lib.restore_params(source.checkpoints, source.step, abstract_params)
  # Tables of the source's size are read replicated (their size may not divide the mesh axes),
  # then grown into the run's shardings.
  target = jax.tree.map(
      lambda a, s, r: jax.ShapeDtypeStruct(s, a.dtype, sharding=NamedSharding(
          a.sharding.mesh, PartitionSpec())) if r else a, abstract_params, stored_shapes, resized)
  params = checkpoint_lib.restore_params(source.checkpoints, source.step, target)
  return jax.tree.map(lambda p, a, r: grow_rows(p, a) if r else p, params, abstract_params,
                      resized)


def grow_rows(table: jax.Array, target: jax.ShapeDtypeStruct) -> jax.Array:
  """`table` padded to `target`'s shape along the one axis where they differ (the vocab axis:
  0 of embed [V, D], 1 of unembed [D, V]), the new entries the mean of the old ones."""
  axis = [i for i, (a, b) in enumerate(zip(table.shape, target.shape)) if a != b]
  if len(axis) != 1 or table.shape[axis[0]] > target.shape[axis[0]]:
    raise ConfigError(f"cannot grow an array of shape {table.shape} to {target.shape}")
  axis = axis[0]
  extra = target.shape[axis] - table.shape[axis]

  def grow(t):
    mean = jnp.mean(t.astype(jnp.float32), axis=axis, keepdims=True).astype(t.dtype)
    return jnp.concatenate([t, jnp.repeat(mean, extra, axis=axis)], axis=axis)

  return jax.jit(grow, out_shardings=target.sharding)(table)


# ------------------------------------------------------------------------------------ tokenizer

def adoptable_tokenizer(cfg: Config, workdir: str, source: InitSource, log: Log) -> list[str]:
  """The names of the source's tokenizer files the run copies into `workdir` (the copy itself
  waits until every check of the run has passed; see train/prepare.py): none when the run names
  or has its own. Says which tokenizer the run will use."""
  if cfg.data.tokenizer_path:
    log(f"mai-jax: tokenizer: data.tokenizer_path={cfg.data.tokenizer_path} (set explicitly; "
        f"not copied from train.init_from)")
    return []
  for name in _MAIN_TOKENIZER_FILES:
    if os.path.isfile(os.path.join(workdir, name)):
      log(f"mai-jax: tokenizer: {os.path.join(workdir, name)} (already in the workdir)")
      return []
  names = [n for n in _TOKENIZER_SIDE_FILES + _MAIN_TOKENIZER_FILES
           if os.path.isfile(os.path.join(source.workdir, n))]
  if any(n in _MAIN_TOKENIZER_FILES for n in names):
    log(f"mai-jax: tokenizer: that of train.init_from ({', '.join(names)} copied from "
        f"{source.workdir}), so token ids match the weights")
    return names
  if source.cfg.data.tokenizer_path:
    raise ConfigError(
        f"train.init_from={cfg.train.init_from} was trained with data.tokenizer_path="
        f"{source.cfg.data.tokenizer_path}; set --config.data.tokenizer_path="
        f"{source.cfg.data.tokenizer_path} (and data.tokenizer_pattern if it was set) so token ids "
        f"match its weights")
  log(f"mai-jax: WARNING: train.init_from={cfg.train.init_from} holds no tokenizer, so this run "
      f"trains a new one whose ids do not match the weights' embeddings; set "
      f"--config.data.tokenizer_path to the tokenizer the weights were trained with")
  return []


def check_tokenizer_matches(source: InitSource, tokenizer: Tokenizer, log: Log,
                            base_hash: Optional[str] = None) -> None:
  """Warns when the source's tokenizer (recorded with or stored in it) is neither the run's nor
  `base_hash` (the one the run extended with template tokens, see train/template_vocab.py)."""
  want = source_tokenizer_hash(source)
  if want is not None and want not in (base_hash, tokenizer.content_hash):
    log(f"mai-jax: WARNING: this run's tokenizer {tokenizer.path} (sha256 "
        f"{tokenizer.content_hash[:12]}) is not the one of train.init_from {source.workdir} "
        f"(sha256 {want[:12]}): the same text gets other ids than the weights were trained on")


def source_tokenizer_hash(source: InitSource) -> Optional[str]:
  """sha256 of the source's tokenizer: the one its checkpoint records, else its
  tokenizer_record.json, else the file it would load."""
  recorded = (source.metadata.get("tokenizer") or {}).get("sha256")
  if recorded:
    return recorded
  workdir = source.workdir
  record = os.path.join(workdir, RECORD_FILE)
  if os.path.isfile(record):
    with open(record) as f:
      return json.load(f).get("sha256")
  for name in _MAIN_TOKENIZER_FILES:
    path = os.path.join(workdir, name)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
  return None
