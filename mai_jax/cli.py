"""`mai-jax` command line. The only module that parses argv; everything it runs is a library call.

  mai-jax train --config experiments/NAME.py[:VARIANT] --workdir DIR [--config.SECTION.KEY=VALUE ...]
  mai-jax plan  --config experiments/NAME.py[:VARIANT] [--gpus N] [--gpu h100|h200|b200] [--json]
                [--search] [--compile [--compile-layers N]] [--config.SECTION.KEY=VALUE ...]

A bad config, override or file is reported on one line naming the key and the fix, exit code 2.
"""

from __future__ import annotations

import argparse
import json
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
  _add_plan_parser(sub)
  return parser


def _add_plan_parser(sub) -> None:
  plan = sub.add_parser(
      "plan", help="predict memory, communication, step time and MFU of a config on N GPUs",
      epilog="--compile runs on fake CPU devices: when jax is not imported yet it sets XLA_FLAGS="
             "--xla_force_host_platform_device_count=N and JAX_PLATFORMS=cpu itself.")
  plan.add_argument("--config", dest="config_spec", required=True,
                    help="experiments/NAME.py[:VARIANT]")
  plan.add_argument("--gpus", type=int, default=None,
                    help="GPU count (default: the config's mesh.target_num_gpus)")
  plan.add_argument("--gpu", default=None, help="h100, h200 or b200 (default: mesh.target_gpu)")
  plan.add_argument("--json", action="store_true", help="print one JSON object")
  plan.add_argument("--search", action="store_true",
                    help="also rank the mesh/remat/microbatch layouts that fit")
  plan.add_argument("--top", type=int, default=10, help="layouts --search shows")
  plan.add_argument("--compile", action="store_true",
                    help="also lower and compile the sharded train step at reduced depth on fake "
                         "CPU devices and compare its FLOPs and memory with the plan")
  plan.add_argument("--compile-layers", type=int, default=2, help="depth for --compile")
  plan.add_argument("--compile-devices", type=int, default=8,
                    help="fake CPU devices for --compile (used only if jax is not imported yet)")


def _use_fake_cpu_devices(count: int) -> None:
  """Makes jax start with `count` CPU devices; only possible before jax is first imported."""
  if "jax" in sys.modules:
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"


def _run_plan(args, overrides: dict[str, str]) -> int:
  cfg = resolve_config(args.config_spec, None, overrides)
  gpu = args.gpu or cfg.mesh.target_gpu
  if gpu not in config_lib.GPU_TYPES:
    raise config_lib.ConfigError(f"--gpu {gpu!r}: unknown GPU type; choose one of "
                                 f"{', '.join(config_lib.GPU_TYPES)}")
  gpus = args.gpus if args.gpus is not None else cfg.mesh.target_num_gpus
  if gpus <= 0:
    raise config_lib.ConfigError(f"{args.config_spec} declares no mesh.target_num_gpus; pass "
                                 f"--gpus N (a positive GPU count)")
  config_lib.validate(cfg, gpus)
  if args.compile_layers <= 0:
    raise config_lib.ConfigError(f"--compile-layers {args.compile_layers} must be positive")
  if args.compile:
    _use_fake_cpu_devices(args.compile_devices)
  from mai_jax import plan as plan_lib  # imports jax: after the fake-device flags
  result = plan_lib.plan(cfg, gpu, gpus)
  ranked = plan_lib.search(cfg, gpu, gpus, top=args.top) if args.search else None
  checked = None
  if args.compile:
    from mai_jax import aot
    checked = aot.compile_check(cfg, args.compile_layers, gpus)
  if args.json:
    out = result.as_dict()
    if ranked is not None:
      out["search"] = [p.as_dict() for p in ranked]
    if checked is not None:
      out["compile"] = checked
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0
  print(plan_lib.format_plan(result))
  if ranked is not None:
    print("\nlayouts that fit, fastest first:")
    print(plan_lib.format_search(ranked))
  if checked is not None:
    print()
    print(aot.format_check(checked))
  return 0


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
    elif args.command == "plan":
      return _run_plan(args, overrides)
    return 0
  except config_lib.ConfigError as e:
    print(f"mai-jax: error: {e}", file=sys.stderr)
    return USAGE_EXIT


if __name__ == "__main__":
  sys.exit(main())
