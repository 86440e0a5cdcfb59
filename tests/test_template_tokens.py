"""The chat template's special tokens: added to a tokenizer that lacks them (SentencePiece user
symbols, Hugging Face added tokens) as single ids after the old ones, and a run from weights with
fewer embedding rows gets the old rows unchanged and new rows at their mean (NumPy reference)."""

import json

import jax
import numpy as np
import pytest

from mai_jax import checkpoint as checkpoint_lib
from mai_jax import config as C
from mai_jax import sample
from mai_jax import sharding as S
from mai_jax import workdir as workdir_lib
from mai_jax.data import template_tokens as TT
from mai_jax.data import tokenizer as tok_lib
from mai_jax.data import tokenizer_files
from mai_jax.data.chat_template import ChatTemplate, load_template
from mai_jax.train import init_from as init_from_lib
from mai_jax.train import loop as loop_lib
from mai_jax.train import prepare, template_vocab

TEXT = " ".join(["Hello there, how are you? I am fine. Reverse these words."] * 40)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
  path = tok_lib.train_sentencepiece([TEXT], 300, str(tmp_path_factory.mktemp("sp") / "t"), 50_000)
  return tok_lib.SentencePieceTokenizer(path)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
  folder = tmp_path_factory.mktemp("hf")
  path = tokenizer_files.train_hf_bpe([TEXT], 300, str(folder / "tokenizer.json"), 50_000)
  (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>",
                                                            "eos_token": "</s>"}))
  return tok_lib.load_tokenizer(path)


def test_the_template_names_its_markers_and_declared_tokens():
  assert TT.template_tokens(load_template("chatml")) == CHATML_TOKENS
  llama = ChatTemplate("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}"
                       "<|end_header_id|>{{ m.content }}<|eot_id|>{% endfor %}", "llama",
                       special_tokens=(("bos_token", "<|begin_of_text|>"),
                                       ("eos_token", "<|eot_id|>")))
  assert TT.template_tokens(llama) == ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                                       "<|end_header_id|>")


@pytest.mark.parametrize("kind", ["sp", "hf"])
def test_a_missing_template_token_becomes_one_id_after_the_old_ones(kind, sp_tokenizer,
                                                                    hf_tokenizer, tmp_path):
  base = sp_tokenizer if kind == "sp" else hf_tokenizer
  text = "<|im_start|>user\nHello there<|im_end|>\n"
  assert len(base.encode("<|im_end|>")) > 1
  assert TT.missing_tokens(base, CHATML_TOKENS) == list(CHATML_TOKENS)
  extended = TT.add_tokens(base, CHATML_TOKENS, str(tmp_path / "a"))
  assert extended.vocab_size == base.vocab_size + 2
  start, end = base.vocab_size, base.vocab_size + 1
  assert extended.encode("<|im_start|>") == [start] and extended.encode("<|im_end|>") == [end]
  ids = extended.encode(text)
  assert ids[0] == start and end in ids and extended.decode(ids) == text
  # Every old id keeps its meaning: ordinary text encodes as before.
  assert extended.encode("Hello there, how are you?") == base.encode("Hello there, how are you?")
  assert (extended.bos_id, extended.eos_id) == (base.bos_id, base.eos_id)
  assert TT.missing_tokens(extended, CHATML_TOKENS) == []
  assert TT.added_at_end(extended, base.vocab_size, CHATML_TOKENS)
  again = TT.add_tokens(base, CHATML_TOKENS, str(tmp_path / "b"))
  assert again.content_hash == extended.content_hash  # deterministic: a resume gets the same file


def test_a_multi_token_end_of_turn_stops_at_its_last_piece(sp_tokenizer):
  end = "<|im_end|>"
  assert len(sp_tokenizer.encode(end)) > 1  # the base tokenizer spells it in pieces
  ids = sp_tokenizer.encode("Fine, thanks." + end)
  stop = sample.turn_end_stop(sp_tokenizer, end)
  assert [n for n in range(1, len(ids) + 1) if stop(ids[:n])] == [len(ids)]


MODEL = C.ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                      vocab_size=300, compute_dtype="float32", remat="none", tie_embeddings=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory, sp_tokenizer):
  """A params-only workdir (random weights, vocab 300) with a tokenizer lacking ChatML's tokens."""
  root = tmp_path_factory.mktemp("src")
  cfg = C.Config(model=MODEL, data=C.DataConfig(seq_len=32))
  _, abstract = workdir_lib.abstract_params(cfg, S.make_mesh(cfg.mesh))
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda a: rng.normal(0, 0.02, a.shape).astype(a.dtype), abstract)
  checkpoint_lib.save_params(str(root / "checkpoints"), 0, params, C.to_dict(cfg), {})
  (root / "config.json").write_text(C.to_json(cfg))
  (root / "tokenizer.model").write_bytes(open(sp_tokenizer.path, "rb").read())
  return {"root": root, "cfg": cfg, "params": jax.device_get(params)}


