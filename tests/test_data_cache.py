"""The token cache as a specification: the store equals direct tokenization, an interrupted
write resumes to the same store, unfinished or foreign-tokenizer caches are refused, reads are
batched, and rows are a pure function of the step (exact resume, host slices, weights)."""

import json
import os

import numpy as np
import pytest

from mai_jax import cli
from mai_jax.config import Config, DataConfig, ModelConfig, TrainConfig
from mai_jax.data import cache, cache_pipeline, make_eval_batches, make_train_iterator, sources
from mai_jax.data.pipeline import DataMetrics
from mai_jax.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

SEQ_LEN, BATCH, VOCAB = 32, 8, 512


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = train_sentencepiece(sources.stdlib_documents(30).texts, VOCAB,
                             str(tmp_path_factory.mktemp("tok") / "sp"), max_chars=200_000)
  return SentencePieceTokenizer(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Four JSONL files (one shard each) and a text folder, with a few bad records."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(1)
  vocab = ["def", "class", "return", "x", "=", "(", ")", ":", "\n", "é", "日本", "42"]
  (root / "jsonl").mkdir()
  for f in range(4):
    lines = [json.dumps({"text": " ".join(rng.choice(vocab, int(rng.integers(2, 90)))),
                         "origin": "synthetic"}) for _ in range(40)]
    (root / "jsonl" / f"part{f}.jsonl").write_text("\n".join(lines + ["{broken"]) + "\n")
  (root / "text").mkdir()
  for i in range(30):
    (root / "text" / f"f{i}.txt").write_text(" ".join(rng.choice(vocab, 300)))
  (root / "text" / "bad.txt").write_bytes(b"\xff\xfe bad")
  return root


def config(entries, **data) -> Config:
  return Config(model=ModelConfig(vocab_size=VOCAB),
                data=DataConfig(seq_len=SEQ_LEN, sources=tuple(entries),
                                **{"val_fraction": 0.1, "prefetch_buffer": 0, **data}),
                train=TrainConfig(global_batch_size=BATCH))


def raw_entries(corpus):
  return [{"name": "synthetic", "kind": "jsonl", "path": str(corpus / "jsonl" / "*.jsonl")},
          {"name": "web", "kind": "text", "path": str(corpus / "text")}]


@pytest.fixture(scope="module")
def caches(corpus, tok, tmp_path_factory):
  out = tmp_path_factory.mktemp("caches")
  cfg = config(raw_entries(corpus))
  for spec in sources.source_specs(cfg.data):
    cache.tokenize_source(spec, cfg.data, tok, str(out / spec.name))
  return {name: str(out / name) for name in ("synthetic", "web")}


def cache_config(caches, weights=None, **data):
  weights = weights or {"synthetic": 1.0, "web": 1.0}
  return config([{"name": n, "kind": "cache", "path": caches[n], "weight": w}
                 for n, w in weights.items()], **data)


def direct_documents(corpus, name, tok, split):
  """NumPy reference: the documents of `split` tokenized one by one, framed by bos/eos."""
  spec = sources.source_specs(config(raw_entries(corpus)).data)[["synthetic", "web"].index(name)]
  docs = sources.spec_documents(spec)
  return [np.array([tok.bos_id, *tok.encode(t), tok.eos_id], np.int32)
          for i, t in zip(docs.doc_ids, docs.texts)
          if (sources.split_fraction(i) < 0.1) == (split == "validation")]


def test_cache_equals_direct_tokenization(corpus, tok, caches):
  for name in ("synthetic", "web"):
    manifest, splits = cache.open_cache(caches[name], tok)
    for split in ("train", "validation"):
      docs = direct_documents(corpus, name, tok, split)
      store = splits[split]
      np.testing.assert_array_equal(store.offsets, np.cumsum([0] + [len(d) for d in docs]))
      np.testing.assert_array_equal(store.tokens[:store.num_tokens].read().result(),
                                    np.concatenate(docs))
      assert manifest["splits"][split] == {"tokens": store.num_tokens, "documents": len(docs)}
    assert manifest["tokenizer"]["sha256"] == tok.content_hash
  manifest = cache.open_cache(caches["synthetic"])[0]
  assert manifest["skipped"] == {"invalid JSON": 4}
  assert [f["path"] for f in manifest["files"]] == [f"part{i}.jsonl" for i in range(4)]
  assert all(f["size"] > 0 and len(f["sha256"]) == 64 for f in manifest["files"])
  assert cache.open_cache(caches["web"])[0]["skipped"] == {"invalid UTF-8": 1}
  assert not os.path.exists(os.path.join(caches["web"], "shards"))  # cleaned up when complete


def test_interrupted_tokenize_resumes_to_the_same_store(corpus, tok, caches, tmp_path):
  cfg = config(raw_entries(corpus))
  spec = sources.source_specs(cfg.data)[0]
  out = str(tmp_path / "synthetic")
  assert cache.tokenize_source(spec, cfg.data, tok, out, stop_after_shards=2) == {}
  with pytest.raises(cache.CacheError, match="unfinished token cache.*resumes"):
    cache.open_cache(out)
  logs = []
  cache.tokenize_source(spec, cfg.data, tok, out, log=logs.append)
  assert "4 shards, 2 already done" in logs[0]
  (_, got), (_, want) = cache.open_cache(out), cache.open_cache(caches["synthetic"])
  for split in ("train", "validation"):
    np.testing.assert_array_equal(got[split].offsets, want[split].offsets)
    n = want[split].num_tokens
    np.testing.assert_array_equal(got[split].tokens[:n].read().result(),
                                  want[split].tokens[:n].read().result())


def test_cache_refuses_another_tokenizer_and_missing_folders(tok, caches, tmp_path):
  other = SentencePieceTokenizer(train_sentencepiece(
      sources.stdlib_documents(8).texts, VOCAB, str(tmp_path / "other"), max_chars=50_000))
  with pytest.raises(cache.CacheError, match="was tokenized with .*set data.tokenizer_path"):
    cache.open_cache(caches["web"], other)
  with pytest.raises(cache.CacheError, match="not found.*mai-jax data tokenize"):
    cache.open_cache(str(tmp_path / "nope"))
  with pytest.raises(cache.CacheError, match="was tokenized with"):
    make_train_iterator(cache_config(caches), other)


def rows_of(batch):
  for key in ("inputs", "targets", "segment_ids", "positions"):
    assert batch[key].dtype == np.int32 and batch[key].shape == (len(batch["inputs"]), SEQ_LEN)
  for r in range(len(batch["inputs"])):
    yield {k: v[r] for k, v in batch.items()}


def test_rows_are_whole_document_pieces_with_their_positions(corpus, tok, caches):
  """Every segment is a contiguous piece of one document; all but a row's first start at their
  document's bos with position 0 (the first may continue a document, restarting positions at 0
  as continuation chunks do); no target crosses a document; no padding is needed."""
  docs = {as_bytes(d): d for name in ("synthetic", "web")
          for d in direct_documents(corpus, name, tok, "train")}
  docs_list = list(docs.values())
  it = make_train_iterator(cache_config(caches), tok)
  masked = 0
  for _ in range(5):
    for row in rows_of(next(it)):
      seg, pos = row["segment_ids"], row["positions"]
      masked += int(np.count_nonzero(seg == 0))
      for s in np.unique(seg[seg > 0]):
        where = np.nonzero(seg == s)[0]
        assert (np.diff(where) == 1).all()
        piece = np.concatenate([row["inputs"][where[:1]], row["targets"][where]])
        np.testing.assert_array_equal(pos[where], np.arange(len(where)))
        if where[0] > 0:
          assert piece[0] == tok.bos_id
          assert any((d[:len(piece)] == piece).all() for d in docs_list if len(d) >= len(piece))
        else:
          assert any(contains(d, piece) for d in docs_list)
      for i in np.nonzero(seg == 0)[0]:  # masked: an eos input whose target is the next bos
        assert row["inputs"][i] == tok.eos_id and row["targets"][i] == tok.bos_id
  assert masked > 0


def as_bytes(a):
  return a.tobytes()


def contains(doc, piece):
  return any((doc[i:i + len(piece)] == piece).all() for i in range(len(doc) - len(piece) + 1))


def test_state_is_the_step_and_restores_exactly(caches, tok):
  cfg = cache_config(caches, prefetch_buffer=2)
  it = make_train_iterator(cfg, tok)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state == {"next_index": 7}
  expected = [next(it) for _ in range(3)]
  fresh = make_train_iterator(cfg, tok)
  fresh.set_state(state)
  for got, want in zip([next(fresh) for _ in range(3)], expected):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_hosts_read_only_their_rows_and_reassemble_the_global_batch(caches, tok):
  cfg = cache_config(caches)
  whole = make_train_iterator(cfg, tok)
  quarters = [make_train_iterator(cfg, tok, process_index=i, process_count=4) for i in range(4)]
  for _ in range(3):
    expected = next(whole)
    parts = [next(q) for q in quarters]
    for key in expected:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])
  evals = make_eval_batches(cfg, tok, num_batches=2)
  halves = [make_eval_batches(cfg, tok, num_batches=2, process_index=i, process_count=2)
            for i in range(2)]
  for b, h0, h1 in zip(evals, *halves):
    for key in b:
      np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), b[key])


