"""HF interop: logits parity with `transformers` (PyTorch CPU) and exact export/import round trips."""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mai_jax.convert import hf  # noqa: E402
from safetensors import safe_open  # noqa: E402

VOCAB = 96


def make_hf_llama(directory, *, tie=False, kv_heads=2, rope_theta=10000.0, max_shard_size=None,
                  seed=0):
  """A tiny random LlamaForCausalLM saved with save_pretrained (safetensors)."""
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=kv_heads, rope_theta=rope_theta,
      tie_word_embeddings=tie, rms_norm_eps=1e-5, max_position_embeddings=128)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # default init leaves norms at 1: make them informative
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(directory, **kwargs)
  return model


def hf_logits(model, tokens_BT):
  with torch.no_grad():
    return model(torch.tensor(tokens_BT)).logits.float().numpy()


def tokens(seed=1, shape=(3, 11)):
  return np.random.RandomState(seed).randint(0, VOCAB, shape)


@pytest.mark.parametrize("tie,kv_heads,rope_theta", [
    (False, 2, 10000.0),   # untied, GQA 2
    (True, 1, 10000.0),    # tied, GQA 4 (multi-query)
    (False, 4, 500000.0),  # no GQA, Llama-3 theta
])
def test_import_matches_transformers(tmp_path, tie, kv_heads, rope_theta):
  ref = make_hf_llama(tmp_path, tie=tie, kv_heads=kv_heads, rope_theta=rope_theta)
  cfg, model = hf.from_hf(str(tmp_path))
  assert cfg.model.tie_embeddings == tie and cfg.model.num_kv_heads == kv_heads
  assert cfg.model.rope_theta == rope_theta
  x = tokens()
  got = np.asarray(model(jax.numpy.asarray(x)))
  assert got.shape == (3, 11, VOCAB) and got.dtype == np.float32
  np.testing.assert_allclose(got, hf_logits(ref, x), atol=1e-4, rtol=0)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}


def test_llama3_rope_scaling_matches_transformers(tmp_path):
  """head_dim 8, theta 5e5: wavelengths 6, 167, 4.4e3, 1.2e5 cover all three bands of the rule
  (kept < 64 <= smoothed <= 256 < divided by 8)."""
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rope_parameters=dict(LLAMA3_ROPE),
      rms_norm_eps=1e-5, max_position_embeddings=2048)
  ref = transformers.LlamaForCausalLM(hf_cfg).eval()
  ref.save_pretrained(tmp_path / "src")
  cfg, model = hf.from_hf(str(tmp_path / "src"))
  assert (cfg.model.rope_scaling_factor, cfg.model.rope_original_max_len) == (8.0, 256)
  x = tokens(6, shape=(2, 200))
  ours = np.asarray(model(jax.numpy.asarray(x)))
  np.testing.assert_allclose(ours, hf_logits(ref, x), atol=1e-4, rtol=0)
  # The scaling matters at these lengths: without it the logits miss the 1e-4 tolerance.
  import dataclasses
  from mai_jax.model import Decoder
  from flax import nnx
  plain_cfg = dataclasses.replace(cfg.model, rope_scaling_factor=1.0)
  plain = Decoder(plain_cfg, rngs=nnx.Rngs(0))
  nnx.update(plain, nnx.state(model, nnx.Param))
  assert np.abs(np.asarray(plain(jax.numpy.asarray(x))) - ours).max() > 3e-4
  hf.to_hf(cfg, params_of(model), str(tmp_path / "out"))
  exported = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  np.testing.assert_allclose(hf_logits(exported, x), ours, atol=1e-4, rtol=0)


def test_sharded_checkpoint_with_index(tmp_path):
  ref = make_hf_llama(tmp_path, max_shard_size="20KB")
  assert os.path.isfile(tmp_path / hf.INDEX_FILE)
  assert len(hf.safetensors_files(str(tmp_path))) > 1
  _, model = hf.from_hf(str(tmp_path))
  x = tokens(2)
  np.testing.assert_allclose(np.asarray(model(jax.numpy.asarray(x))), hf_logits(ref, x),
                             atol=1e-4, rtol=0)


def params_of(model):
  from flax import nnx
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_in_transformers_and_round_trips(tmp_path, tie):
  make_hf_llama(tmp_path / "src", tie=tie, rope_theta=20000.0)
  cfg, model = hf.from_hf(str(tmp_path / "src"))
  params = params_of(model)
  files = hf.to_hf(cfg, params, str(tmp_path / "out"), max_shard_bytes=16 << 10)
  assert len(files) > 1 and os.path.isfile(tmp_path / "out" / hf.INDEX_FILE)

  exported = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  x = tokens(3)
  ours = np.asarray(model(jax.numpy.asarray(x)))
  np.testing.assert_allclose(hf_logits(exported, x), ours, atol=1e-4, rtol=0)

  _, again = hf.from_hf(str(tmp_path / "out"))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_of(again))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path):
  ref = make_hf_llama(tmp_path / "f32")
  ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  cfg, model = hf.from_hf(str(tmp_path / "bf16"))
  assert cfg.model.param_dtype == "bfloat16"
  emb = params_of(model)["embed"]["embedding"]
  assert emb.dtype == jax.numpy.bfloat16
  want = ref.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(emb, np.float32), want)


def _edit_config(directory, **changes):
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    raw = json.load(f)
  raw.update(changes)
  with open(path, "w") as f:
    json.dump(raw, f)


