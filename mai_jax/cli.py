"""`mai-jax` command line. The only module that parses argv; everything it runs is a library call.

  mai-jax train --config experiments/NAME.py[:VARIANT] --workdir DIR [--config.SECTION.KEY=VALUE ...]
  mai-jax eval --workdir DIR ;  mai-jax sample --workdir DIR --prompt TEXT [...]
  mai-jax convert from-hf --hf-dir DIR --workdir OUT
  mai-jax convert to-hf --workdir DIR --out OUT

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
  _add_eval_parser(sub)
  _add_sample_parser(sub)
  _add_convert_parser(sub)
  return parser


def _add_eval_parser(sub) -> None:
  p = sub.add_parser("eval", help="validation loss/perplexity and multiple-choice task accuracy "
                     "of a workdir's latest checkpoint (writes WORKDIR/eval.json)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--tasks", nargs="*", default=None, metavar="TASK.jsonl",
                 help="task files (default: the built-in mai_jax/tasks/*.jsonl; none: no tasks)")


def _run_eval(args, overrides) -> None:
  cfg = resolve_config(None, args.workdir, overrides)
  from mai_jax import evaluate  # heavy imports only once the config is valid
  results = evaluate.evaluate_workdir(args.workdir, cfg=cfg, task_paths=args.tasks)
  print(evaluate.format_table(results))


def _add_sample_parser(sub) -> None:
  p = sub.add_parser("sample", help="continue prompts with a workdir's latest checkpoint "
                     "(KV cache; several --prompt run as one batch)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
  p.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
  p.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus cut")
  p.add_argument("--seed", type=int, default=0)


def _run_sample(args, overrides) -> None:
  cfg = resolve_config(None, args.workdir, overrides)
  from mai_jax import sample  # heavy imports only once the config is valid
  from mai_jax import workdir as workdir_lib
  settings = sample.SamplingConfig(max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, seed=args.seed)
  sample.check(settings)
  cfg, model, _, mesh = workdir_lib.load_model(args.workdir, cfg=cfg)
  tokenizer = workdir_lib.load_tokenizer(cfg, args.workdir)
  texts = sample.sample_text(cfg, model, tokenizer, args.prompt, settings, mesh)
  for prompt, text in zip(args.prompt, texts):
    print(f"=== {prompt!r}\n{prompt}{text}")


def _add_convert_parser(sub) -> None:
  p = sub.add_parser("convert", help="import/export Hugging Face Llama-family checkpoints")
  direction = p.add_subparsers(dest="direction", required=True)
  from_hf = direction.add_parser("from-hf", help="HF config.json + *.safetensors -> a workdir")
  from_hf.add_argument("--hf-dir", required=True)
  from_hf.add_argument("--workdir", required=True)
  from_hf.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=None,
                       help="default: the checkpoint's")
  to_hf = direction.add_parser("to-hf", help="a workdir's latest params -> HF safetensors")
  to_hf.add_argument("--workdir", required=True)
  to_hf.add_argument("--out", required=True)


def _run_convert(args, overrides) -> None:
  from mai_jax.convert import workdir as convert_workdir  # heavy imports
  if args.direction == "from-hf":
    convert_workdir.hf_to_workdir(args.hf_dir, args.workdir, param_dtype=args.param_dtype,
                                  overrides=overrides)
    print(f"mai-jax: wrote {args.workdir} from {args.hf_dir}")
  else:
    cfg = resolve_config(None, args.workdir, overrides)
    convert_workdir.workdir_to_hf(args.workdir, args.out, cfg=cfg)
    print(f"mai-jax: wrote {args.out} from {args.workdir}")


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
    elif args.command == "eval":
      _run_eval(args, overrides)
    elif args.command == "sample":
      _run_sample(args, overrides)
    elif args.command == "convert":
      _run_convert(args, overrides)
    return 0
  except config_lib.ConfigError as e:
    print(f"mai-jax: error: {e}", file=sys.stderr)
    return USAGE_EXIT


if __name__ == "__main__":
  sys.exit(main())
