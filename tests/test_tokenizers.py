"""One tokenizer interface over SentencePiece, Hugging Face tokenizer.json and tiktoken rank files:
exact round trips, explicit special ids, ids equal to each library's own encoder, training from
configured sources, and a run that refuses to resume with a different tokenizer."""

import base64
import json
import pickle

import numpy as np
import pytest
import tiktoken
import tokenizers

from mai_jax import cli
from mai_jax.config import Config, DataConfig, ModelConfig
from mai_jax.data import sources, tokenizer as tokenizer_lib, tokenizer_files
from mai_jax.data.tokenizer import TokenizerError, check_tokenizer_record, load_tokenizer
from mai_jax.data.tokenizer_files import CL100K_PATTERN, HFTokenizer, TiktokenTokenizer

TEXTS = ["def f(x):\n    return x  # two  spaces\n\n", "naïve café, 日本語, emoji \U0001F9EC",
         "", "<|eos|> looks special but is text", "trailing\n\n"]


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("hf") / "tokenizer.json")
  return tokenizer_files.train_hf_bpe(sources.stdlib_documents(20).texts, 700, path, 200_000)


@pytest.fixture(scope="module")
def rank_path(tmp_path_factory):
  """A small byte-level BPE rank file: the 256 bytes plus merges, each made of earlier tokens."""
  ranks = {bytes([i]): i for i in range(256)}
  for merge in [b"  ", b"    ", b"re", b"in", b"de", b"def", b"ret", b"retu", b"return", b"se",
                b"self", b"\n    "]:
    ranks[merge] = len(ranks)
  path = tmp_path_factory.mktemp("tt") / "tiny.tiktoken"
  path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
  return str(path), ranks


def test_hf_tokenizer_json(hf_path):
  tok = load_tokenizer(hf_path)
  assert isinstance(tok, HFTokenizer) and tok.vocab_size == 700
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  reference = tokenizers.Tokenizer.from_file(hf_path)
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
  assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
  assert pickle.loads(pickle.dumps(tok)).encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_tiktoken_rank_file(rank_path):
  path, ranks = rank_path
  tok = load_tokenizer(path)
  assert isinstance(tok, TiktokenTokenizer) and tok.vocab_size == len(ranks) + 3
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (len(ranks), len(ranks) + 1, len(ranks) + 2)
  reference = tiktoken.Encoding("ref", pat_str=CL100K_PATTERN, mergeable_ranks=ranks,
                                special_tokens={})
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert tok.decode(ids) == text and max(ids, default=0) < len(ranks)
  assert ranks[b"return"] in tok.encode("return x")
  assert pickle.loads(pickle.dumps(tok)).encode(TEXTS[0]) == tok.encode(TEXTS[0])
  # the pattern is part of the tokenizer's identity
  assert TiktokenTokenizer(path, r"\S+|\s+").content_hash != tok.content_hash


def test_bad_tokenizer_files_are_clear_errors(tmp_path):
  with pytest.raises(TokenizerError, match="not found"):
    load_tokenizer(str(tmp_path / "missing.json"))
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(TokenizerError, match="not a Hugging Face tokenizer.json"):
    load_tokenizer(str(tmp_path / "bad.json"))
  (tmp_path / "bad.tiktoken").write_text("not-base64-and-no-rank\n")
  with pytest.raises(TokenizerError, match="not a tiktoken rank file"):
    load_tokenizer(str(tmp_path / "bad.tiktoken"))


def test_workdir_record_refuses_a_different_tokenizer(hf_path, rank_path, tmp_path):
  hf, tt = load_tokenizer(hf_path), load_tokenizer(rank_path[0])
  check_tokenizer_record(str(tmp_path), hf)
  record = json.loads((tmp_path / tokenizer_lib.RECORD_FILE).read_text())
  assert record["sha256"] == hf.content_hash and record["path"] == hf_path
  check_tokenizer_record(str(tmp_path), load_tokenizer(hf_path))  # same file: fine
  with pytest.raises(TokenizerError, match="was started with tokenizer .*tokenizer.json.*fresh "
                                           "--workdir"):
    check_tokenizer_record(str(tmp_path), tt)


def test_train_tokenizer_cli_from_a_configured_source(tmp_path, capsys):
  (tmp_path / "docs.jsonl").write_text("".join(
      json.dumps({"text": f"document {i}: " + "alpha beta gamma " * (i % 7 + 1)}) + "\n"
      for i in range(200)))
  sources_arg = repr(({"name": "d", "kind": "jsonl", "path": str(tmp_path / "docs.jsonl")},))
  for out in ("sp.model", "hf.json"):
    argv = ["data", "train-tokenizer", "--config", "experiments/tiny.py:smoke", "--out",
            str(tmp_path / out), f"--config.data.sources={sources_arg}"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    tok = load_tokenizer(str(tmp_path / out))
    assert tok.vocab_size == 512  # the smoke model's vocab_size, padded on this small corpus
    assert tok.decode(tok.encode("alpha beta")) == "alpha beta"
  assert cli.main(["data", "train-tokenizer", "--config", "experiments/tiny.py:smoke", "--out",
                   str(tmp_path / "x.bin")]) == 2
  assert "NAME.model" in capsys.readouterr().err


def test_tokenizer_path_of_each_kind_is_used_by_the_run(hf_path):
  cfg = Config(model=ModelConfig(vocab_size=700), data=DataConfig(tokenizer_path=hf_path))
  tok = tokenizer_lib.load_or_train_tokenizer(cfg, "/nonexistent")
  assert isinstance(tok, HFTokenizer)
  ids = np.asarray(tok.encode(TEXTS[0]))
  assert (ids < 700).all()
