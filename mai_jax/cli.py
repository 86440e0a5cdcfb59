"""`mai-jax` command line. The only module that parses argv; everything it runs is a library call.

  mai-jax train --config experiments/NAME.py[:VARIANT] --workdir DIR [--config.SECTION.KEY=VALUE ...]

A bad config, override or file is reported on one line naming the key and the fix, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from mai_jax import config as config_lib

USAGE_EXIT = 2


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


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mai-jax", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  train = sub.add_parser("train", help="train (or resume) a model",
                         epilog="Override any config field with --config.SECTION.KEY=VALUE; values "
                                "are Python literals checked against the field's type.")
  train.add_argument("--config", dest="config_spec",
                     help="experiments/NAME.py[:VARIANT] (default: WORKDIR/config.json)")
  train.add_argument("--workdir", required=True, help="run directory (resumes if it has "
                     "checkpoints)")
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = _parser()
  try:
    rest, overrides = split_overrides(argv)
    args = parser.parse_args(rest)
    if args.command == "train":
      cfg = resolve_config(args.config_spec, args.workdir, overrides)
      from mai_jax.train.loop import train  # heavy imports only once the config is valid
      train(cfg, args.workdir)
    return 0
  except config_lib.ConfigError as e:
    print(f"mai-jax: error: {e}", file=sys.stderr)
    return USAGE_EXIT


if __name__ == "__main__":
  sys.exit(main())
