"""The data pipeline as a specification: exact tokenization, a stable split, packed rows that match
a plain NumPy reference, exact resume, host slicing that reassembles the global batch, and clear
errors for sources with nothing usable."""

import dataclasses
import json
import os

import numpy as np
import pytest

from mai_jax.config import Config, DataConfig, ModelConfig, TrainConfig
from mai_jax.data import pipeline, sources, tokenizer as tokenizer_lib
from mai_jax.data import (SourceError, TokenizerError, load_or_train_tokenizer, load_split,
                          make_eval_batches, make_train_iterator, train_sentencepiece)

SEQ_LEN, BATCH, VOCAB = 64, 8, 512


def tiny_config(**data_overrides) -> Config:
  data = DataConfig(seq_len=SEQ_LEN, max_files=40, tokenizer_train_chars=300_000,
                    val_fraction=0.1, prefetch_buffer=0)
  return Config(model=ModelConfig(vocab_size=VOCAB),
                data=dataclasses.replace(data, **data_overrides),
                train=TrainConfig(global_batch_size=BATCH))


@pytest.fixture(scope="module")
def cfg():
  return tiny_config()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("workdir"))


@pytest.fixture(scope="module")
def tok(cfg, workdir):
  return load_or_train_tokenizer(cfg, workdir)


@pytest.fixture(scope="module")
def short_docs_root(tmp_path_factory):
  """A corpus of many short files and a few long ones: many documents per packed row, many
  document ends, and documents cut into several chunks."""
  root = tmp_path_factory.mktemp("short_docs")
  rng = np.random.default_rng(0)
  words = ["def", "return", "self", "x", "=", "(", ")", ":", "\n    ", "é", "日本", "\t", "1234"]
  for i in range(160):
    n = int(rng.integers(150, 400)) if i % 40 == 0 else int(rng.integers(1, 15))
    (root / f"doc{i:03d}.py").write_text(" ".join(rng.choice(words, n)), encoding="utf-8")
  return str(root)


@pytest.fixture(scope="module")
def mixed_docs_root(tmp_path_factory):
  """Documents from a few tokens to several rows long (built here, not read from the interpreter's
  stdlib, whose files differ between Python builds): chunks that end a document and chunks cut
  from the middle of one both occur within a few steps, on any machine."""
  root = tmp_path_factory.mktemp("mixed_docs")
  rng = np.random.default_rng(1)
  words = ["import", "os", "def", "return", "the", "value", "of", "a", "list", "(", ")", ":",
           "\n", "\n    ", "x", "=", "1", "+", "for", "in", "range", "# note", "é", "日本"]
  for i in range(120):
    n = int(rng.integers(400, 1200)) if i % 4 == 0 else int(rng.integers(5, 120))
    (root / f"doc{i:03d}.py").write_text(" ".join(rng.choice(words, n)), encoding="utf-8")
  return str(root)


def reference_chunks(tok, texts, seq_len):
  """NumPy reference: every document as [bos] + ids + [eos], cut into chunks of <= seq_len + 1
  tokens overlapping by one (chunk c = tokens[c*seq_len : c*seq_len + seq_len + 1])."""
  chunks = []
  for text in texts:
    t = np.array([tok.bos_id] + tok.encode(text) + [tok.eos_id], np.int32)
    chunks += [t[s:s + seq_len + 1] for s in range(0, len(t) - 1, seq_len)]
  return chunks


