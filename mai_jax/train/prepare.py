"""What `train` checks before it writes a byte into its workdir, and then the writes.

A refused command must leave a run as it was: an early `config.json` write once let a mistaken
`--config` (refused a moment later) rewrite the config of a trained run, so that every later
`eval`, `sample` or plain rerun read a model its checkpoints do not hold. So a run first checks
everything that can refuse it (mesh, train.init_from, the config against the workdir's latest
checkpoint, the tokenizer against the workdir's record), with the tokenizer trained, when it must
be, into a staging folder outside the workdir; only `commit` writes: config.json, the tokenizer
files, tokenizer_record.json and one line of config_history.jsonl per accepted change.

The config of a run with checkpoints is the one its checkpoints were written with (each holds it
as its `config` item); config.json is the last accepted config, a convenience copy. A resumed
run may change settings that leave the arrays' shapes alone (a longer train.num_steps, another
learning rate, eval settings): such changes are accepted, logged, and recorded with the step they
took effect at, and a change of the learning-rate schedule's inputs is a loud warning, since the
remaining steps then follow a schedule the first ones were not trained with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Optional

import jax

from mai_jax import checkpoint as checkpoint_lib
from mai_jax import config as config_lib
from mai_jax.config import Config, ConfigError
from mai_jax.data.tokenizer import (HF_TOKENIZER_FILE, TOKENIZER_FILE, Tokenizer,
                                    check_tokenizer_record, load_or_train_tokenizer)
from mai_jax.train import init_from as init_from_lib

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
CHECKPOINTS = "checkpoints"
# Inputs of the learning-rate schedule: changing one on resume bends the schedule mid-run.
SCHEDULE_KEYS = ("train.num_steps", "optim.learning_rate", "optim.warmup_steps", "optim.schedule",
                 "optim.min_lr_ratio", "optim.decay_fraction")

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Resume:
  """What the workdir holds for a run about to start: its latest checkpoint and configs."""
  step: Optional[int]  # latest finalized checkpoint; None: a fresh run
  stored: Optional[dict]  # that checkpoint's `config` item (what its arrays were written with)
  previous: Optional[dict]  # WORKDIR/config.json: the last accepted config


@dataclasses.dataclass
class TokenizerChoice:
  """The run's tokenizer, found or trained without writing into the workdir, and the files
  `commit` copies into the workdir (source path -> name there)."""
  tokenizer: Optional[Tokenizer]  # None: another process trains it (multi-host)
  copies: dict[str, str]
  staging: Optional[str] = None  # temporary folder of a freshly trained tokenizer


def _plain(cfg: Config) -> dict:
  """The config as JSON would give it back (tuples become lists), for comparisons."""
  return json.loads(config_lib.to_json(cfg))


def flat_differences(old: Optional[dict], new: dict) -> dict[str, tuple[Any, Any]]:
  """'section.key' -> (old, new) for every key whose value differs."""
  out = {}
  for section, values in new.items():
    before = (old or {}).get(section, {})
    for key, value in values.items():
      if before.get(key, "absent") != value:
        out[f"{section}.{key}"] = (before.get(key, "absent"), value)
  return out


def check_resume(cfg: Config, workdir: str, abstract_state: Any) -> Resume:
  """Refuses `cfg` when it cannot resume the workdir's latest checkpoint (another array shape,
  train.num_steps before that step); reads only."""
  directory = os.path.join(workdir, CHECKPOINTS)
  previous = config_lib.read_json_or_none(os.path.join(workdir, CONFIG_FILE))
  step = checkpoint_lib.latest_step(directory)
  if step is None:
    return Resume(None, None, previous)
  if step > cfg.train.num_steps:
    raise ConfigError(
        f"{directory} holds a checkpoint at step {step}, past train.num_steps="
        f"{cfg.train.num_steps}; set --config.train.num_steps>={step} to go on, or use a new "
        f"--workdir")
  try:
    stored = checkpoint_lib.stored_json(directory, step, "config")
    stored_tree = checkpoint_lib.stored_state_tree(directory, step)
  except Exception:  # noqa: BLE001 - unreadable: corruption, which the restore falls back from
    return Resume(step, None, previous)
  mismatch = _params_first_mismatch(stored_tree, abstract_state)
  if mismatch is not None:
    raise checkpoint_lib.mismatch_error(
        directory, step, mismatch, hint=_model_hint(stored, cfg),
        advice=f"the config the run was trained with ({_config_advice(workdir, stored, previous)})")
  return Resume(step, stored, previous)


def _params_first_mismatch(stored_tree: Any, abstract_state: Any):
  """The first differing array, a parameter rather than its optimizer moments when both differ."""
  try:
    mismatch = checkpoint_lib.first_shape_mismatch(dict(stored_tree)["params"],
                                                   abstract_state.params)
    if mismatch is not None:
      return ("params/" + mismatch[0],) + mismatch[1:]
  except (KeyError, TypeError):
    pass
  return checkpoint_lib.first_shape_mismatch(stored_tree, abstract_state)


def _model_hint(stored: Optional[dict], cfg: Config) -> str:
  if stored is None:
    return ""
  changed = flat_differences({"model": stored.get("model", {})}, {"model": _plain(cfg)["model"]})
  if not changed:
    return ""
  shown = ", ".join(f"{k}={old!r} (asked {new!r})" for k, (old, new) in list(changed.items())[:4])
  return f"; the checkpoint was written with {shown}"


def _config_advice(workdir: str, stored: Optional[dict], previous: Optional[dict]) -> str:
  path = os.path.join(workdir, CONFIG_FILE)
  if stored is not None and previous is not None and previous.get("model") != stored.get("model"):
    return (f"{path} differs from it, so pass the --config the run was started with, with the "
            f"model.* values above")
  return f"{path}: rerun without --config"


# ------------------------------------------------------------------------------------ tokenizer

def choose_tokenizer(cfg: Config, workdir: str, init_source, log: Log,
                     extension=None) -> TokenizerChoice:
  """The run's tokenizer by the priority of `load_or_train_tokenizer` (data.tokenizer_path, the
  workdir's file, train.init_from's files, a new one), or `extension` (a
  template_vocab.Extension: that tokenizer with the chat template's tokens added, staged),
  checked against the workdir's record; nothing is written into the workdir (a new or extended
  tokenizer waits in a staging folder)."""
  if extension is not None:
    check_tokenizer_record(workdir, extension.tokenizer, write=False)
    if init_source is not None:
      init_from_lib.check_tokenizer_matches(init_source, extension.tokenizer, log,
                                            base_hash=extension.base_hash)
    return TokenizerChoice(extension.tokenizer, extension.copies(), extension.staging)
  copies: dict[str, str] = {}
  if init_source is not None:
    names = init_from_lib.adoptable_tokenizer(cfg, workdir, init_source, log)
    copies = {os.path.join(init_source.workdir, n): n for n in names}
  own = cfg.data.tokenizer_path or any(
      os.path.isfile(os.path.join(workdir, n)) for n in (TOKENIZER_FILE, HF_TOKENIZER_FILE))
  staging = None
  if own:
    tokenizer = load_or_train_tokenizer(cfg, workdir)
  elif copies:
    tokenizer = load_or_train_tokenizer(cfg, init_source.workdir)  # holds a main file: no training
  elif jax.process_index() == 0:
    staging = tempfile.mkdtemp(prefix="mai_jax_tokenizer_")
    try:
      tokenizer = load_or_train_tokenizer(cfg, staging)
    except BaseException:
      shutil.rmtree(staging, ignore_errors=True)
      raise
    copies = {tokenizer.path: TOKENIZER_FILE}
  else:
    return TokenizerChoice(None, {})
  check_tokenizer_record(workdir, tokenizer, write=False)
  if init_source is not None:
    init_from_lib.check_tokenizer_matches(init_source, tokenizer, log)
  return TokenizerChoice(tokenizer, copies, staging)


# --------------------------------------------------------------------------------------- commit

def commit(cfg: Config, workdir: str, resume: Resume, choice: TokenizerChoice,
           log: Log) -> Optional[Tokenizer]:
  """Writes what the checked run needs (process 0): config.json, the tokenizer files and record,
  and the history line of an accepted change. Returns the tokenizer as loaded from the workdir
  (its path there), or None on other processes."""
  try:
    if jax.process_index() != 0:
      return None
    os.makedirs(workdir, exist_ok=True)
    new = _plain(cfg)
    _log_changes(resume, new, log)
    if resume.step is not None:
      changes = flat_differences(resume.previous or resume.stored, new)
      if changes:
        _append_history(workdir, resume.step, changes)
    if resume.previous != new:
      _write_atomic(os.path.join(workdir, CONFIG_FILE), config_lib.to_json(cfg))
    for source, name in choice.copies.items():
      tmp = os.path.join(workdir, f"{name}.tmp{os.getpid()}")
      shutil.copyfile(source, tmp)
      os.replace(tmp, os.path.join(workdir, name))  # atomic: a crash leaves no half file
    tokenizer = choice.tokenizer
    if choice.copies:
      tokenizer = load_or_train_tokenizer(cfg, workdir)  # now read from its place in the workdir
    check_tokenizer_record(workdir, tokenizer, write=True)
    return tokenizer
  finally:
    if choice.staging:
      shutil.rmtree(choice.staging, ignore_errors=True)


def _log_changes(resume: Resume, new: dict, log: Log) -> None:
  if resume.step is None or resume.stored is None:
    return
  changes = flat_differences(resume.stored, new)
  if not changes:
    return
  shown = ", ".join(f"{k}: {old!r} -> {v!r}" for k, (old, v) in changes.items())
  log(f"mai-jax: resuming step {resume.step} with config changes: {shown} (recorded in "
      f"{HISTORY_FILE})")
  schedule = [k for k in SCHEDULE_KEYS if k in changes]
  if schedule:
    log(f"mai-jax: WARNING: {', '.join(schedule)} changed, so the learning-rate schedule changes "
        f"mid-run: steps after {resume.step} follow the new config's schedule, not the one the "
        f"first {resume.step} steps were trained with")


def _append_history(workdir: str, step: int, changes: dict) -> None:
  line = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": step,
          "changes": {k: {"from": old, "to": new} for k, (old, new) in changes.items()}}
  with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
    f.write(json.dumps(line) + "\n")


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def cleanup(choice: Optional[TokenizerChoice]) -> None:
  """Removes a staging folder when the run was refused after choosing its tokenizer."""
  if choice is not None and choice.staging:
    shutil.rmtree(choice.staging, ignore_errors=True)
