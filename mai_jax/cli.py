"""`mai-jax` command line. The only module that parses argv; everything it runs is a library call.

  mai-jax train --config experiments/NAME.py[:VARIANT] --workdir DIR [--config.SECTION.KEY=VALUE ...]
  mai-jax checkpoints --workdir DIR [--export-params OUT [--step S]]
  mai-jax data train-tokenizer|tokenize|inspect ...   (tokenizers and token caches)
  mai-jax data curate --config CURATE.toml --out DIR [--engine local|ray] [--workers N]
  mai-jax data synthesize --workdir W --prompts P.jsonl --out DIR [--batch-size B] [sampling flags]
  mai-jax plan  --config experiments/NAME.py[:VARIANT] [--gpus N] [--gpu h100|h200|h800|b200]
                [--json] [--search] [--compile [--compile-layers N]] [--config.SECTION.KEY=VALUE ...]
  mai-jax eval --workdir DIR [--tasks T1,T2 --include-path DIR]   (lm-eval tasks: mai_jax/harness)
  mai-jax sample --workdir DIR --prompt TEXT [--chat] [...]
  mai-jax chat --workdir DIR [--system TEXT] [...]   (multi-turn chat on stdin/stdout)
  mai-jax convert from-hf --hf-dir DIR --workdir OUT
  mai-jax convert to-hf --workdir DIR --out OUT

A bad config, override or file is reported on one line naming the key and the fix, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Optional, Sequence

from mai_jax import cli_checks, cli_data, cli_distill, cli_generate, cli_help
from mai_jax import config as config_lib
from mai_jax.cli_args import add_step_flag, resolve_config, split_overrides  # noqa: F401 (public)

USAGE_EXIT = 2


def _parser() -> argparse.ArgumentParser:
  from mai_jax import __version__  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog="mai-jax", description=__doc__.split("\n")[0])
  parser.add_argument("--version", action="version", version=f"mai-jax {__version__}")
  sub = parser.add_subparsers(dest="command", required=True)
  train = sub.add_parser("train", help="train (or resume) a model",
                         epilog="Override any config field with --config.SECTION.KEY=VALUE; values "
                                "are Python literals checked against the field's type.")
  train.add_argument("--config", dest="config_spec",
                     help="experiments/NAME.py[:VARIANT] or a workdir's config.json (default: "
                          "WORKDIR/config.json)")
  train.add_argument("--workdir", required=True, help="run directory (resumes if it has "
                     "checkpoints)")
  _add_distributed_flags(train)
  _add_checkpoints_parser(sub)
  cli_data.add_data_parser(sub)
  cli_distill.add_distill_parser(sub)
  _add_plan_parser(sub)
  _add_eval_parser(sub)
  cli_generate.add_sample_parser(sub)
  cli_generate.add_chat_parser(sub)
  _add_convert_parser(sub)
  _add_config_parser(sub)
  cli_help.with_defaults_in_help(parser)
  return parser


def _add_config_parser(sub) -> None:
  p = sub.add_parser("config", help="print a resolved config")
  what = p.add_subparsers(dest="config_command", required=True)
  show = what.add_parser(
      "show", help="the config a command would run with (overrides applied), as JSON",
      epilog="--diff lists only the fields that differ from the dataclass defaults "
             "(mai_jax.config.Config()): what the experiment file and the overrides set, one "
             "--config.SECTION.KEY=VALUE per line, ready to paste.")
  show.add_argument("--config", dest="config_spec",
                    help="experiments/NAME.py[:VARIANT] or a config.json")
  show.add_argument("--workdir", help="a run directory: its config.json (when --config is absent)")
  show.add_argument("--diff", action="store_true",
                    help="only the fields that differ from the defaults")


def _run_config(args, overrides) -> None:
  if not args.config_spec and not args.workdir:
    raise config_lib.ConfigError("config show needs --config experiments/NAME.py[:VARIANT] or "
                                 "--workdir DIR")
  if args.workdir and not args.config_spec:
    cli_checks.run_directory(args.workdir)
  cfg = resolve_config(args.config_spec, args.workdir, overrides)
  if not args.diff:
    print(config_lib.to_json(cfg))
    return
  for dotted, value, default in config_lib.differences(cfg, config_lib.Config()):
    print(f"--config.{dotted}={value!r}  # default {default!r}")


def _add_distributed_flags(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group(
      "multi-host", "jax.distributed is initialized when these are given or when SLURM, Open MPI "
      "or Kubernetes (JobSet) launched several processes; see mai_jax/launch/")
  group.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator")
  group.add_argument("--num-processes", type=int, help="total number of processes")
  group.add_argument("--process-id", type=int, help="this process's index, 0..N-1")


def _add_checkpoints_parser(sub) -> None:
  parser = sub.add_parser("checkpoints", help="list a run's checkpoints with their status, or "
                          "export parameters only")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--export-params", metavar="OUT",
                      help="write the parameters (no optimizer state) of a checkpoint to OUT")
  parser.add_argument("--step", type=int, help="checkpoint to export (default: latest good)")


def _run_checkpoints(args) -> int:
  from mai_jax import checkpoint as checkpoint_lib
  directory = os.path.join(args.workdir, "checkpoints")
  if args.export_params:
    from mai_jax.workdir import export_params
    step = export_params(args.workdir, args.export_params, args.step)
    print(f"exported the parameters of step {step} to {args.export_params}")
    return 0
  entries = checkpoint_lib.list_checkpoints(directory)
  if not entries:
    print(f"{directory}: no checkpoints")
    return 0
  print(f"{'step':>8}  {'status':<12} {'size':>10}  detail")
  for e in entries:
    print(f"{e.step:>8}  {e.status:<12} {e.size_bytes / 2**20:>8.1f}MB  {e.name}: {e.detail}")
  code, summary = checkpoints_verdict(entries)
  print(summary)
  return code


def checkpoints_verdict(entries) -> tuple[int, str]:
  """(exit code, summary line) of a checkpoint listing. Exit 1 only when the latest restorable
  state is in danger: no finalized step is restorable, or the newest finalized step fails
  verification (a resume would fall back past it and lose its steps). Quarantined steps (a resume
  already moved them aside and fell back), interrupted saves (orbax ignores them) and an older
  corrupt step behind a good newest one are reported, but the run resumes from its newest step."""
  finalized = [e for e in entries if e.name.isdigit()]
  good = [e.step for e in finalized if e.status in ("ok", "unverified")]
  notes = [f"{n} {status}" for status in ("quarantined", "incomplete", "corrupt")
           if (n := sum(e.status == status for e in entries))]
  noted = f" ({', '.join(notes)}: see above)" if notes else ""
  if not good:
    return 1, f"no restorable checkpoint{noted}: a resume starts from scratch"
  if finalized[-1].status == "corrupt":
    return 1, (f"the newest step {finalized[-1].step} is corrupt: a resume falls back to step "
               f"{good[-1]} and recomputes the steps after it")
  return 0, f"resumes from step {good[-1]}{noted}"


def _add_plan_parser(sub) -> None:
  plan = sub.add_parser(
      "plan", help="predict memory, communication, step time and MFU of a config on N GPUs",
      epilog="--compile runs on fake CPU devices: when jax is not imported yet it sets XLA_FLAGS="
             "--xla_force_host_platform_device_count=N and JAX_PLATFORMS=cpu itself.")
  plan.add_argument("--config", dest="config_spec", required=True,
                    help="experiments/NAME.py[:VARIANT]")
  plan.add_argument("--gpus", type=int, default=None,
                    help="GPU count (default: the config's mesh.target_num_gpus)")
  plan.add_argument("--gpu", default=None,
                    help="h100, h200, h800 or b200 (default: mesh.target_gpu)")
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
  if args.compile_layers <= 0:
    raise config_lib.ConfigError(f"--compile-layers {args.compile_layers} must be positive")
  own_layout_error = None  # the config's own layout cannot run on --gpus; --search still ranks
  try:
    config_lib.validate(cfg, gpus)
  except config_lib.ConfigError as e:
    if not args.search or args.compile:
      raise config_lib.ConfigError(f"{e}; or rank the layouts that run on {gpus} GPUs with "
                                   f"--search" if not args.search else str(e)) from None
    own_layout_error = str(e)
  if args.compile:
    _use_fake_cpu_devices(args.compile_devices)
  from mai_jax import plan as plan_lib  # imports jax: after the fake-device flags
  from mai_jax import plan_search
  result = plan_lib.plan(cfg, gpu, gpus) if own_layout_error is None else None
  ranked, search_note = (plan_search.search_any_batch(cfg, gpu, gpus, top=args.top) if args.search
                         else (None, None))
  checked = None
  if args.compile:
    from mai_jax import aot
    checked = aot.compile_check(cfg, args.compile_layers, gpus)
  if args.json:
    out = result.as_dict() if result is not None else {"own_layout_error": own_layout_error}
    if ranked is not None:
      out["search"] = [p.as_dict() for p in ranked]
      out["search_note"] = search_note
    if checked is not None:
      out["compile"] = checked
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0
  if result is not None:
    print(plan_search.format_plan(result))
  else:
    print(f"the config's own layout does not run on {gpus} GPUs: {own_layout_error}")
  if ranked is not None:
    if search_note:
      print(f"\nnote: {search_note}")
    print("\nlayouts that fit, fastest first:")
    print(plan_search.format_search(ranked))
  if checked is not None:
    print()
    print(aot.format_check(checked))
  return 0


def _add_eval_parser(sub) -> None:
  p = sub.add_parser("eval", help="validation loss/perplexity and multiple-choice task accuracy "
                     "of a workdir's latest checkpoint (writes WORKDIR/eval.json)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--tasks", nargs="*", default=None, metavar="TASK",
                 help="own task files TASK.jsonl (default: the built-in mai_jax/tasks/*.jsonl; "
                      "none: no tasks), or lm-evaluation-harness task names T1,T2 (needs the "
                      "lmeval extra; runs only those tasks)")
  p.add_argument("--include-path", default=None, metavar="DIR",
                 help="a folder of lm-eval task YAML files searched before lm-eval's own")
  p.add_argument("--limit", type=int, default=None, help="lm-eval: documents per task")
  p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples")
  p.add_argument("--batch-size", type=int, default=None, help="lm-eval: rows per batch "
                 "(rounded up to a multiple of the mesh's batch shards; default 16)")
  add_step_flag(p)


def _harness_task_names(args) -> Optional[list[str]]:
  """The lm-eval task names of `eval --tasks`, None for own *.jsonl task files."""
  if not args.tasks or all(cli_checks.is_task_file(t) for t in args.tasks):
    if args.include_path:
      raise config_lib.ConfigError("--include-path is for lm-eval task names in --tasks")
    return None
  if any(cli_checks.is_task_file(t) for t in args.tasks):
    raise config_lib.ConfigError("--tasks mixes task files (*.jsonl) and lm-eval task names; "
                                 "run them in two `mai-jax eval` calls")
  return [n for t in args.tasks for n in t.split(",") if n]


def _run_eval(args, overrides) -> None:
  from mai_jax import evaluate  # heavy imports
  from mai_jax import workdir as workdir_lib
  names = _harness_task_names(args)
  cfg, step = workdir_lib.open_checkpoint(args.workdir, args.step, overrides)
  if names is not None:
    from mai_jax.harness import tasks as harness_tasks
    results = harness_tasks.evaluate_workdir(
        args.workdir, names, include_path=args.include_path, cfg=cfg, step=step, limit=args.limit,
        num_fewshot=args.num_fewshot, batch_size=args.batch_size)
    print(harness_tasks.format_table(results["step"], results["harness"]))
    return
  results = evaluate.evaluate_workdir(args.workdir, cfg=cfg, task_paths=args.tasks, step=step)
  print(evaluate.format_table(results))


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
  add_step_flag(to_hf)


def _run_convert(args, overrides) -> None:
  from mai_jax.convert import workdir as convert_workdir  # heavy imports
  if args.direction == "from-hf":
    convert_workdir.hf_to_workdir(args.hf_dir, args.workdir, param_dtype=args.param_dtype,
                                  overrides=overrides)
    print(f"mai-jax: wrote {args.workdir} from {args.hf_dir}")
  else:
    from mai_jax import workdir as workdir_lib
    cfg, step = workdir_lib.open_checkpoint(args.workdir, args.step, overrides)
    convert_workdir.workdir_to_hf(args.workdir, args.out, cfg=cfg, step=step)
    print(f"mai-jax: wrote {args.out} from {args.workdir}")


def _reader_went_away() -> int:
  """`mai-jax plan --json | head -3`: the reader closed the pipe. Exit quietly with the status a
  C tool killed by SIGPIPE has (128 + 13 = 141: `yes | head` under `set -o pipefail` fails the
  same way, and a `train | head` that stopped early does not look like a finished run), with
  stdout pointed at /dev/null so Python's final flush cannot print a second error."""
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, sys.stdout.fileno())
  except (AttributeError, OSError, ValueError):  # a replaced sys.stdout (tests, notebooks)
    pass
  sys.stdout = os.fdopen(devnull, "w")
  return 128 + signal.SIGPIPE