def segments(batch):
  """Checks the row layout of a batch and yields each packed chunk as its token sequence."""
  inputs, targets = batch["inputs"], batch["targets"]
  seg, pos = batch["segment_ids"], batch["positions"]
  for key in pipeline.FEATURES:
    assert batch[key].dtype == np.int32 and batch[key].shape == inputs.shape
  for r in range(len(inputs)):
    used = int(np.count_nonzero(seg[r]))
    assert (seg[r, used:] == 0).all(), "padding only at the end of a row"
    assert (inputs[r, used:] == 0).all() and (targets[r, used:] == 0).all()
    assert (pos[r, used:] == 0).all()
    ids = seg[r, :used]
    if used:
      assert ids[0] == 1 and (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all()
    for s in np.unique(ids):
      where = np.nonzero(seg[r] == s)[0]
      x, y = inputs[r, where], targets[r, where]
      np.testing.assert_array_equal(pos[r, where], np.arange(len(where)))
      # targets are the next tokens of the same chunk
      np.testing.assert_array_equal(x[1:], y[:-1])
      yield np.concatenate([x[:1], y])


def as_key(a):
  return tuple(int(v) for v in a)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip_and_byte_fallback(tok):
  assert tok.vocab_size == VOCAB
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  texts = ["class Foo:\n    def bar(self, x):\n\treturn x  # two  spaces\n\n",
           "naïve café, Größe, 日本語のテキスト, Ελληνικά, emoji \U0001F9EC",
           "a rare char: \uA66E (cyrillic multiocular o) and \U00010348 (gothic hwair)",
           "", " leading space", "trailing newlines\n\n\n"]
  for text in texts:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tokenizer_lib.UNK_ID not in ids
  rare = tok.encode("\uA66E")
  assert all(tok.id_to_piece(i).startswith("<0x") for i in rare)  # UTF-8 bytes, not <unk>
  assert len(rare) == len("\uA66E".encode("utf-8"))


def test_tokenizer_reused_from_workdir(cfg, workdir, tok):
  path = os.path.join(workdir, tokenizer_lib.TOKENIZER_FILE)
  mtime = os.stat(path).st_mtime_ns
  again = load_or_train_tokenizer(cfg, workdir, process_index=1)  # loads, does not train
  assert again.path == path and again.content_hash == tok.content_hash
  assert os.stat(path).st_mtime_ns == mtime
  assert not [n for n in os.listdir(workdir) if n != tokenizer_lib.TOKENIZER_FILE]
  explicit = tiny_config(tokenizer_path=path)
  assert load_or_train_tokenizer(explicit, "/nonexistent").content_hash == tok.content_hash


def test_tokenizer_errors(cfg, tmp_path, workdir):
  with pytest.raises(TokenizerError, match="process 1.*process 0"):
    load_or_train_tokenizer(cfg, str(tmp_path), process_index=1)
  bigger = dataclasses.replace(cfg, model=ModelConfig(vocab_size=1024))
  with pytest.raises(TokenizerError, match="model.vocab_size=1024"):
    load_or_train_tokenizer(bigger, workdir)
  with pytest.raises(TokenizerError, match="not found"):
    load_or_train_tokenizer(tiny_config(tokenizer_path=str(tmp_path / "missing.model")), "x")


def test_training_is_deterministic_and_padded_to_vocab_size(tmp_path):
  texts = sources.stdlib_documents(5).texts
  a = train_sentencepiece(texts, 2048, str(tmp_path / "a"), max_chars=20_000)
  b = train_sentencepiece(texts, 2048, str(tmp_path / "b"), max_chars=20_000)
  assert open(a, "rb").read() == open(b, "rb").read()
  padded = tokenizer_lib.SentencePieceTokenizer(a)
  assert padded.vocab_size == 2048  # 20k characters cannot support 2048 pieces: padded
  text = texts[0][:500]
  assert padded.decode(padded.encode(text)) == text
  assert max(padded.encode(text)) < 2048


# ----------------------------------------------------------------------------------------------
# Sources and split


def test_split_is_disjoint_deterministic_and_complete(cfg):
  train, val = load_split(cfg.data, "train"), load_split(cfg.data, "validation")
  assert len(train) and len(val)
  assert not set(train.doc_ids) & set(val.doc_ids)
  everything = sources.stdlib_documents(cfg.data.max_files)
  assert everything.files_scanned == cfg.data.max_files
  assert sorted(train.doc_ids + val.doc_ids) == sorted(everything.doc_ids)
  assert load_split(cfg.data, "validation").doc_ids == val.doc_ids
  for doc_id in val.doc_ids:
    assert sources.split_fraction(doc_id) < cfg.data.val_fraction
  # The split of a document depends on its id only (pinned: changing the hash reshuffles splits).
  assert sources.split_fraction("os.py") == pytest.approx(0.85095, abs=1e-5)


def test_stdlib_corpus_contents():
  docs = sources.stdlib_documents(0)
  ids = set(docs.doc_ids)
  assert "os.py" in ids and "json/__init__.py" in ids
  assert any(i.startswith("pydoc_data/topics.py:") for i in ids)  # docs expanded per topic
  assert "pydoc_data/topics.py" not in ids
  assert not any(part in ("test", "tests", "site-packages", "__pycache__")
                 for i in ids for part in i.split("/")[:-1])
  assert list(docs.doc_ids) == sorted(docs.doc_ids)
  # What distributions ship separately (Debian's python3-tk, idle, ...) is never read, so Debian's
  # python3 and a pyenv build of the same version read the same files.
  assert not any(i.split("/")[0] in ("idlelib", "tkinter", "turtledemo", "turtle.py", "distutils",
                                     "lib2to3", "_distutils_system_mod.py")
                 or i.startswith("ctypes/macholib/") for i in ids)


def test_stdlib_file_selection_is_distribution_independent(tmp_path):
  for rel in ("os.py", "json/__init__.py", "idlelib/editor.py", "tkinter/__init__.py",
              "turtle.py", "ctypes/macholib/dyld.py", "ctypes/util.py",
              "_distutils_system_mod.py", "_sysconfigdata__linux_x86_64-linux-gnu.py",
              "test/test_os.py", "site-packages/pkg/mod.py", "notes.txt"):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text("x = 1\n")
  assert sources.stdlib_files(str(tmp_path)) == ["ctypes/util.py", "json/__init__.py",
                                                 "notes.txt", "os.py"]


def test_bad_files_are_skipped_and_counted(tmp_path):
  (tmp_path / "good.py").write_text("print('héllo')\n", encoding="utf-8")
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "also_good.txt").write_text("some notes\n")
  (tmp_path / "binary.py").write_bytes(b"\x7fELF\x00\x01\x02")
  (tmp_path / "latin1.py").write_bytes(b"caf\xe9 = 1\n")
  (tmp_path / "empty.py").write_text("  \n")
  os.symlink(tmp_path / "missing_target", tmp_path / "dangling.py")
  (tmp_path / "image.png").write_bytes(b"\x89PNG")  # not a text suffix: never scanned
  docs = sources.stdlib_documents(0, str(tmp_path))
  assert docs.doc_ids == ("good.py", "pkg/also_good.txt")
  assert docs.files_scanned == 6
  assert docs.skipped_counts() == {"binary": 1, "invalid UTF-8": 1, "empty": 1,
                                   "unreadable (FileNotFoundError)": 1}
  data = DataConfig(val_fraction=0.0)
  assert load_split(data, "train", root=str(tmp_path)).doc_ids == docs.doc_ids


