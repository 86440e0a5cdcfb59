"""Logit distillation (train/distill_loss.py, train/distill.py, the top-K teacher cache): the loss
against NumPy for each divergence, temperature and alpha; chunking changes nothing; the top-K loss
with K = V is the full loss; the cache round-trips exactly; teacher errors are one line; and a
student distilled from a tiny teacher beats the same student trained from scratch."""

import numpy as np
import pytest

from mai_jax.train import distill_loss as dl

V = 48


def _sums(cfgs, *args, **kw):
  """distill_sums for each config, all in one jitted function per (configs, argument kinds):
  compiles cost seconds, calls milliseconds."""
  import jax
  key = (cfgs, tuple(sorted(kw)))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda a, k: [dl.distill_sums(c, *a, **k) for c in cfgs])
  return _JITTED[key](args, kw)


KINDS = tuple(dl.DistillLossConfig(kind) for kind in dl.DIVERGENCES)


_JITTED = {}


def _np_logsoftmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_divergence(t_logp, s_logp, kind):
  kl = lambda a, b: (np.exp(a) * (a - b)).sum(-1)  # noqa: E731
  if kind == "forward_kl":
    return kl(t_logp, s_logp)
  if kind == "reverse_kl":
    return kl(s_logp, t_logp)
  m = np.log(0.5 * (np.exp(t_logp) + np.exp(s_logp)))
  return 0.5 * kl(t_logp, m) + 0.5 * kl(s_logp, m)


def _np_loss(student, teacher, targets, weights, alpha, temperature, kind):
  """Float64 reference: sum over tokens of weight * (alpha T^2 D(t_T, s_T) + (1 - alpha) CE)."""
  s, t = student.astype(np.float64), teacher.astype(np.float64)
  ce = -np.take_along_axis(_np_logsoftmax(s), targets[..., None], -1)[..., 0]
  T = temperature[:, None]
  div = _np_divergence(_np_logsoftmax(t / T[..., None]), _np_logsoftmax(s / T[..., None]), kind)
  a = alpha[:, None]
  return ((a * T ** 2 * div + (1 - a) * ce) * weights).sum(), (ce * weights).sum(), \
      (div * weights).sum()


def _inputs(seed=0, b=3, t=10):
  rng = np.random.default_rng(seed)
  student = rng.normal(0, 2, (b, t, V)).astype(np.float32)
  teacher = rng.normal(0, 3, (b, t, V)).astype(np.float32)
  targets = rng.integers(0, V, (b, t)).astype(np.int32)
  weights = (rng.random((b, t)) > 0.25).astype(np.float32)  # some tokens are padding
  return student, teacher, targets, weights


def test_the_loss_matches_numpy():
  student, teacher, targets, weights = _inputs()
  for alpha, temperature in [(1.0, 1.0), (0.5, 2.0), (0.25, 0.7), (0.0, 3.0)]:
    alpha_B = np.full(3, alpha, np.float32)
    temperature_B = np.array([temperature, temperature, 1.3], np.float32)  # rows may differ
    for cfg, sums in zip(KINDS, _sums(KINDS, student, targets, weights, alpha_B, temperature_B,
                                      teacher_logits_BTV=teacher)):
      _check_against_numpy(sums, student, teacher, targets, weights, alpha_B, temperature_B,
                           cfg.divergence)


def _check_against_numpy(sums, student, teacher, targets, weights, alpha_B, temperature_B, kind):
  loss, ce, kd = _np_loss(student, teacher, targets, weights, alpha_B, temperature_B, kind)
  np.testing.assert_allclose(float(sums["loss"]), loss, rtol=2e-5)
  np.testing.assert_allclose(float(sums["ce"]), ce, rtol=2e-5)
  np.testing.assert_allclose(float(sums["kd"]), kd, rtol=2e-4, atol=1e-5)
  assert float(sums["tokens"]) == weights.sum()


def test_chunked_equals_unchunked_in_value_and_gradient():
  import jax
  kind = "jsd"  # its terms include both KL directions
  student, teacher, targets, weights = _inputs(1)
  alpha_B, temperature_B = np.full(3, 0.6, np.float32), np.full(3, 1.5, np.float32)
  def loss(s, chunk):
    return dl.distill_sums(dl.DistillLossConfig(kind, chunk_tokens=chunk), s, targets, weights,
                           alpha_B, temperature_B, teacher_logits_BTV=teacher)["loss"]
  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  whole, grad_whole = grad_fn(student, 0)
  for chunk in (7,):  # 30 tokens: four chunks, the last ragged (padded with weight-0 tokens)
    value, grad = grad_fn(student, chunk)
    np.testing.assert_allclose(float(value), float(whole), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(grad_whole), rtol=1e-5, atol=1e-7)


