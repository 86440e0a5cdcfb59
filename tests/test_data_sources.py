"""Configured sources as a specification: every file format read exactly, bad data skipped and
counted (never a crash), clear errors naming the bad entry, and weighted mixtures whose realized
token shares match the weights."""

import dataclasses
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from mai_jax import config as config_lib
from mai_jax.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from mai_jax.data import (SourceError, load_or_train_tokenizer, make_train_iterator, pipeline,
                          sources)
from mai_jax.data.pipeline import FEATURES, DataMetrics, make_eval_batches

SEQ_LEN, BATCH, VOCAB = 64, 8, 512


@pytest.fixture(autouse=True)
def small_shuffle_window(monkeypatch):
  """Each new iterator tokenizes a whole chunk-shuffle window before its first batch; a small
  window keeps these tests fast without changing what they check."""
  monkeypatch.setattr(pipeline, "_CHUNK_SHUFFLE_WINDOW", 64)


def make_config(entries, **data) -> Config:
  return Config(model=ModelConfig(vocab_size=VOCAB),
                data=DataConfig(seq_len=SEQ_LEN, sources=tuple(entries), val_fraction=0.1,
                                prefetch_buffer=0, tokenizer_train_chars=200_000, **data),
                train=TrainConfig(global_batch_size=BATCH))


def words(rng, n):
  vocab = ["alpha", "beta", "gamma", "def", "return", "=", "(", ")", "\n", "é", "日本"]
  return " ".join(rng.choice(vocab, n))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  """The same kind of text in each format, plus bad records of every kind."""
  root = tmp_path_factory.mktemp("corpora")
  rng = np.random.default_rng(0)
  text_dir = root / "web"
  (text_dir / "sub").mkdir(parents=True)
  for i in range(30):
    (text_dir / "sub" / f"page{i:02d}.txt").write_text(words(rng, 40 + i), encoding="utf-8")
  (text_dir / "bad_utf8.txt").write_bytes(b"caf\xe9\n")
  (text_dir / "binary.txt").write_bytes(b"\x7fELF\x00\x00")
  (text_dir / "empty.txt").write_text("   \n")
  os.mkfifo(text_dir / "pipe.txt")  # never opened: reading a FIFO would block forever
  os.symlink(text_dir / "gone", text_dir / "dangling.txt")
  (root / "long").mkdir()
  (root / "long" / "huge.txt").write_text("x" * 2_500_001)  # split into 3 pieces, not dropped
  jsonl = root / "synthetic.jsonl"
  lines = [json.dumps({"text": words(rng, 30), "model": "teacher-7b", "prompt_id": i})
           for i in range(40)]
  lines += ["{not json", json.dumps({"content": "wrong field"}), json.dumps({"text": ""}),
            json.dumps({"text": 17}), ""]
  jsonl.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe"}\n')
  parquet = root / "code.parquet"
  pq.write_table(pa.table({"content": [words(rng, 50) for _ in range(25)] + [None, ""],
                           "lang": ["py"] * 27}), parquet)
  ar = root / "books.array_record"
  writer = ArrayRecordWriter(str(ar), "group_size:1")
  for i in range(20):
    writer.write(words(rng, 60).encode())
  writer.write(b"\xff\xfe bad")
  writer.close()
  return {"root": root, "text": str(text_dir), "long": str(root / "long"), "jsonl": str(jsonl), "parquet": str(parquet),
          "arrayrecord": str(ar)}


def entries(corpora, **weights):
  spec = {"web": ("text", corpora["text"], ""), "synthetic": ("jsonl", corpora["jsonl"], ""),
          "code": ("parquet", corpora["parquet"], "content"),
          "books": ("arrayrecord", corpora["arrayrecord"], "")}
  return [{"name": n, "kind": spec[n][0], "path": spec[n][1], "weight": w, "field": spec[n][2]}
          for n, w in weights.items()]


def test_each_format_reads_exactly_its_documents_and_counts_bad_ones(corpora):
  read = lambda name: sources.spec_documents(
      sources.source_specs(make_config(entries(corpora, **{name: 1.0})).data)[0])
  web = read("web")
  assert len([i for i in web.doc_ids if i.startswith("sub/")]) == 30
  assert web.skipped_counts() == {"invalid UTF-8": 1, "binary": 1, "empty": 1,
                                  "unreadable (FileNotFoundError)": 1}
  assert web.files_scanned == 34  # 30 pages, 3 bad files, the dangling link; not the FIFO
  long = sources.spec_documents(sources.SourceSpec("long", "text", corpora["long"]))
  assert long.doc_ids == ("huge.txt#0", "huge.txt#1", "huge.txt#2")
  assert "".join(long.texts) == "x" * 2_500_001 and long.skipped_counts() == {"split_long": 1}
  synthetic = read("synthetic")
  records = [json.loads(l) for l in open(corpora["jsonl"], "rb").read().split(b"\n")[:40]]
  assert list(synthetic.texts) == [r["text"] for r in records]  # provenance fields ignored
  assert synthetic.doc_ids[3] == "synthetic.jsonl:3"
  assert synthetic.skipped_counts() == {"invalid JSON": 1, "no text field": 2, "empty": 1,
                                        "invalid UTF-8": 1}
  code = read("code")
  assert list(code.texts) == pq.read_table(corpora["parquet"])["content"].to_pylist()[:25]
  assert code.skipped_counts() == {"empty": 2}
  books = read("books")
  assert len(books) == 20 and books.skipped_counts() == {"invalid UTF-8": 1}