def test_source_without_documents_is_a_clear_error(tmp_path):
  (tmp_path / "binary.py").write_bytes(b"\x00\x01")
  with pytest.raises(SourceError, match=r"data.source='stdlib' \(stdlib at .*\) yielded no "
                                        r"train documents: 1 files scanned.*1 binary"):
    load_split(DataConfig(), "train", root=str(tmp_path))
  with pytest.raises(SourceError, match="no validation documents.*data.val_fraction"):
    load_split(DataConfig(val_fraction=0.0), "validation", root=None)


# ----------------------------------------------------------------------------------------------
# Packing, shuffling, resume, host slicing


def test_train_batches_match_numpy_reference(cfg, tok, mixed_docs_root):
  train = load_split(cfg.data, "train", root=mixed_docs_root)
  reference = {as_key(c) for c in reference_chunks(tok, train.texts, SEQ_LEN)}
  assert len(reference) > 2 * len(train)  # long documents are cut into several chunks
  it = make_train_iterator(cfg, tok, source_root=mixed_docs_root)
  seen, ends, real, steps = 0, 0, 0, 100
  for _ in range(steps):
    batch = next(it)
    assert batch["inputs"].shape == (BATCH, SEQ_LEN)
    real += int(np.count_nonzero(batch["segment_ids"]))
    for chunk in segments(batch):
      assert as_key(chunk) in reference  # a whole chunk of one document: no cross-doc targets
      seen += 1
      ends += chunk[-1] == tok.eos_id
  assert seen >= steps * BATCH and ends > 0
  assert real > 0.9 * steps * BATCH * SEQ_LEN  # first-fit packing leaves little padding


def test_packing_of_short_documents_matches_numpy_reference(tok, short_docs_root):
  cfg = tiny_config(max_files=0)
  train = load_split(cfg.data, "train", root=short_docs_root)
  chunks = reference_chunks(tok, train.texts, SEQ_LEN)
  reference = {as_key(c) for c in chunks}
  assert len(chunks) > len(train)  # the long documents were cut into chunks
  it = make_train_iterator(cfg, tok, source_root=short_docs_root)
  seen, ends, steps = 0, 0, 10
  for _ in range(steps):
    for chunk in segments(next(it)):
      assert as_key(chunk) in reference
      seen += 1
      ends += chunk[-1] == tok.eos_id
  assert seen > 2 * steps * BATCH and ends > steps * BATCH  # several documents per row
  val = load_split(cfg.data, "validation", root=short_docs_root)
  batches = make_eval_batches(cfg, tok, num_batches=1000, source_root=short_docs_root)
  assert (sorted(as_key(c) for b in batches for c in segments(b))
          == sorted(as_key(c) for c in reference_chunks(tok, val.texts, SEQ_LEN)))