def test_reads_are_issued_together_then_awaited(caches, tok, monkeypatch):
  events = []

  class Recorded:
    def __init__(self, store):
      self._store = store

    def __getitem__(self, index):
      view = self._store[index]

      class Read:
        def read(self_inner):
          events.append("read")
          future = view.read()

          class Wait:
            def result(self_w):
              events.append("wait")
              return future.result()
          return Wait()
      return Read()

  original = cache_pipeline.StepRows._open

  def recording_open(self):
    original(self)
    for split in self._splits:
      split.tokens = Recorded(split.tokens)
  monkeypatch.setattr(cache_pipeline.StepRows, "_open", recording_open)
  next(make_train_iterator(cache_config(caches), tok))
  # step 0's rows (the reader thread may already be on step 1): every read, then every wait
  assert events[:2 * BATCH] == ["read"] * BATCH + ["wait"] * BATCH


def test_cache_mixture_token_shares_match_weights(caches, tok):
  cfg = cache_config(caches, {"synthetic": 0.8, "web": 0.2})
  metrics = DataMetrics(cfg)
  it = make_train_iterator(cfg, tok)
  for _ in range(50):
    metrics.add(next(it))
  scalars = metrics.scalars()
  shares = np.array([scalars["data/tokens/synthetic"], scalars["data/tokens/web"]])
  np.testing.assert_allclose(shares / shares.sum(), [0.8, 0.2], atol=0.02)
  assert scalars["data/skipped_invalid_json"] == 4 and scalars["data/skipped_invalid_utf_8"] == 1