def _dispatch(args, overrides: dict[str, str]) -> int:
  """Runs the parsed command; its exit code."""
  if args.command == "train":
    cfg = resolve_config(args.config_spec, args.workdir, overrides)
    from mai_jax.launch import distributed  # heavy imports only once the config is valid
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from mai_jax.train.loop import train
    train(cfg, args.workdir)
  elif args.command == "checkpoints":
    return _run_checkpoints(args)
  elif args.command == "data":
    cli_data.run_data(args, overrides)
  elif args.command == "distill":
    cli_distill.run_distill(args)
  elif args.command == "plan":
    return _run_plan(args, overrides)
  elif args.command == "eval":
    _run_eval(args, overrides)
  elif args.command == "sample":
    cli_generate.run_sample(args, overrides)
  elif args.command == "chat":
    cli_generate.run_chat(args, overrides)
  elif args.command == "convert":
    _run_convert(args, overrides)
  elif args.command == "config":
    _run_config(args, overrides)
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = _parser()
  try:
    rest, overrides = split_overrides(argv)
    args = parser.parse_args(rest)
    cli_checks.check_args(args)
    code = _dispatch(args, overrides)
    # Flushed here, inside the handlers: a block-buffered stdout (a pipe) whose reader went away
    # raises BrokenPipeError now rather than in the interpreter's exit flush (exit 120).
    sys.stdout.flush()
    return code
  except config_lib.ConfigError as e:
    print(f"mai-jax: error: {e}", file=sys.stderr)
    return USAGE_EXIT
  except BrokenPipeError:
    return _reader_went_away()
  except RuntimeError as e:
    from mai_jax.checkpoint import CheckpointError
    if not isinstance(e, CheckpointError):
      raise
    print(f"mai-jax: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
