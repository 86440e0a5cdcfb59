"""`mai-jax` command line. The only module that parses argv; everything it runs is a library call.

  mai-jax train --config experiments/NAME.py[:VARIANT] --workdir DIR [--config.SECTION.KEY=VALUE ...]
  mai-jax checkpoints --workdir DIR [--export-params OUT [--step S]]
  mai-jax data train-tokenizer|tokenize|inspect ...   (tokenizers and token caches)
  mai-jax data curate --config CURATE.toml --out DIR [--engine local|ray] [--workers N]
  mai-jax data synthesize --workdir W --prompts P.jsonl --out DIR [--batch-size B] [sampling flags]
  mai-jax plan  --config experiments/NAME.py[:VARIANT] [--gpus N] [--gpu h100|h200|b200] [--json]
                [--search] [--compile [--compile-layers N]] [--config.SECTION.KEY=VALUE ...]
  mai-jax eval --workdir DIR ;  mai-jax sample --workdir DIR --prompt TEXT [--chat] [...]
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

from mai_jax import cli_checks, cli_help
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
  _add_data_parser(sub)
  _add_plan_parser(sub)
  _add_eval_parser(sub)
  _add_sample_parser(sub)
  _add_chat_parser(sub)
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


def _add_data_parser(sub) -> None:
  data = sub.add_parser("data", help="tokenizers and token caches for the configured data.sources")
  tasks = data.add_subparsers(dest="data_command", required=True)
  tok = tasks.add_parser("train-tokenizer", help="train a BPE tokenizer on the configured sources")
  tok.add_argument("--config", dest="config_spec", required=True,
                   help="experiments/NAME.py[:VARIANT]")
  tok.add_argument("--out", required=True,
                   help="output file: NAME.model (SentencePiece) or NAME.json (Hugging Face)")
  tokenize = tasks.add_parser("tokenize", help="pre-tokenize every configured source into a "
                              "token cache (resumes an interrupted run)")
  tokenize.add_argument("--config", dest="config_spec", required=True,
                        help="experiments/NAME.py[:VARIANT] (data.tokenizer_path must be set)")
  tokenize.add_argument("--out", required=True, help="folder; each source goes to OUT/NAME")
  tokenize.add_argument("--workers", type=int, default=2, help="tokenizer threads")
  inspect = tasks.add_parser("inspect", help="print a token cache's manifest")
  inspect.add_argument("path", help="a token cache folder (OUT/NAME of `data tokenize`)")
  _add_curate_parser(tasks)
  _add_synthesize_parser(tasks)


def _add_curate_parser(tasks) -> None:
  curate = tasks.add_parser("curate", help="filter, deduplicate and decontaminate raw text into "
                            "shards `data tokenize` reads (README: Data curation)")
  curate.add_argument("--config", dest="curate_config", required=True,
                      help="a curation config, NAME.toml or NAME.json")
  curate.add_argument("--out", required=True, help="new folder for data/, report.json, "
                      "summary.txt and signatures.npz (refused if it exists)")
  curate.add_argument("--engine", choices=("local", "ray"), default="local",
                      help="local: a process pool on this machine; ray: Ray Data on RAY_ADDRESS "
                      "or a local Ray instance (same output bytes)")
  curate.add_argument("--workers", type=int, default=0, help="processes (0: the config's workers)")


def _run_curate(args) -> None:
  from mai_jax import curate_perplexity  # pylint: disable=import-outside-toplevel
  from mai_jax.data.curate import pipeline, settings  # pylint: disable=import-outside-toplevel
  settings.register_rule(curate_perplexity.Perplexity)
  cfg = settings.load(args.curate_config)
  pipeline.curate(cfg, args.out, engine=args.engine, workers=args.workers or None,
                  log=lambda msg: print(f"mai-jax: {msg}", flush=True))
  out = os.path.abspath(args.out)
  pattern = os.path.join(out, "data", f"*.{cfg.output.format}")
  print(f"mai-jax: wrote {out} (summary.txt, report.json); tokenize it with --config.data.sources="
        f"\"({{'name': 'curated', 'kind': '{cfg.output.format}', 'path': '{pattern}'}},)\"")


def _run_data(args, overrides: dict[str, str]) -> None:
  import json  # pylint: disable=import-outside-toplevel
  from mai_jax.data import (cache, sources, tokenizer,  # pylint: disable=import-outside-toplevel
                            tokenizer_files)
  if args.data_command == "curate":
    _run_curate(args)
    return
  if args.data_command == "synthesize":
    _run_synthesize(args, overrides)
    return
  if args.data_command == "inspect":
    manifest, _ = cache.open_cache(args.path)
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=2))
    print(f"{len(manifest['files'])} input files")
    return
  cfg = resolve_config(args.config_spec, None, overrides)
  if args.data_command == "train-tokenizer":
    if not args.out.endswith((".model", ".json")):
      raise config_lib.ConfigError(f"--out {args.out!r}: name it NAME.model (SentencePiece) or "
                                   f"NAME.json (Hugging Face tokenizers)")
    texts = tokenizer.training_texts(cfg)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.out.endswith(".model"):
      tokenizer.train_sentencepiece(texts, cfg.model.vocab_size, args.out[:-len(".model")],
                                    cfg.data.tokenizer_train_chars)
    else:
      tokenizer_files.train_hf_bpe(texts, cfg.model.vocab_size, args.out,
                                   cfg.data.tokenizer_train_chars)
    print(f"mai-jax: wrote {args.out}; use it with --config.data.tokenizer_path={args.out}")
    return
  if not cfg.data.tokenizer_path:
    raise config_lib.ConfigError("data tokenize needs a fixed tokenizer: set "
                                 "--config.data.tokenizer_path (train one with `mai-jax data "
                                 "train-tokenizer`)")
  tok = tokenizer.load_tokenizer(cfg.data.tokenizer_path, cfg.data.tokenizer_pattern)
  entries = []
  for spec in sources.source_specs(cfg.data):
    out = os.path.join(args.out, spec.name)
    cache.tokenize_source(spec, cfg.data, tok, out, workers=args.workers,
                          log=lambda msg: print(f"mai-jax: {msg}", flush=True))
    entries.append({"name": spec.name, "kind": "cache", "path": os.path.abspath(out),
                    "weight": spec.weight})
  print(f"mai-jax: train from the caches with --config.data.sources=\"{tuple(entries)!r}\"")


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
  result = plan_lib.plan(cfg, gpu, gpus) if own_layout_error is None else None
  ranked, search_note = (plan_lib.search_any_batch(cfg, gpu, gpus, top=args.top) if args.search
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
    print(plan_lib.format_plan(result))
  else:
    print(f"the config's own layout does not run on {gpus} GPUs: {own_layout_error}")
  if ranked is not None:
    if search_note:
      print(f"\nnote: {search_note}")
    print("\nlayouts that fit, fastest first:")
    print(plan_lib.format_search(ranked))
  if checked is not None:
    print()
    print(aot.format_check(checked))
  return 0


def _add_eval_parser(sub) -> None:
  p = sub.add_parser("eval", help="validation loss/perplexity and multiple-choice task accuracy "
                     "of a workdir's latest checkpoint (writes WORKDIR/eval.json)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--tasks", nargs="*", default=None, metavar="TASK.jsonl",
                 help="task files (default: the built-in mai_jax/tasks/*.jsonl; none: no tasks)")
  _add_step_flag(p)


def _add_step_flag(parser) -> None:
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step to read (default: the latest good one)")


def _run_eval(args, overrides) -> None:
  from mai_jax import evaluate  # heavy imports
  from mai_jax import workdir as workdir_lib
  cfg, step = workdir_lib.open_checkpoint(args.workdir, args.step, overrides)
  results = evaluate.evaluate_workdir(args.workdir, cfg=cfg, task_paths=args.tasks, step=step)
  print(evaluate.format_table(results))


def _add_sample_parser(sub) -> None:
  p = sub.add_parser("sample", help="continue prompts with a workdir's latest checkpoint "
                     "(KV cache; several --prompt run as one batch)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  _add_sampling_flags(p)
  p.add_argument("--chat", action="store_true",
                 help="each --prompt is a user message, rendered with the workdir's "
                      "data.chat_template; prints the assistant's reply up to its end of turn")


def _add_sampling_flags(p) -> None:
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
  p.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
  p.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus cut")
  p.add_argument("--seed", type=int, default=0)
  _add_step_flag(p)


def _add_chat_parser(sub) -> None:
  p = sub.add_parser("chat", help="chat with a workdir's latest checkpoint: one user turn per "
                     "line on stdin, the assistant's replies on stdout (empty line or EOF ends)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--system", default="", help="a system message to start the conversation")
  _add_sampling_flags(p)


def _run_chat(args, overrides) -> None:
  from mai_jax import sample  # heavy imports
  from mai_jax import workdir as workdir_lib
  from mai_jax.data import chat_template
  settings = _sampling_from_args(args)
  cfg, step = workdir_lib.open_checkpoint(args.workdir, args.step, overrides)
  chat_template.load_template(cfg.data.chat_template)  # a bad template fails before loading
  cfg, model, _, mesh = workdir_lib.load_model(args.workdir, cfg=cfg, step=step)
  tokenizer = workdir_lib.load_tokenizer(cfg, args.workdir)
  interactive = sys.stdin.isatty()
  if interactive:
    print(f"mai-jax: chatting with {args.workdir}; an empty line ends", flush=True)
  def read_line() -> str:
    if not interactive:
      return sys.stdin.readline()
    try:
      return input("user> ")
    except EOFError:
      return ""
  lines = iter(read_line, "")
  for reply in sample.chat_session(cfg, model, tokenizer, lines, settings, mesh, args.system):
    print(f"assistant> {reply}", flush=True)


def _run_sample(args, overrides) -> None:
  from mai_jax import sample  # heavy imports
  from mai_jax import workdir as workdir_lib
  settings = _sampling_from_args(args)
  cfg, step = workdir_lib.open_checkpoint(args.workdir, args.step, overrides)
  cfg, model, _, mesh = workdir_lib.load_model(args.workdir, cfg=cfg, step=step)
  tokenizer = workdir_lib.load_tokenizer(cfg, args.workdir)
  if args.chat:
    conversations = [[{"role": "user", "content": p}] for p in args.prompt]
    replies = sample.chat_replies(cfg, model, tokenizer, conversations, settings, mesh)
    for prompt, reply in zip(args.prompt, replies):
      print(f"=== {prompt!r}\n{reply}")
    return
  # A run trained here (step > 0) saw data.seq_len tokens; imported weights (step 0) carry their
  # source's context, which the import does not record: no warning for them.
  texts = sample.sample_text(cfg, model, tokenizer, args.prompt, settings, mesh,
                             trained_context=cfg.data.seq_len if step > 0 else None)
  for prompt, text in zip(args.prompt, texts):
    print(f"=== {prompt!r}\n{prompt}{text}")


def _sampling_from_args(args):
  from mai_jax import sample  # pylint: disable=import-outside-toplevel
  settings = sample.SamplingConfig(max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, seed=args.seed)
  sample.check(settings)
  return settings


def _add_synthesize_parser(tasks) -> None:
  p = tasks.add_parser("synthesize", help="generate synthetic text from a workdir's model into "
                       "JSONL shards with provenance (sharded over processes, resumable)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompts", required=True, help='JSONL: {"prompt": str, "id": optional}')
  p.add_argument("--out", required=True, help="folder for part-NNNNN.jsonl (resumes there)")
  p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
  p.add_argument("--shard-prompts", type=int, default=256, help="prompts per shard file")
  _add_sampling_flags(p)


def _run_synthesize(args, overrides) -> None:
  if not os.path.isfile(os.path.join(args.workdir, "config.json")):
    raise config_lib.ConfigError(f"--workdir {args.workdir!r} holds no config.json: train or "
                                 f"convert a model there first")
  cfg = resolve_config(None, args.workdir, overrides)
  settings = _sampling_from_args(args)
  from mai_jax import synthesize  # pylint: disable=import-outside-toplevel
  synthesize.read_prompts(args.prompts)  # a bad prompts file fails before the model loads
  written = synthesize.synthesize_workdir(
      args.workdir, args.prompts, args.out, settings, shard_prompts=args.shard_prompts,
      batch_size=args.batch_size, cfg=cfg, log=lambda msg: print(f"mai-jax: {msg}", flush=True))
  print(f"mai-jax: {len(written)} new shards in {args.out}; curate them as a source "
        f"{{name = \"synthetic\", path = \"{os.path.join(args.out, 'part-*.jsonl')}\"}}")


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
  _add_step_flag(to_hf)


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


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = _parser()
  try:
    rest, overrides = split_overrides(argv)
    args = parser.parse_args(rest)
    cli_checks.check_args(args)
    if args.command == "train":
      cfg = resolve_config(args.config_spec, args.workdir, overrides)
      from mai_jax.launch import distributed  # heavy imports only once the config is valid
      distributed.initialize(args.coordinator, args.num_processes, args.process_id)
      from mai_jax.train.loop import train
      train(cfg, args.workdir)
    elif args.command == "checkpoints":
      return _run_checkpoints(args)
    elif args.command == "data":
      _run_data(args, overrides)
    elif args.command == "plan":
      return _run_plan(args, overrides)
    elif args.command == "eval":
      _run_eval(args, overrides)
    elif args.command == "sample":
      _run_sample(args, overrides)
    elif args.command == "chat":
      _run_chat(args, overrides)
    elif args.command == "convert":
      _run_convert(args, overrides)
    elif args.command == "config":
      _run_config(args, overrides)
    return 0
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
