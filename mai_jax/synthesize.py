"""`mai-jax data synthesize`: synthetic text from a workdir's model, as JSONL shards with provenance.

Prompts are a JSONL file, one object a line: {"prompt": str, "id": optional}. They are cut into
shards of `shard_prompts` (OUT/part-NNNNN.jsonl) and each shard into batches of `batch_size`
decoded together by the KV-cache sampler (sample.py). Every record keeps its provenance:

  {"text": continuation, "prompt": ..., "prompt_id": ..., "generator": "WORKDIR@step N",
   "seed": batch seed, "sampling": {...}}

Batch b of the whole run samples with seed sampling.seed + b, so the output is a pure function of
(model, prompts, settings), whichever process makes a shard. With several processes, process p
makes shards p, p + P, ... (sharded); a shard is written to a temporary name and renamed, so the
same command after an interruption makes only the missing shards (resumable). OUT/synthesize.json
records the settings and the prompts' sha256; resuming with others is refused. The shards are
input for `mai-jax data curate` (kind jsonl), which keeps the provenance keys in `meta`.
This module sits above data and the model (it imports sample), so mai_jax.data stays model-free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable, Optional

from mai_jax.config import Config, ConfigError
from mai_jax.data import chat

MANIFEST = "synthesize.json"


def read_prompts(path: str) -> list[tuple[str, str]]:
  """(prompt id, prompt) per line; a bad line is an error naming file and line."""
  def parse(record, where: str) -> tuple[str, str]:
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
      raise ConfigError(f"{where}: expected an object with a string 'prompt'")
    return str(record.get("id", where)), record["prompt"]

  prompts = list(chat.read_records(os.path.dirname(os.path.abspath(path)), os.path.basename(path),
                                   parse))
  if not prompts:
    raise ConfigError(f"--prompts {path!r}: no prompts")
  return prompts


def _check_manifest(out_dir: str, manifest: dict) -> None:
  path = os.path.join(out_dir, MANIFEST)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    if saved != manifest:
      changed = sorted(k for k in manifest if saved.get(k) != manifest[k])
      raise ConfigError(f"--out {out_dir!r} holds shards made with other {', '.join(changed)}; "
                        f"choose another folder or remove it")
    return
  os.makedirs(out_dir, exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def synthesize(cfg: Config, model, tokenizer, prompts: list[tuple[str, str]], out_dir: str,
               sampling, *, generator: str, shard_prompts: int = 256, batch_size: int = 8,
               process_index: int = 0, process_count: int = 1, mesh=None,
               log: Callable[[str], None] = print) -> list[str]:
  """Writes this process's missing shards; returns the paths of the shards it wrote."""
  from mai_jax import sample  # pylint: disable=import-outside-toplevel
  sample.check(sampling)
  if shard_prompts < 1 or batch_size < 1 or shard_prompts % batch_size:
    raise ConfigError(f"--shard-prompts={shard_prompts} must be a positive multiple of "
                      f"--batch-size={batch_size}")
  digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
  _check_manifest(out_dir, {"generator": generator, "prompts_sha256": digest,
                            "sampling": dataclasses.asdict(sampling),
                            "shard_prompts": shard_prompts, "batch_size": batch_size})
  written = []
  num_shards = -(-len(prompts) // shard_prompts)
  for k in range(process_index, num_shards, process_count):
    path = os.path.join(out_dir, f"part-{k:05d}.jsonl")
    if os.path.exists(path):
      continue
    rows = []
    for start in range(k * shard_prompts, min((k + 1) * shard_prompts, len(prompts)), batch_size):
      batch = prompts[start:start + batch_size]
      seed = sampling.seed + start // batch_size
      texts = sample.sample_text(cfg, model, tokenizer, [p for _, p in batch],
                                 dataclasses.replace(sampling, seed=seed), mesh)
      rows += [{"text": text, "prompt": prompt, "prompt_id": pid, "generator": generator,
                "seed": seed, "sampling": dataclasses.asdict(sampling)}
               for (pid, prompt), text in zip(batch, texts)]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(path + ".tmp", path)
    written.append(path)
    log(f"wrote {path} ({len(rows)} documents)")
  return written


def synthesize_workdir(workdir: str, prompts_path: str, out_dir: str, sampling, *,
                       shard_prompts: int, batch_size: int, cfg: Optional[Config] = None,
                       log: Callable[[str], None] = print) -> list[str]:
  """synthesize() with a workdir's latest checkpoint and tokenizer, on this process's shards."""
  import jax  # pylint: disable=import-outside-toplevel
  from mai_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  prompts = read_prompts(prompts_path)
  cfg, model, step, mesh = workdir_lib.load_model(workdir, cfg=cfg)
  tokenizer = workdir_lib.load_tokenizer(cfg, workdir)
  return synthesize(cfg, model, tokenizer, prompts, out_dir, sampling,
                    generator=f"{os.path.abspath(workdir)}@step {step}",
                    shard_prompts=shard_prompts, batch_size=batch_size,
                    process_index=jax.process_index(), process_count=jax.process_count(),
                    mesh=mesh, log=log)
