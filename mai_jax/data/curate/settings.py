"""The curation config: a small TOML or JSON file (by suffix), parsed into frozen dataclasses.

    workers = 2                      # processes over input files (1: in this process)
    [[sources]]                      # in priority order: dedup keeps the earliest copy
    name = "textbooks"
    path = "raw/synthetic/*.jsonl"   # a file, folder or glob
    kind = "jsonl"                   # jsonl | parquet | text
    field = "text"
    [rules.language]                 # rules run in the order written; keys are thresholds
    languages = ["en"]
    [rules.gopher_repetition]
    [rules.gopher_quality]
    min_doc_words = 50
    [rules.c4]
    filter_no_terminal_punct = false # FineWeb's setting
    [rules.fineweb]
    [rules.quality_classifier]       # positives, negatives; threshold = 0.5 or
    keep_top_fraction = 0.1          # the best 10% after dedup (topcut.py); not both
    [dedup]                          # exact, near, ngram, bands, rows, seed, against
    [decontamination]                # enabled, tasks, files, field, ngram, min_tokens
    [output]                         # format (jsonl | parquet), shard_docs, examples_per_rule

Without a `rules` table the chain is FineWeb's order with datatrove's defaults: language,
gopher_repetition, gopher_quality, c4, fineweb. A misspelled rule, key or value is a ConfigError
naming the file and the key, and listing what is valid (so is keep_top_fraction outside (0, 1]
or set together with the rule's threshold). Relative paths in the file are relative to the
file's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tomllib
import typing
from typing import Any

from mai_jax.config import ConfigError
from mai_jax.data.curate import langid, quality, records, rules

RULES = {langid.Language.name: langid.Language, **rules.HEURISTIC_RULES,
         quality.QualityClassifier.name: quality.QualityClassifier}


def register_rule(cls) -> None:
  """Adds a rule class defined outside this package (mai_jax/curate_perplexity.py, which needs
  the model and so cannot live under mai_jax.data)."""
  RULES[cls.name] = cls


DEFAULT_CHAIN = ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb")


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  path: str
  kind: str = "jsonl"
  field: str = "text"


@dataclasses.dataclass(frozen=True)
class Dedup:
  """Exact and MinHash LSH dedup (FineWeb: 5-word shingles, 14 bands x 8 rows)."""
  exact: bool = True
  near: bool = True
  ngram: int = 5
  bands: int = 14
  rows: int = 8
  seed: int = 1
  against: tuple[str, ...] = ()  # signatures.npz of earlier outputs

  def signature_params(self) -> dict:
    return {"ngram": self.ngram, "num_perm": self.bands * self.rows, "seed": self.seed}


@dataclasses.dataclass(frozen=True)
class Decontamination:
  enabled: bool = True
  tasks: bool = True             # mai_jax/tasks/*.jsonl
  files: tuple[str, ...] = ()    # more evaluation JSONL files
  field: str = ""                # their text field ("" : every string value)
  ngram: int = 13
  min_tokens: int = 10


@dataclasses.dataclass(frozen=True)
class Output:
  format: str = "jsonl"
  shard_docs: int = 100_000
  examples_per_rule: int = 3


@dataclasses.dataclass(frozen=True)
class CurateConfig:
  sources: tuple[Source, ...]
  rules: tuple[Any, ...]         # rule instances, applied in order
  dedup: Dedup = Dedup()
  decontamination: Decontamination = Decontamination()
  output: Output = Output()
  workers: int = 1


def _did_you_mean(word: str, choices) -> str:
  close = difflib.get_close_matches(word, list(choices), n=2, cutoff=0.5)
  return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _coerce(where: str, value: Any, hint: Any) -> Any:
  """Checks a TOML/JSON value against a field's type; lists become tuples."""
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin is typing.Union:  # Optional[X]: false or null turns the check off
    if value is None or value is False:
      return None
    return _coerce(where, value, next(a for a in args if a is not type(None)))
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where}: expected a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_coerce(where, v, args[0]) for v in value)
    if len(value) != len(args):
      raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
    return tuple(_coerce(where, v, h) for v, h in zip(value, args))
  if hint is bool and not isinstance(value, bool):
    raise ConfigError(f"{where}: expected true or false, got {value!r}")
  if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
    raise ConfigError(f"{where}: expected an integer, got {value!r}")
  if hint is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)
  if hint is str and not isinstance(value, str):
    raise ConfigError(f"{where}: expected a string, got {value!r}")
  return value


def _section(path: str, name: str, cls, raw: Any):
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: {name} must be a table of keys, got {raw!r}")
  hints = typing.get_type_hints(cls)
  fields = [f.name for f in dataclasses.fields(cls)]
  values = {}
  for key, value in raw.items():
    if key not in fields:
      raise ConfigError(f"{path}: unknown key {name}.{key}{_did_you_mean(key, fields)}; valid "
                        f"keys: {', '.join(fields)}")
    values[key] = _coerce(f"{path}: {name}.{key}", value, hints[key])
  try:
    return cls(**values)
  except (TypeError, ValueError, OSError) as e:
    raise ConfigError(f"{path}: {name}: {e}") from e