def test_top_k_with_k_equal_to_the_vocabulary_is_the_full_loss():
  import jax
  student, teacher, targets, weights = _inputs(2)
  logp = np.asarray(jax.nn.log_softmax(teacher, -1))
  order = np.argsort(-logp, -1).astype(np.int32)  # sorted like lax.top_k: any order is fine
  alpha_B, temperature_B = np.full(3, 0.5, np.float32), np.array([1.0, 2.0, 0.5], np.float32)
  cfgs = tuple(dl.DistillLossConfig(kind, chunk_tokens=8) for kind in dl.DIVERGENCES)
  fulls = _sums(cfgs, student, targets, weights, alpha_B, temperature_B,
                teacher_logits_BTV=teacher)
  tops = _sums(cfgs, student, targets, weights, alpha_B, temperature_B, teacher_ids_BTK=order,
               teacher_logps_BTK=np.take_along_axis(logp, order, -1))
  for full, top in zip(fulls, tops):
    for key in ("loss", "kd", "ce"):
      np.testing.assert_allclose(float(top[key]), float(full[key]), rtol=1e-5, atol=1e-6)


def test_top_k_below_the_vocabulary_adds_a_tail_bin():
  """K < V: the divergence over the K tokens and one bin for the rest, vs NumPy (T = 1)."""
  import jax
  student, teacher, targets, weights = _inputs(3)
  k = 5
  logp = np.asarray(jax.nn.log_softmax(teacher, -1), np.float64)
  ids = np.argsort(-logp, -1)[..., :k].astype(np.int32)
  t_top = np.take_along_axis(logp, ids, -1)
  s_logp = _np_logsoftmax(student.astype(np.float64))
  s_top = np.take_along_axis(s_logp, ids, -1)
  with np.errstate(divide="ignore"):
    t_bins = np.concatenate([t_top, np.log1p(-np.exp(t_top).sum(-1, keepdims=True))], -1)
    s_bins = np.concatenate([s_top, np.log1p(-np.exp(s_top).sum(-1, keepdims=True))], -1)
  got = _sums(KINDS, student, targets, weights, np.ones(3, np.float32), np.ones(3, np.float32),
              teacher_ids_BTK=ids, teacher_logps_BTK=t_top.astype(np.float32))
  for cfg, sums in zip(KINDS, got):
    want = (_np_divergence(t_bins, s_bins, cfg.divergence) * weights).sum()
    np.testing.assert_allclose(float(sums["kd"]), want, rtol=1e-4)


# ------------------------------------------------------------------------ teacher, cache, step

import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402

from flax import nnx  # noqa: E402

from mai_jax import checkpoint as checkpoint_lib  # noqa: E402
from mai_jax import cli  # noqa: E402
from mai_jax import config as C  # noqa: E402
from mai_jax import sharding as S  # noqa: E402
from mai_jax import workdir as workdir_lib  # noqa: E402
from mai_jax.config import ConfigError  # noqa: E402
from mai_jax.data import cache as cache_lib, sources, teacher_cache as tc  # noqa: E402
from mai_jax.data.batches import make_train_iterator  # noqa: E402
from mai_jax.data.cache_pipeline import window_features  # noqa: E402
from mai_jax.data.tokenizer import SentencePieceTokenizer, train_sentencepiece  # noqa: E402
from mai_jax.model import Decoder  # noqa: E402
from mai_jax.train import distill_cache, step as step_lib  # noqa: E402
from mai_jax.train.distill_teacher import Teacher  # noqa: E402
from mai_jax.train.trainer import build_trainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_K, SEQ, VOCAB = 8, 16, 512