def test_reader_threads_give_the_same_rows_and_state(caches, tok):
  expected = make_train_iterator(cache_config(caches), tok)
  it = make_train_iterator(cache_config(caches, worker_count=2), tok)
  for _ in range(3):
    want, got = next(expected), next(it)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert it.get_state() == expected.get_state() == {"next_index": 3}


def test_cli_tokenize_inspect_and_errors(corpus, tok, tmp_path, capsys):
  out = tmp_path / "out"
  sources_arg = repr(tuple(raw_entries(corpus)[:1]))
  argv = ["data", "tokenize", "--config", "experiments/tiny.py:smoke", "--out", str(out),
          f"--config.data.sources={sources_arg}", f"--config.data.tokenizer_path={tok.path}"]
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert "--config.data.sources=" in printed and str(out / "synthetic") in printed
  assert cli.main(["data", "inspect", str(out / "synthetic")]) == 0
  assert '"documents"' in capsys.readouterr().out
  assert cli.main(argv[:-1]) == 2  # no tokenizer_path
  assert "data tokenize needs a fixed tokenizer" in capsys.readouterr().err
  assert cli.main(["data", "inspect", str(tmp_path)]) == 2
  assert "unfinished token cache" in capsys.readouterr().err


def test_cache_split_equals_the_raw_split_even_when_hashing_leaves_validation_empty(tok, tmp_path):
  """With few documents no id may hash below val_fraction; like sources.split_indices, the cache
  then moves the train document of smallest hash to validation."""
  for i in range(3):
    (tmp_path / f"p{i}.jsonl").write_text("".join(json.dumps({"text": f"doc {i} {j} " * 20})
                                                  + "\n" for j in range(4)))
  cfg = config([{"name": "few", "kind": "jsonl", "path": str(tmp_path / "*.jsonl")}],
               val_fraction=0.01)
  spec = sources.source_specs(cfg.data)[0]
  cache.tokenize_source(spec, cfg.data, tok, str(tmp_path / "c"))
  _, splits = cache.open_cache(str(tmp_path / "c"))
  for split in ("train", "validation"):
    docs = sources.load_splits(cfg.data, split)[0]
    expected = [np.array([tok.bos_id, *tok.encode(t), tok.eos_id], np.int32) for t in docs.texts]
    assert len(expected) == (1 if split == "validation" else 11)
    np.testing.assert_array_equal(splits[split].offsets,
                                  np.cumsum([0] + [len(d) for d in expected]))
    np.testing.assert_array_equal(
        splits[split].tokens[:splits[split].num_tokens].read().result(), np.concatenate(expected))


