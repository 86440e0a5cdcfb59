"""`mai-jax data ...`: tokenizers, token caches, curation and synthetic text (parsers and runners;
cli.py dispatches here)."""

from __future__ import annotations

import os

from mai_jax import config as config_lib
from mai_jax.cli_args import add_sampling_flags, resolve_config, sampling_from_args


def add_data_parser(sub) -> None:
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
  curate.add_argument("--no-progress", dest="progress", action="store_false",
                      help="no progress bars on stderr (they show only when it is a terminal)")


def _run_curate(args) -> None:
  from mai_jax import curate_perplexity  # pylint: disable=import-outside-toplevel
  from mai_jax.data.curate import pipeline, settings  # pylint: disable=import-outside-toplevel
  settings.register_rule(curate_perplexity.Perplexity)
  cfg = settings.load(args.curate_config)
  pipeline.curate(cfg, args.out, engine=args.engine, workers=args.workers or None,
                  log=lambda msg: print(f"mai-jax: {msg}", flush=True), progress=args.progress)
  out = os.path.abspath(args.out)
  pattern = os.path.join(out, "data", f"*.{cfg.output.format}")
  print(f"mai-jax: wrote {out} (summary.txt, report.json); tokenize it with --config.data.sources="
        f"\"({{'name': 'curated', 'kind': '{cfg.output.format}', 'path': '{pattern}'}},)\"")


def run_data(args, overrides: dict[str, str]) -> None:
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


def _add_synthesize_parser(tasks) -> None:
  p = tasks.add_parser("synthesize", help="generate synthetic text from a workdir's model into "
                       "JSONL shards with provenance (sharded over processes, resumable)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompts", required=True, help='JSONL: {"prompt": str, "id": optional}')
  p.add_argument("--out", required=True, help="folder for part-NNNNN.jsonl (resumes there)")
  p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
  p.add_argument("--shard-prompts", type=int, default=256, help="prompts per shard file")
  add_sampling_flags(p)


def _run_synthesize(args, overrides) -> None:
  if not os.path.isfile(os.path.join(args.workdir, "config.json")):
    raise config_lib.ConfigError(f"--workdir {args.workdir!r} holds no config.json: train or "
                                 f"convert a model there first")
  cfg = resolve_config(None, args.workdir, overrides)
  settings = sampling_from_args(args)
  from mai_jax import synthesize  # pylint: disable=import-outside-toplevel
  synthesize.read_prompts(args.prompts)  # a bad prompts file fails before the model loads
  written = synthesize.synthesize_workdir(
      args.workdir, args.prompts, args.out, settings, shard_prompts=args.shard_prompts,
      batch_size=args.batch_size, cfg=cfg, log=lambda msg: print(f"mai-jax: {msg}", flush=True))
  print(f"mai-jax: {len(written)} new shards in {args.out}; curate them as a source "
        f"{{name = \"synthetic\", path = \"{os.path.join(args.out, 'part-*.jsonl')}\"}}")
