"""Checks of the paths and counts a `mai-jax` command is given, run before anything is imported,
computed or written.

Why up front: a file where a directory belongs, an unwritable output or `--workers 0` otherwise
surfaces minutes later as an OSError or ValueError deep in a library (a traceback), sometimes after
part of the output was written. Each check raises ConfigError naming the flag, the path and the fix.

Imports nothing from the package but the config module (the CLI calls it before the heavy imports).
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

from mai_jax.config import ConfigError

# command (and data/convert subcommand) -> {flag: kind}. Kinds: 'run' an existing run directory
# (holds config.json), 'in_dir' an existing directory, 'in_files' existing files, 'task_files'
# existing *.jsonl files among lm-eval task names, 'out_dir' a directory that is created,
# 'out_file' a file that is written, 'positive' a count >= 1, 'non_negative' a count >= 0.
CHECKS: dict[str, dict[str, str]] = {
    "train": {"--workdir": "out_dir", "--num-processes": "positive",
              "--process-id": "non_negative"},
    "checkpoints": {"--workdir": "in_dir", "--export-params": "out_dir", "--step": "non_negative"},
    "data train-tokenizer": {"--out": "out_file"},
    "data tokenize": {"--out": "out_dir", "--workers": "positive"},
    "data inspect": {"token cache": "in_dir"},
    "data curate": {"--out": "out_dir", "--workers": "non_negative"},
    "data synthesize": {"--workdir": "run", "--out": "out_dir", "--batch-size": "positive",
                        "--shard-prompts": "positive"},
    "plan": {"--gpus": "positive", "--top": "positive", "--compile-layers": "positive",
             "--compile-devices": "positive"},
    "eval": {"--workdir": "run", "--tasks": "task_files", "--include-path": "in_dir",
             "--limit": "positive", "--num-fewshot": "non_negative", "--batch-size": "positive"},
    "sample": {"--workdir": "run", "--max-new-tokens": "positive"},
    "chat": {"--workdir": "run", "--max-new-tokens": "positive", "--max-context": "positive"},
    "convert from-hf": {"--hf-dir": "in_dir", "--workdir": "out_dir"},
    "convert to-hf": {"--workdir": "run", "--out": "out_dir"},
    "distill cache": {"--teacher": "run", "--data": "in_dir", "--top-k": "positive",
                      "--seq-len": "non_negative", "--batch-size": "non_negative"},
}

ATTRIBUTES = {"token cache": "path"}  # positional arguments: label in messages -> argparse dest


def command_name(args: argparse.Namespace) -> str:
  sub = (getattr(args, "data_command", None) or getattr(args, "direction", None)
         or getattr(args, "distill_command", None))
  return f"{args.command} {sub}" if sub else args.command


def check_args(args: argparse.Namespace) -> None:
  """Raises ConfigError for the first bad path or count among the command's arguments."""
  for flag, kind in CHECKS.get(command_name(args), {}).items():
    value = getattr(args, ATTRIBUTES.get(flag) or flag.lstrip("-").replace("-", "_"))
    if value is None:
      continue
    if kind in ("positive", "non_negative"):
      low = 1 if kind == "positive" else 0
      if value < low:
        raise ConfigError(f"{flag} {value} must be {'positive' if low else '>= 0'}")
    elif kind == "run":
      run_directory(value, flag)
    elif kind == "in_dir":
      existing_directory(value, flag)
    elif kind in ("in_files", "task_files"):  # task_files: *.jsonl; other names are lm-eval's
      for path in value if kind == "in_files" else [v for v in value if is_task_file(v)]:
        if not os.path.isfile(path):
          raise ConfigError(f"{flag} {path}: {'is a directory' if os.path.isdir(path) else 'not found'}"
                            f"; pass files")
    elif kind == "out_dir":
      output_directory(value, flag)
    else:
      output_file(value, flag)


def is_task_file(value: str) -> bool:
  """An `eval --tasks` entry naming an own task file (TASK.jsonl, or any path) rather than an
  lm-eval task (names such as arc_easy hold no '/')."""
  return value.endswith(".jsonl") or "/" in value or os.sep in value


def existing_directory(path: str, flag: str) -> None:
  if not os.path.exists(path):
    raise ConfigError(f"{flag} {path}: not found")
  if not os.path.isdir(path):
    raise ConfigError(f"{flag} {path} is a file; it must be a directory")


def run_directory(path: str, flag: str = "--workdir") -> None:
  """A directory `mai-jax train` or `convert from-hf` wrote (it holds config.json)."""
  if not os.path.exists(path):
    raise ConfigError(f"{flag} {path}: not found; it must be a run directory that `mai-jax train` "
                      f"or `mai-jax convert from-hf` wrote")
  existing_directory(path, flag)
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise ConfigError(f"{flag} {path} holds no config.json, so it is not a run directory: train "
                      f"one with `mai-jax train --config experiments/NAME.py --workdir {path}` or "
                      f"import weights with `mai-jax convert from-hf --workdir {path}`")


def output_directory(path: str, flag: str) -> None:
  """A directory that will be created (or added to): not a file, inside a writable directory."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"{flag} {path} is a file; pass a directory (it is created if missing)")
  _check_writable(path if os.path.isdir(path) else _existing_ancestor(path), path, flag)


def output_file(path: str, flag: str) -> None:
  if os.path.isdir(path):
    raise ConfigError(f"{flag} {path} is a directory; pass a file name")
  _check_writable(_existing_ancestor(path), path, flag)


def _existing_ancestor(path: str) -> Optional[str]:
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  return parent


def _check_writable(directory: str, path: str, flag: str) -> None:
  if not os.path.isdir(directory):
    raise ConfigError(f"{flag} {path}: {directory} is a file, so nothing can be created below it")
  if not os.access(directory, os.W_OK | os.X_OK):
    raise ConfigError(f"{flag} {path}: {directory} is not writable; choose a path you can write")
