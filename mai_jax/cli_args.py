"""Turning command-line pieces into a Config, and the flag sets several `mai-jax` commands share:
`--config.SECTION.KEY=VALUE` overrides (parsed as literals against the field's type, never eval'd),
the experiment-or-workdir base config, `--step`, and the sampling flags."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from mai_jax import config as config_lib


def split_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
  """Separates `--config.SECTION.KEY=VALUE` (or `--config.SECTION.KEY VALUE`) from other args."""
  rest, overrides = [], {}
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(args):
          raise config_lib.ConfigError(f"--config.{key} needs a value: --config.{key}=VALUE")
        i += 1
        value = args[i]
      if key.count(".") != 1:
        raise config_lib.ConfigError(f"--config.{key}: expected --config.SECTION.KEY=VALUE with "
                                     f"SECTION one of {', '.join(config_lib.SECTIONS)}")
      overrides[key] = value
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def resolve_config(config_spec: Optional[str], workdir: Optional[str],
                   overrides: dict[str, str]) -> config_lib.Config:
  """--config wins; without it a workdir's config.json (resuming a run) is the base."""
  if config_spec:
    cfg = config_lib.load_experiment(config_spec)
  elif workdir and os.path.isfile(os.path.join(workdir, "config.json")):
    cfg = config_lib.load_json(os.path.join(workdir, "config.json"))
  else:
    raise config_lib.ConfigError("no config: pass --config experiments/NAME.py[:VARIANT] (or a "
                                 "--workdir that already holds config.json)")
  cfg = config_lib.apply_overrides(cfg, overrides)
  config_lib.validate(cfg)
  return cfg


def add_step_flag(parser) -> None:
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step to read (default: the latest good one)")


def add_sampling_flags(p) -> None:
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
  p.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
  p.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus cut")
  p.add_argument("--seed", type=int, default=0)
  add_step_flag(p)


def sampling_from_args(args):
  from mai_jax import sample  # pylint: disable=import-outside-toplevel
  settings = sample.SamplingConfig(max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, seed=args.seed)
  sample.check(settings)
  return settings