@pytest.mark.parametrize("changes,message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}}, "yarn"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "low_freq_factor"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"attention_bias": True}, "biases"),
    ({"hidden_act": "gelu"}, "SwiGLU"),
])
def test_unsupported_configs_are_rejected_clearly(tmp_path, changes, message):
  make_hf_llama(tmp_path)
  _edit_config(tmp_path, **changes)
  with pytest.raises(hf.HFConversionError, match=message):
    hf.from_hf(str(tmp_path))


def test_wrong_shapes_and_missing_files_are_errors(tmp_path):
  with pytest.raises(hf.HFConversionError, match="config.json"):
    hf.from_hf(str(tmp_path))
  make_hf_llama(tmp_path)
  _edit_config(tmp_path, intermediate_size=64)
  with pytest.raises(hf.HFConversionError, match="does not fit"):
    hf.from_hf(str(tmp_path))


def write_hf_tokenizer(directory):
  """A small BPE tokenizer.json (fits the tiny vocab) plus tokenizer_config.json naming bos/eos."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60])
  tok.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 20, trainer)
  assert tok.get_vocab_size() <= VOCAB
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)


def hf_greedy(model, ids, steps):
  seq = list(ids)
  for _ in range(steps):
    seq.append(int(hf_logits(model, [seq])[0, -1].argmax()))
  return seq[len(ids):]


def test_cli_round_trip_with_hf_tokenizer(tmp_path, capsys):
  from mai_jax import cli, sample, workdir
  src, wd, out = tmp_path / "src", tmp_path / "wd", tmp_path / "out"
  ref = make_hf_llama(src, rope_theta=50000.0)
  write_hf_tokenizer(src)
  assert cli.main(["convert", "from-hf", "--hf-dir", str(src), "--workdir", str(wd)]) == 0
  for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    assert (wd / name).is_file(), name

  cfg, model, step, mesh = workdir.load_model(str(wd))
  tok = workdir.load_tokenizer(cfg, str(wd))
  assert step == 0 and (tok.bos_id, tok.eos_id) == (1, 2)
  ids = [tok.bos_id] + tok.encode("def add(a, b):")
  assert tok.decode(ids[1:]) == "def add(a, b):"
  got = sample.generate(model, [ids, ids[:3]], sample.SamplingConfig(5, temperature=0),
                        eos_id=None, pad_id=tok.pad_id, mesh=mesh, rules=cfg.mesh.rules)
  assert got == [hf_greedy(ref, ids, 5), hf_greedy(ref, ids[:3], 5)]

  assert cli.main(["sample", "--workdir", str(wd), "--prompt", "def add(", "--temperature", "0",
                   "--max-new-tokens", "4"]) == 0
  assert "=== 'def add('\ndef add(" in capsys.readouterr().out

  assert cli.main(["convert", "to-hf", "--workdir", str(wd), "--out", str(out)]) == 0
  assert (out / "tokenizer.json").is_file()
  exported = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
  x = tokens(4)
  np.testing.assert_allclose(hf_logits(exported, x), hf_logits(ref, x), atol=1e-4, rtol=0)

  assert cli.main(["convert", "from-hf", "--hf-dir", str(src), "--workdir", str(wd)]) == 2
  assert "already holds checkpoints" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Mixtral

def make_hf_mixtral(directory, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.MixtralConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
      rope_theta=30000.0, rms_norm_eps=1e-5, router_jitter_noise=0.0, tie_word_embeddings=False)
  model = transformers.MixtralForCausalLM(cfg).eval()
  model.save_pretrained(directory)
  return model


def test_mixtral_import_matches_transformers_and_round_trips(tmp_path):
  ref = make_hf_mixtral(tmp_path / "src")
  cfg, model = hf.from_hf(str(tmp_path / "src"))
  assert (cfg.model.num_experts, cfg.model.experts_per_token) == (4, 2)
  x = tokens(5)
  ours = np.asarray(model(jax.numpy.asarray(x)))
  np.testing.assert_allclose(ours, hf_logits(ref, x), atol=1e-4, rtol=0)
  params = params_of(model)
  hf.to_hf(cfg, params, str(tmp_path / "out"))
  exported = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  np.testing.assert_allclose(hf_logits(exported, x), ours, atol=1e-4, rtol=0)
  _, again = hf.from_hf(str(tmp_path / "out"))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_of(again))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mixtral_name_table_covers_every_expert_tensor(tmp_path):
  """The name table alone: every tensor of a Mixtral checkpoint has a row."""
  import types
  make_hf_mixtral(tmp_path)
  with open(tmp_path / "config.json") as f:
    raw = json.load(f)
  fake = types.SimpleNamespace(num_layers=2, scan_layers=True, tie_embeddings=False,
                               num_experts=raw["num_local_experts"])
  table = hf.tensor_table(fake)
  names = set()
  for path in hf.safetensors_files(str(tmp_path)):
    with safe_open(path, "numpy") as f:
      names |= set(f.keys())
  assert set(table) == names
  target = table["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
  assert target.path == ("blocks", "moe", "down_proj") and target.index == (1, 3)


def test_export_from_unstacked_layers(tmp_path):
  """A run with scan_layers=False keeps one params subtree per block; export reads that layout."""
  import dataclasses
  ref = make_hf_llama(tmp_path / "src")
  cfg, model = hf.from_hf(str(tmp_path / "src"))
  stacked = params_of(model)
  unstacked = dict(stacked, blocks={
      i: jax.tree.map(lambda x, i=i: x[i], stacked["blocks"]) for i in range(cfg.model.num_layers)})
  loop_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False))
  hf.to_hf(loop_cfg, unstacked, str(tmp_path / "out"))
  exported = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  x = tokens(7)
  np.testing.assert_allclose(hf_logits(exported, x), hf_logits(ref, x), atol=1e-6, rtol=0)