def test_eval_batches_cover_validation_exactly_once_and_are_deterministic(cfg, tok,
                                                                          mixed_docs_root):
  val = load_split(cfg.data, "validation", root=mixed_docs_root)
  expected = sorted(as_key(c) for c in reference_chunks(tok, val.texts, SEQ_LEN))
  batches = make_eval_batches(cfg, tok, num_batches=10_000, source_root=mixed_docs_root)
  assert len(batches) > 2
  got = sorted(as_key(c) for b in batches for c in segments(b))
  assert got == expected  # every validation token is scored once, none twice
  again = make_eval_batches(cfg, tok, num_batches=2, source_root=mixed_docs_root)
  assert len(again) == 2
  for a, b in zip(again, batches):
    for key in pipeline.FEATURES:
      np.testing.assert_array_equal(a[key], b[key])


def assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("prefetch,corpus,skip", [(0, "stdlib", 5), (2, "stdlib", 5),
                                                   (2, "short", 37)])
def test_iterator_state_round_trip(tok, short_docs_root, prefetch, corpus, skip):
  """Resume after `skip` batches (37 on the short corpus: a few epochs in, mid-epoch)."""
  cfg = tiny_config(prefetch_buffer=prefetch, max_files=0 if corpus == "short" else 40)
  root = short_docs_root if corpus == "short" else None
  it = make_train_iterator(cfg, tok, source_root=root)
  for _ in range(skip):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = [next(it) for _ in range(4)]
  fresh = make_train_iterator(cfg, tok, source_root=root)
  fresh.set_state(state)
  assert_batches_equal([next(fresh) for _ in range(4)], expected)


def test_shuffle_depends_on_seeds(tok):
  first = lambda c: next(make_train_iterator(c, tok))["inputs"]
  base = first(tiny_config())
  np.testing.assert_array_equal(first(tiny_config()), base)
  assert not np.array_equal(first(tiny_config(shuffle_seed=1)), base)
  other = dataclasses.replace(tiny_config(), train=TrainConfig(global_batch_size=BATCH, seed=1))
  assert not np.array_equal(first(other), base)


def test_host_slices_reassemble_the_global_batch(cfg, tok):
  whole = make_train_iterator(cfg, tok)
  halves = [make_train_iterator(cfg, tok, process_index=i, process_count=2) for i in range(2)]
  for _ in range(3):
    expected = next(whole)
    parts = [next(h) for h in halves]
    for key in pipeline.FEATURES:
      assert parts[0][key].shape == (BATCH // 2, SEQ_LEN)
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])
  eval_whole = make_eval_batches(cfg, tok, num_batches=2)
  eval_halves = [make_eval_batches(cfg, tok, num_batches=2, process_index=i, process_count=2)
                 for i in range(2)]
  for b, (p0, p1) in zip(eval_whole, zip(*eval_halves)):
    for key in pipeline.FEATURES:
      np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), b[key])
  with pytest.raises(ValueError, match="global_batch_size=8 must be divisible by the 3"):
    make_train_iterator(cfg, tok, process_index=0, process_count=3)


def test_worker_processes_give_the_same_stream(tok):
  """mp_prefetch runs only the one-to-one tokenize stage, so worker_count does not change data."""
  expected = make_train_iterator(tiny_config(), tok)
  it = make_train_iterator(tiny_config(worker_count=1), tok)
  try:
    assert_batches_equal([next(it) for _ in range(3)], [next(expected) for _ in range(3)])
    state = json.loads(json.dumps(it.get_state()))
    following = [next(it) for _ in range(2)]
  finally:
    it.close()
  resumed = make_train_iterator(tiny_config(worker_count=1), tok)
  try:
    resumed.set_state(state)
    assert_batches_equal([next(resumed) for _ in range(2)], following)
  finally:
    resumed.close()


def test_documents_are_framed_only_with_the_special_tokens_the_tokenizer_has():
  from types import SimpleNamespace
  from mai_jax.data.pipeline import Tokenize
  encode = lambda text: [10 + ord(c) % 5 for c in text]  # noqa: E731
  both = SimpleNamespace(bos_id=2, eos_id=3, encode=encode)
  no_bos = SimpleNamespace(bos_id=-1, eos_id=3, encode=encode)
  assert Tokenize(both).map("ab").tolist() == [2, *encode("ab"), 3]
  assert Tokenize(no_bos).map("ab").tolist() == [*encode("ab"), 3]