def test_grown_embeddings_keep_old_rows_and_start_new_rows_at_the_mean(source):
  src = init_from_lib.resolve(str(source["root"]))
  run = C.Config(model=C.ModelConfig(**{**C.to_dict(source["cfg"])["model"], "vocab_size": 302}))
  mesh = S.make_mesh(run.mesh)
  _, target = workdir_lib.abstract_params(run, mesh)
  got = jax.device_get(init_from_lib.restore_params(src, target))
  old_embed = source["params"]["embed"]["embedding"]
  old_unembed = source["params"]["unembed"]
  embed, unembed = got["embed"]["embedding"], got["unembed"]
  assert embed.shape == (302, 32) and unembed.shape == (32, 302)
  np.testing.assert_array_equal(embed[:300], old_embed)
  np.testing.assert_array_equal(unembed[:, :300], old_unembed)
  np.testing.assert_allclose(embed[300:], np.tile(old_embed.mean(0), (2, 1)), rtol=0, atol=1e-7)
  np.testing.assert_allclose(unembed[:, 300:], np.tile(old_unembed.mean(1)[:, None], (1, 2)),
                             rtol=0, atol=1e-7)
  rest = lambda p: {k: v for k, v in p.items() if k not in ("embed", "unembed")}  # noqa: E731
  for a, b in zip(jax.tree.leaves(rest(got)), jax.tree.leaves(rest(source["params"]))):
    np.testing.assert_array_equal(a, b)


def _sft_config(source, tmp_path):
  rows = [{"prompt": f"Reverse these words {i}", "completion": "words these Reverse"}
          for i in range(12)]
  data = tmp_path / "chat.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = C.Config(
      model=MODEL, data=C.DataConfig(seq_len=64, val_fraction=0.2, sources=(
          {"name": "chat", "kind": "chat", "path": str(data)},)),
      optim=C.OptimConfig(learning_rate=1e-30, warmup_steps=0, schedule="constant"),
      checkpoint=C.CheckpointConfig(every_steps=1),
      train=C.TrainConfig(objective="sft", init_from=str(source["root"]), num_steps=1,
                          global_batch_size=8, eval_every=0, eval_batches=1, log_every=1,
                          progress_bar=False))
  C.validate(cfg)
  return cfg


def test_the_run_plans_the_grown_vocabulary_and_commits_the_extended_tokenizer(source, tmp_path):
  cfg, run, logged = _sft_config(source, tmp_path), str(tmp_path / "run"), []
  planned, extension = template_vocab.plan(cfg, run, logged.append)
  assert planned.model.vocab_size == 302 and extension.added == CHATML_TOKENS
  init_source = init_from_lib.prepare(planned, logged.append)  # the shape check allows growth
  choice = prepare.choose_tokenizer(planned, run, init_source, logged.append, extension)
  tok = prepare.commit(planned, run, prepare.check_resume(planned, run, None), choice,
                       logged.append)
  assert tok.encode("<|im_end|>") == [301] and not any("WARNING" in m for m in logged)
  # A rerun finds the extended tokenizer in the workdir and lands on the same vocabulary.
  again, none = template_vocab.plan(cfg, run, logged.append)
  assert none is None and again.model.vocab_size == 302
  with_path = C.apply_overrides(cfg, {"data.tokenizer_path": repr(str(source["root"] /
                                                                      "tokenizer.model"))})
  again, extension = template_vocab.plan(with_path, run, logged.append)
  assert extension.tokenizer.content_hash == tok.content_hash  # the same bytes again
  prepare.cleanup(prepare.TokenizerChoice(None, {}, extension.staging))
  with pytest.raises(C.ConfigError, match="params/embed/embedding"):  # shrinking is refused
    init_from_lib.prepare(C.apply_overrides(planned, {"model.vocab_size": "256"}), print)


@pytest.mark.slow
def test_an_sft_run_adds_the_tokens_and_grows_the_model(source, tmp_path, capsys):
  cfg, run = _sft_config(source, tmp_path), tmp_path / "run"
  loop_lib.train(cfg, str(run))
  out = capsys.readouterr().out
  assert "added the chat template's tokens <|im_start|>, <|im_end|>" in out
  assert "WARNING" not in out
  stored = C.load_json(str(run / "config.json"))
  assert stored.model.vocab_size == 302 and stored.data.tokenizer_path == ""
  tok = workdir_lib.load_tokenizer(stored, str(run))
  assert tok.encode("<|im_end|>") == [301]
  params = jax.device_get(workdir_lib.load_params(stored, str(run), S.make_mesh(stored.mesh))[2])
  old = source["params"]["embed"]["embedding"]
  np.testing.assert_array_equal(params["embed"]["embedding"][:300], old)  # learning rate ~0
  np.testing.assert_allclose(params["embed"]["embedding"][301], old.mean(0), rtol=0, atol=1e-7)