def rule_from_params(path: str, name: str, params: Any):
  if name not in RULES:
    raise ConfigError(f"{path}: unknown rule {name!r}{_did_you_mean(name, RULES)}; valid rules: "
                      f"{', '.join(RULES)}")
  return _section(path, f"rules.{name}", RULES[name], params)


def _relative_to(base_dir: str, raw: dict) -> dict:
  """Copies `raw` with its file paths (sources[].path, dedup.against, decontamination.files,
  rules.*.words_file, workdir, positives, negatives) joined to base_dir when relative."""
  def fix(p):
    return os.path.join(base_dir, os.path.expanduser(p)) if isinstance(p, str) else p

  def fix_list(v):
    return [fix(p) for p in v] if isinstance(v, list) else v
  raw = dict(raw)
  if isinstance(raw.get("sources"), list):
    raw["sources"] = [{**e, "path": fix(e["path"])} if isinstance(e, dict) and "path" in e else e
                      for e in raw["sources"]]
  for section, key in (("dedup", "against"), ("decontamination", "files")):
    if isinstance(raw.get(section), dict) and key in raw[section]:
      raw[section] = {**raw[section], key: fix_list(raw[section][key])}
  if isinstance(raw.get("rules"), dict):
    rules_raw = {}
    for name, params in raw["rules"].items():
      if isinstance(params, dict):
        params = dict(params)
        for key in ("words_file", "workdir"):
          if params.get(key):
            params[key] = fix(params[key])
        for key in ("positives", "negatives"):
          if key in params:
            params[key] = fix_list(params[key])
      rules_raw[name] = params
    raw["rules"] = rules_raw
  return raw


def parse(raw: dict, path: str, base_dir: str = "") -> CurateConfig:
  """A CurateConfig from the file's parsed contents (`path` names it in errors); relative file
  paths are relative to base_dir (load: the config file's folder)."""
  if base_dir:
    raw = _relative_to(base_dir, raw)
  known = [f.name for f in dataclasses.fields(CurateConfig)]
  for key in raw:
    if key not in known:
      raise ConfigError(f"{path}: unknown key {key!r}{_did_you_mean(key, known)}; valid keys: "
                        f"{', '.join(known)}")
  entries = raw.get("sources")
  if not isinstance(entries, list) or not entries:
    raise ConfigError(f"{path}: needs at least one [[sources]] entry with name and path")
  sources = []
  for i, entry in enumerate(entries):
    if not isinstance(entry, dict) or "name" not in entry or "path" not in entry:
      raise ConfigError(f"{path}: sources[{i}] needs name and path, got {entry!r}")
    source = _section(path, f"sources[{i}]", Source, entry)
    if source.kind not in records.INPUT_KINDS:
      raise ConfigError(f"{path}: sources[{i}].kind={source.kind!r}; valid kinds: "
                        f"{', '.join(records.INPUT_KINDS)}")
    sources.append(source)
  names = [s.name for s in sources]
  if len(set(names)) != len(names):
    raise ConfigError(f"{path}: source names must be unique, got {names}")
  rule_table = raw.get("rules", {name: {} for name in DEFAULT_CHAIN})
  if not isinstance(rule_table, dict):
    raise ConfigError(f"{path}: rules must be a table of [rules.NAME] sections")
  chain = tuple(rule_from_params(path, name, params) for name, params in rule_table.items())
  cfg = CurateConfig(
      sources=tuple(sources), rules=chain,
      dedup=_section(path, "dedup", Dedup, raw.get("dedup", {})),
      decontamination=_section(path, "decontamination", Decontamination,
                               raw.get("decontamination", {})),
      output=_section(path, "output", Output, raw.get("output", {})),
      workers=_coerce(f"{path}: workers", raw.get("workers", 1), int))
  _validate(cfg, path)
  return cfg


def _validate(cfg: CurateConfig, path: str) -> None:
  if cfg.output.format not in ("jsonl", "parquet"):
    raise ConfigError(f"{path}: output.format={cfg.output.format!r}; valid: jsonl, parquet")
  for key, value in (("output.shard_docs", cfg.output.shard_docs), ("workers", cfg.workers),
                     ("dedup.ngram", cfg.dedup.ngram), ("dedup.bands", cfg.dedup.bands),
                     ("dedup.rows", cfg.dedup.rows),
                     ("decontamination.ngram", cfg.decontamination.ngram)):
    if value < 1:
      raise ConfigError(f"{path}: {key}={value} must be >= 1")
  for key, files in (("dedup.against", cfg.dedup.against),
                     ("decontamination.files", cfg.decontamination.files)):
    for f in files:
      if not os.path.isfile(f):
        raise ConfigError(f"{path}: {key}: file {f!r} not found")


def load(path: str) -> CurateConfig:
  """Reads a .toml or .json curation config."""
  if not os.path.isfile(path):
    raise ConfigError(f"--config {path!r}: file not found")
  try:
    with open(path, "rb") as f:
      if path.endswith(".toml"):
        raw = tomllib.load(f)
      elif path.endswith(".json"):
        raw = json.load(f)
      else:
        raise ConfigError(f"--config {path!r}: name it NAME.toml or NAME.json")
  except (tomllib.TOMLDecodeError, ValueError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"{path}: not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {e}") from e
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: expected a table of keys at the top level")
  return parse(raw, path, os.path.dirname(os.path.abspath(path)))