def _cfg(tok_path, text="", **train) -> C.Config:
  return C.Config(
      model=C.ModelConfig(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16,
                          d_ff=64, vocab_size=VOCAB, compute_dtype="float32", remat="none"),
      data=C.DataConfig(seq_len=SEQ, tokenizer_path=tok_path, val_fraction=0.1, prefetch_buffer=0,
                        sources=({"name": "docs", "kind": "text", "path": text},)),
      optim=C.OptimConfig(warmup_steps=0, schedule="constant"),
      train=C.TrainConfig(global_batch_size=8, num_steps=4, **train))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random-init teacher workdir (params-only checkpoint, config, tokenizer), a token cache of
  20 stdlib files and its top-8 teacher cache written in two sittings (one batch, then the rest)."""
  root = tmp_path_factory.mktemp("distill")
  tok_path = train_sentencepiece(sources.stdlib_documents(20).texts, VOCAB, str(root / "sp"),
                                 max_chars=100_000)
  tok = SentencePieceTokenizer(tok_path)
  (root / "text").mkdir()
  for i, doc in enumerate(sources.stdlib_documents(40).texts[-6:]):  # ~150 windows of 16
    (root / "text" / f"{i}.txt").write_text(doc[:1500])
  cfg = _cfg(tok_path, str(root / "text"))
  teacher = root / "teacher"
  with nnx.use_eager_sharding(False):  # eager, on one device: no init step to compile
    params = nnx.to_pure_dict(nnx.split(Decoder(cfg.model, rngs=nnx.Rngs(0)))[1])
  checkpoint_lib.save_params(str(teacher / "checkpoints"), 0, params, C.to_dict(cfg),
                             {"tokenizer": {"path": tok_path, "sha256": tok.content_hash}})
  (teacher / "config.json").write_text(C.to_json(cfg))
  shutil.copy(tok_path, teacher / "tokenizer.model")
  tokens = root / "tokens"
  cache_lib.tokenize_source(sources.source_specs(cfg.data)[0], cfg.data, tok, str(tokens))
  logs = []
  first = distill_cache.write_teacher_cache(str(teacher), str(tokens), TOP_K, dtype="float32",
                                            log=logs.append, stop_after=1)
  unfinished = os.path.isfile(os.path.join(first, tc.MANIFEST))
  out = distill_cache.write_teacher_cache(str(teacher), str(tokens), TOP_K, dtype="float32",
                                          log=logs.append)
  return {"cfg": cfg, "tok": tok, "teacher": str(teacher), "tokens": str(tokens), "out": out,
          "text": str(root / "text"),
          "logs": logs, "finished_early": unfinished, "params": params}


def _windows(tiny):
  split = cache_lib.open_cache(tiny["tokens"])[1]["train"]
  n = split.num_windows(SEQ)
  feats = [window_features(t, w, split.offsets, SEQ)
           for w, t in enumerate(split.read_windows(np.arange(n), SEQ))]
  return {k: np.stack([f[k] for f in feats]) for k in feats[0]}


@pytest.mark.slow  # the tiny fixture: a tokenizer, a token cache, a teacher cache
def test_the_teacher_cache_round_trips_exactly_and_resumes(tiny):
  import jax
  assert not tiny["finished_early"]  # stop_after=1 left it unfinished
  assert any("resuming" in line for line in tiny["logs"])
  cache = tc.open_teacher_cache(tiny["out"])
  feats, cfg = _windows(tiny), tiny["cfg"]
  n = feats["inputs"].shape[0]
  assert cache.manifest["num_windows"] == n and cache.ids.shape == (n * SEQ, TOP_K)
  # the same batches of 8 windows through the same teacher function: bit for bit what was stored
  teacher = Teacher(tiny["teacher"], cfg, S.make_mesh(cfg.mesh))
  fn = jax.jit(distill_cache.topk_fn(teacher, TOP_K))
  pad = -n % 8
  padded = {k: np.concatenate([v, np.zeros((pad, SEQ), np.int32)]) for k, v in feats.items()}
  logps, ids = [], []
  sharding = step_lib.batch_sharding(S.make_mesh(cfg.mesh), cfg)
  for b in range(0, n + pad, 8):
    lp, i = fn(teacher.params,
               step_lib.global_batch({k: v[b:b + 8] for k, v in padded.items()}, sharding, 8))
    logps.append(np.asarray(lp)), ids.append(np.asarray(i))
  np.testing.assert_array_equal(np.asarray(cache.ids.read().result()),
                                np.concatenate(ids)[:n].reshape(n * SEQ, TOP_K))
  stored = np.asarray(cache.logps.read().result())
  np.testing.assert_array_equal(stored, np.concatenate(logps)[:n].reshape(n * SEQ, TOP_K))
  # independently: float32 NumPy log-softmax of the float32 model, at the stored ids
  model = workdir_lib.load_model(tiny["teacher"])[1]
  logits = np.asarray(model(feats["inputs"], feats["segment_ids"], feats["positions"]), np.float64)
  ref = _np_logsoftmax(logits).reshape(n * SEQ, VOCAB)
  stored_ids = np.asarray(cache.ids.read().result())
  np.testing.assert_allclose(stored, np.take_along_axis(ref, stored_ids, -1), atol=5e-3)
  assert np.all(np.diff(stored, axis=-1) <= 0)  # the K largest, in order


@pytest.mark.slow  # the tiny fixture: a tokenizer, a token cache, a teacher cache
def test_training_batches_carry_each_window_s_cached_teacher(tiny):
  cfg = _cfg(tiny["cfg"].data.tokenizer_path, tiny["text"], objective="distill",
             distill_cache="topk8")
  cfg = C.apply_overrides(cfg, {"data.sources": repr(
      [{"name": "stdlib", "kind": "cache", "path": tiny["tokens"]}])})
  C.validate(cfg)
  batch = next(make_train_iterator(cfg, tiny["tok"], process_index=0, process_count=1))
  feats = _windows(tiny)
  cache = tc.open_teacher_cache(tiny["out"])
  ids, logps = np.asarray(cache.ids.read().result()), np.asarray(cache.logps.read().result())
  for row in range(batch["inputs"].shape[0]):
    (w,) = np.nonzero((feats["inputs"] == batch["inputs"][row]).all(-1))[0][:1]
    np.testing.assert_array_equal(batch[tc.IDS_KEY][row], ids[w * SEQ:(w + 1) * SEQ])
    np.testing.assert_array_equal(batch[tc.LOGPS_KEY][row], logps[w * SEQ:(w + 1) * SEQ])
  with pytest.raises(tc.TeacherCacheError, match=r"data\.seq_len=16"):
    make_train_iterator(C.apply_overrides(cfg, {"data.seq_len": "32"}), tiny["tok"],
                        process_index=0, process_count=1)


@pytest.mark.slow  # the tiny fixture: a tokenizer, a token cache, a teacher cache
def test_the_online_step_matches_numpy_with_scheduled_alpha(tiny):
  import jax
  cfg = _cfg(tiny["cfg"].data.tokenizer_path, tiny["text"], objective="distill",
             distill_teacher=tiny["teacher"], distill_alpha=0.2, distill_alpha_final=0.8,
             distill_temperature=2.0, distill_chunk_tokens=48)
  C.validate(cfg)
  mesh = S.make_mesh(cfg.mesh)
  trainer = build_trainer(cfg, mesh)
  state = trainer.init_state()
  host = {k: v[:8] for k, v in _windows(tiny).items()}
  batch = step_lib.global_batch(host, trainer.batch_sharding, 8)
  spec = trainer.layout.model_spec
  student = np.asarray(jax.jit(lambda p, b: spec.merge(p)(
      b["inputs"], b["segment_ids"], b["positions"]))(state.params, batch))
  teacher = np.asarray(jax.jit(trainer.teacher.logits)(trainer.teacher.params, batch), np.float32)
  step = trainer.jit_train_step()
  state, metrics = step(state, batch)
  weights = (host["segment_ids"] != 0).astype(np.float32)
  loss, ce, kd = _np_loss(student, teacher, host["targets"], weights, np.full(8, 0.2),
                          np.full(8, 2.0), "forward_kl")
  np.testing.assert_allclose(float(metrics["total_loss"]), loss / weights.sum(), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["loss"]), ce / weights.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["distill/kd"]), kd / weights.sum(), rtol=1e-3)
  _, metrics = step(state, batch)
  np.testing.assert_allclose(float(metrics["distill/alpha"]), 0.2 + 0.6 / 4, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["distill/temperature"]), 2.0)


@pytest.mark.slow  # the tiny fixture: a tokenizer, a token cache, a teacher cache
def test_teacher_errors_are_one_line_config_errors(tiny, tmp_path):
  tok_path, text = tiny["cfg"].data.tokenizer_path, tiny["text"]
  mesh = S.make_mesh(tiny["cfg"].mesh)
  wrong_vocab = C.apply_overrides(
      _cfg(tok_path, text, objective="distill", distill_teacher=tiny["teacher"]),
      {"model.vocab_size": "1024"})
  with pytest.raises(ConfigError, match=r"vocabulary has 512 tokens but the student's "
                                        r"model.vocab_size is 1024"):
    build_trainer(wrong_vocab, mesh)
  other = type("Tok", (), {"content_hash": "0" * 64, "path": "other.model"})()
  with pytest.raises(ConfigError, match="set --config.data.tokenizer_path=.*tokenizer.model"):
    Teacher(tiny["teacher"], tiny["cfg"], mesh).check_tokenizer(other)
  assert cli.main(["distill", "cache", "--teacher", tiny["teacher"], "--data", tiny["tokens"],
                   "--top-k", "9999"]) == 2  # more than the vocabulary
  assert not os.path.exists(os.path.join(tiny["tokens"], "distill", "topk9999"))


def test_distill_settings_are_checked_before_anything_runs(tmp_path):
  missing = _cfg("", "docs", objective="distill", distill_teacher=str(tmp_path / "nope"))
  with pytest.raises(ConfigError, match=r"train\.distill_teacher=.*nope: no such directory"):
    build_trainer(missing, S.make_mesh(missing.mesh))
  with pytest.raises(ConfigError, match="needs a teacher"):
    C.validate(_cfg("", "docs", objective="distill"))
  with pytest.raises(ConfigError, match="every data.sources entry must have kind 'cache'"):
    C.validate(_cfg("", "docs", objective="distill", distill_cache="topk8"))
  with pytest.raises(ConfigError, match="objective='distill' only"):
    C.validate(_cfg("", "docs", distill_teacher=str(tmp_path)))
  with pytest.raises(ConfigError, match=r"train\.distill_alpha=1\.5 must be in \[0, 1\]"):
    C.validate(_cfg("", "docs", objective="distill", distill_teacher="t", distill_alpha=1.5))
  assert cli.main(["distill", "cache", "--teacher", str(tmp_path / "nope"), "--data",
                   str(tmp_path)]) == 2


# ----------------------------------------------------------------------------------- configs

def test_phi3_mini_has_transformers_parameter_count():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from mai_jax.model import count_params
  cfg = C.load_experiment(os.path.join(REPO, "experiments", "phi3_mini.py")).model
  hf = transformers.Phi3Config(  # Phi-3-mini's published config (its defaults, spelled out)
      hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
      num_key_value_heads=32, vocab_size=32064, tie_word_embeddings=False)
  assert (cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
          cfg.vocab_size, cfg.tie_embeddings) == (
              hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers, hf.num_attention_heads,
              hf.num_key_value_heads, hf.vocab_size, hf.tie_word_embeddings)
  assert cfg.head_dim == hf.hidden_size // hf.num_attention_heads
  def hf_params(layers):  # transformers' own modules, on the meta device (no memory, no init)
    with torch.device("meta"):
      model = transformers.Phi3ForCausalLM(transformers.Phi3Config(
          **{**hf.to_dict(), "num_hidden_layers": layers}))
    return sum(p.numel() for p in model.parameters())
  one, two = hf_params(1), hf_params(2)  # embeddings, head and norm + one layer; + another layer
  hf_count = one + (hf.num_hidden_layers - 1) * (two - one)
  assert count_params(cfg) == hf_count == 3_821_079_552


def test_the_mai1_student_experiment_states_its_planner_figures():
  import importlib.util
  path = os.path.join(REPO, "experiments", "distill_mai1_phi3.py")
  spec = importlib.util.spec_from_file_location("distill_mai1_phi3", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  figures, doc = module.planner_figures(), module.__doc__
  cfg = module.get_config()
  C.validate(cfg)
  assert cfg.train.objective == "distill" and cfg.train.distill_cache == "topk64"
  assert f"~{figures['teacher_cache_gpu_days']:,.0f} H100 GPU-days" in doc
  assert f"~{figures['student_train_gpu_days']:,.0f} H100 GPU-days" in doc
  assert f"~{figures['ratio']:.0f}x" in doc
  assert f"{figures['student_params']:,} parameters" in doc
  assert re.search(r"384 B per token, 38\.4 TB", doc) and figures["cache_bytes"] == 38.4e12


# ------------------------------------------------------------------------- distillation works

@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory):
  """experiments/distill_tiny.py's teacher, 60 steps on the default corpus (the stdlib)."""
  from mai_jax.train import loop
  workdir = str(tmp_path_factory.mktemp("teacher") / "run")
  loop.train(C.load_experiment(os.path.join(REPO, "experiments", "distill_tiny.py")), workdir)
  return workdir


@pytest.mark.slow
def test_a_distilled_student_beats_the_same_student_from_scratch(trained_teacher, tmp_path):
  from mai_jax.train import loop
  student = os.path.join(REPO, "experiments", "distill_tiny.py") + ":student"
  tok = {"data.tokenizer_path": repr(os.path.join(trained_teacher, "tokenizer.model"))}
  losses = {}
  for name, extra in (("scratch", {}), ("distilled", {
      "train.objective": "'distill'", "train.distill_teacher": repr(trained_teacher)})):
    cfg = C.apply_overrides(C.load_experiment(student), {**tok, **extra})
    C.validate(cfg)
    losses[name] = loop.train(cfg, str(tmp_path / name)).eval_loss
  # same tokens, same steps, same init: the teacher's soft targets are worth ~0.03-0.04 nats here
  # (benchmarks/results/distill_cpu.json has the curve)
  assert losses["distilled"] < losses["scratch"] - 0.01, losses