def test_tokenize_that_crashes_midway_resumes_to_the_same_store(corpus, tok, caches, tmp_path,
                                                               monkeypatch):
  """A failure inside one shard (as a killed worker would leave it) loses only that shard."""
  cfg = config(raw_entries(corpus))
  spec = sources.source_specs(cfg.data)[0]
  out = str(tmp_path / "synthetic")
  real = cache._tokenize_shard

  def crash_on_third(spec_, base, files, tok_, val_fraction, prefix):
    if prefix.endswith("00002"):
      raise KeyboardInterrupt("killed")
    return real(spec_, base, files, tok_, val_fraction, prefix)
  monkeypatch.setattr(cache, "_tokenize_shard", crash_on_third)
  with pytest.raises(KeyboardInterrupt):
    cache.tokenize_source(spec, cfg.data, tok, out, workers=1)
  assert not os.path.exists(os.path.join(out, cache.MANIFEST))
  monkeypatch.setattr(cache, "_tokenize_shard", real)
  logs = []
  cache.tokenize_source(spec, cfg.data, tok, out, log=logs.append)
  assert "already done" in logs[0] and "0 already done" not in logs[0]
  (_, got), (_, want) = cache.open_cache(out), cache.open_cache(caches["synthetic"])
  for split in ("train", "validation"):
    n = want[split].num_tokens
    np.testing.assert_array_equal(got[split].offsets, want[split].offsets)
    np.testing.assert_array_equal(got[split].tokens[:n].read().result(),
                                  want[split].tokens[:n].read().result())


def test_rerun_skips_an_up_to_date_cache_and_redoes_a_changed_one(corpus, tok, tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (src / "a.jsonl").write_text("".join(json.dumps({"text": f"row {i} " * 9}) + "\n"
                                       for i in range(30)))
  cfg = config([{"name": "s", "kind": "jsonl", "path": str(src / "*.jsonl")}])
  spec, out = sources.source_specs(cfg.data)[0], str(tmp_path / "c")
  first = cache.tokenize_source(spec, cfg.data, tok, out)
  logs = []
  assert cache.tokenize_source(spec, cfg.data, tok, out, log=logs.append) == first
  assert logs == [f"s: {out} is up to date"]
  with open(src / "a.jsonl", "a") as f:
    f.write(json.dumps({"text": "one more document"}) + "\n")
  sources.spec_documents.cache_clear()
  changed = cache.tokenize_source(spec, cfg.data, tok, out)
  total = lambda m: sum(s["documents"] for s in m["splits"].values())
  assert total(changed) == total(first) + 1
  assert changed["files"][0]["sha256"] != first["files"][0]["sha256"]