def test_glob_paths_and_unreadable_files(corpora, tmp_path):
  cfg = make_config([{"name": "web", "kind": "text", "path": corpora["text"] + "/sub/page0*.txt"}])
  docs = sources.spec_documents(sources.source_specs(cfg.data)[0])
  assert docs.doc_ids == tuple(f"page{i:02d}.txt" for i in range(10))
  (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
  (tmp_path / "ok.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
  bad = make_config([{"name": "p", "kind": "parquet", "path": str(tmp_path / "*.parquet")}])
  assert sources.spec_documents(sources.source_specs(bad.data)[0]).skipped_counts() == {
      "unreadable (ArrowInvalid)": 1}
  with pytest.raises(SourceError, match="data.sources 'p'.*yielded no train documents.*1 files "
                                        "scanned.*unreadable"):
    sources.load_splits(bad.data, "train")
  with pytest.raises(SourceError, match="'nothing'.*matches no files"):
    sources.load_splits(make_config([{"name": "nothing", "kind": "text",
                                      "path": str(tmp_path / "none/*.txt")}]).data, "train")
  with pytest.raises(ConfigError, match="no column 'text'.*content, lang"):
    sources.load_splits(make_config([{"name": "c", "kind": "parquet",
                                      "path": corpora["parquet"]}]).data, "train")


@pytest.mark.parametrize("entry,message", [
    ("web", r"data.sources\[0\]: expected a dict, got str"),
    ({"name": "web", "kind": "jsonl", "path": "x", "wieght": 1}, r"unknown key\(s\) \['wieght'\]"),
    ({"name": "web", "kind": "csv", "path": "x"}, r"\('web'\): 'kind'='csv' must be one of"),
    ({"name": "web", "kind": "jsonl"}, "needs a 'path'"),
    ({"name": "web", "kind": "jsonl", "path": "x", "weight": 0}, "'weight'=0 must be a positive number"),
    ({"name": "a b", "kind": "jsonl", "path": "x"}, "'name' must be a short word"),
])
def test_bad_source_entries_are_named(entry, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(make_config([entry]))
  with pytest.raises(ConfigError, match="name 'x' is used twice"):
    config_lib.validate(make_config([{"name": "x", "kind": "stdlib"}] * 2))
  with pytest.raises(ConfigError, match="mixes kind 'cache' with raw sources"):
    config_lib.validate(make_config([{"name": "x", "kind": "stdlib"},
                                     {"name": "y", "kind": "cache", "path": "/c"}]))


def test_sources_override_from_the_cli_as_literals(tmp_path):
  raw = "({'name': 'web', 'kind': 'jsonl', 'path': '/d/*.jsonl', 'weight': 0.7},)"
  cfg = config_lib.apply_overrides(Config(), {"data.sources": raw})
  assert cfg.data.sources == ({"name": "web", "kind": "jsonl", "path": "/d/*.jsonl",
                               "weight": 0.7},)
  assert config_lib.from_dict(json.loads(config_lib.to_json(cfg))) == cfg  # config.json round trip
  assert sources.source_specs(cfg.data) == (sources.SourceSpec("web", "jsonl", "/d/*.jsonl", 0.7),)


@pytest.fixture(scope="module")
def tok(corpora, tmp_path_factory):
  cfg = make_config(entries(corpora, web=1.0, synthetic=1.0, code=1.0))
  return load_or_train_tokenizer(cfg, str(tmp_path_factory.mktemp("tok")))


def test_mixture_token_shares_match_weights_and_resume_exactly(corpora, tok):
  cfg = make_config(entries(corpora, web=0.6, synthetic=0.3, code=0.1))
  it = make_train_iterator(cfg, tok)
  metrics = DataMetrics(cfg)
  steps = 60
  for _ in range(steps):
    batch = next(it)
    assert batch["source_tokens"].shape == (BATCH, 3)
    # every real token is credited to exactly one source
    np.testing.assert_array_equal(batch["source_tokens"].sum(1),
                                  np.count_nonzero(batch["segment_ids"], axis=1))
    metrics.add(batch)
  scalars = metrics.scalars()
  shares = np.array([scalars[f"data/tokens/{n}"] for n in ("web", "synthetic", "code")])
  shares /= shares.sum()
  np.testing.assert_allclose(shares, [0.6, 0.3, 0.1], atol=0.03)
  assert scalars["data/skipped_invalid_utf_8"] == 2  # web + synthetic
  assert scalars["data/skipped_empty"] == 4 and scalars["data/skipped_binary"] == 1
  assert scalars["data/skipped_unreadable"] == 1
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  fresh = make_train_iterator(cfg, tok)
  fresh.set_state(state)
  for got, want in zip([next(fresh) for _ in range(3)], expected):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_mixture_is_deterministic_in_the_seed_and_eval_covers_every_source(corpora, tok):
  cfg = make_config(entries(corpora, web=0.5, books=0.5))
  first = lambda c: next(make_train_iterator(c, tok))["inputs"]
  np.testing.assert_array_equal(first(cfg), first(cfg))
  reseeded = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shuffle_seed=3))
  assert not np.array_equal(first(reseeded), first(cfg))
  batches = make_eval_batches(cfg, tok, num_batches=1000)
  evaluated = sum(int(np.count_nonzero(b["segment_ids"])) for b in batches)
  val = sources.load_splits(cfg.data, "validation")
  assert len(val) == 2 and all(len(v) for v in val)
  # every validation token is a target once: a document of n ids has n + 1 targets
  assert evaluated == sum(len(tok.encode(t)) + 1 for v in val for t in v.texts)
  assert set(batches[0]) == set(FEATURES)
