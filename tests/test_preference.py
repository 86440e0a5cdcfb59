"""Preference objectives: batches with both rows and the reference log-probs, and the one train
step (concatenated forward, real-pair averages) vs NumPy on separate forwards. DPO end to end
through the CLI is in test_sft.py (slow). The online reference (train.dpo_reference) against the
precomputed one on the same batch."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from mai_jax import checkpoint as checkpoint_lib, config as C, sharding as S
from mai_jax.data import batches, preference_pipeline as pp, tokenizer as tok_lib
from mai_jax.train import step as step_lib
from mai_jax.train.trainer import build_trainer

MODEL = C.ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                      vocab_size=64, compute_dtype="float32", remat="none")


def _rows(rng, pairs=16, seq=16):
  tokens = rng.integers(1, 64, (pairs, seq + 1)).astype(np.int32)
  length = rng.integers(8, seq + 1, pairs)
  seg = (np.arange(seq)[None, :] < length[:, None]).astype(np.int32)
  weights = ((np.arange(seq)[None, :] >= 4) & (seg == 1)).astype(np.float32)  # prompt: 4 tokens
  pos = np.tile(np.arange(seq, dtype=np.int32), (pairs, 1))
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "positions": pos,
          "loss_weights": weights}


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  batch = _rows(rng)
  batch.update({"rejected_" + k: v for k, v in _rows(rng).items()})
  for prefix in ("", "rejected_"):  # the last pair is all padding (a filler pair)
    batch[prefix + "segment_ids"][-1] = 0
    batch[prefix + "loss_weights"][-1] = 0
  batch["ref_chosen_logps"] = rng.normal(-40, 3, 16).astype(np.float32)
  batch["ref_rejected_logps"] = rng.normal(-40, 3, 16).astype(np.float32)
  return batch


def _numpy_logps(model, batch, prefix):
  logits = np.asarray(model(batch[prefix + "inputs"], batch[prefix + "segment_ids"],
                            batch[prefix + "positions"]), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  logp = np.take_along_axis(logits, batch[prefix + "targets"][..., None], -1)[..., 0] - logz
  w = batch[prefix + "loss_weights"] * (batch[prefix + "segment_ids"] != 0)
  return (logp * w).sum(-1), w.sum(-1)


def _dpo_config(objective="dpo", **train):
  return C.Config(model=MODEL, data=C.DataConfig(seq_len=16),
                  train=C.TrainConfig(global_batch_size=16, microbatches=2, objective=objective,
                                      preference_beta=0.5, simpo_gamma=0.3, **train),
                  optim=C.OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant"))


@pytest.mark.parametrize("objective", ["dpo"])  # simpo: same path, formula in test_preference_losses
def test_the_preference_step_matches_numpy_on_separate_forwards(objective):
  cfg = _dpo_config(objective)
  mesh = S.make_mesh(cfg.mesh)
  trainer = build_trainer(cfg, mesh, num_steps=10)
  state, host = trainer.init_state(), _batch()
  if objective != "dpo":
    host = {k: v for k, v in host.items() if not k.startswith("ref_")}
  model = trainer.layout.model_spec.merge(jax.device_get(state.params))
  (c, lc), (r, lr) = _numpy_logps(model, host, ""), _numpy_logps(model, host, "rejected_")
  if objective == "dpo":
    chosen, rejected = 0.5 * (c - host["ref_chosen_logps"]), 0.5 * (r - host["ref_rejected_logps"])
    z = chosen - rejected
  else:
    chosen, rejected = 0.5 * c / np.maximum(lc, 1), 0.5 * r / np.maximum(lr, 1)
    z = chosen - rejected - 0.3
  real = lc > 0
  assert real.sum() == 15
  loss = np.logaddexp(0.0, -z)  # -log sigmoid(z)
  fn = trainer.jit_train_step()
  with S.activate(mesh, cfg.mesh.rules):
    _, metrics = fn(state, step_lib.global_batch(host, trainer.batch_sharding, 16))
  assert float(metrics["loss"]) == pytest.approx(loss[real].mean(), rel=1e-4)
  assert float(metrics["tokens"]) == 15
  assert float(metrics["rewards/chosen"]) == pytest.approx(chosen[real].mean(), rel=1e-4)
  assert float(metrics["rewards/margins"]) == pytest.approx((chosen - rejected)[real].mean(),
                                                            rel=1e-4, abs=1e-6)
  assert float(metrics["rewards/accuracies"]) == pytest.approx((chosen > rejected)[real].mean())


def test_the_online_reference_gives_the_precomputed_loss_and_metrics(tmp_path):
  """float32 weights on both sides, so the two paths agree to float32 rounding: the reference R
  (an init_from workdir, other weights than the policy's) scored by NumPy into the batch vs R
  held frozen in the step (train and eval)."""
  workdir = tmp_path / "sft"
  precomputed = _dpo_config(init_from=str(workdir))
  # one microbatch online (a smaller program to compile; the per-pair keys' split into
  # microbatches is the precomputed step's, and the step's sums do not depend on it)
  online = dataclasses.replace(precomputed, train=dataclasses.replace(
      precomputed.train, dpo_reference="online", microbatches=1))
  assert MODEL.param_dtype == "float32"
  mesh = S.make_mesh(precomputed.mesh)
  pre_trainer = build_trainer(precomputed, mesh, num_steps=10)
  # R: the same init program with another seed (compiled once for all the trainers here)
  ref_params = jax.device_get(build_trainer(_dpo_config(seed=7), mesh).init_state().params)
  checkpoint_lib.save_params(str(workdir / "checkpoints"), 3, ref_params,
                             C.to_dict(precomputed), {})
  (workdir / "config.json").write_text(C.to_json(precomputed))
  host = _batch()
  ref_model = pre_trainer.layout.model_spec.merge(ref_params)
  host["ref_chosen_logps"] = _numpy_logps(ref_model, host, "")[0].astype(np.float32)
  host["ref_rejected_logps"] = _numpy_logps(ref_model, host, "rejected_")[0].astype(np.float32)
  bare = {k: v for k, v in host.items() if not k.startswith("ref_")}
  on_trainer = build_trainer(online, mesh, num_steps=10)
  assert set(step_lib.batch_keys(online)) == set(bare)
  with S.activate(mesh, precomputed.mesh.rules):
    _, pre = pre_trainer.jit_train_step()(
        pre_trainer.init_state(), step_lib.global_batch(host, pre_trainer.batch_sharding, 16))
    batch = step_lib.global_batch(bare, on_trainer.batch_sharding, 16)
    state = on_trainer.init_state()
    loss_sum, pairs = on_trainer.jit_eval_step()(state.params, batch)
    _, on = on_trainer.jit_train_step()(state, batch)
  pre, on = jax.device_get(pre), {**jax.device_get(on), "eval": loss_sum / pairs}
  assert abs(pre["rewards/chosen"]) > 1e-3  # the policy is not the reference: rewards are not 0
  pre["eval"] = pre["loss"]  # the train step's loss is that of the params before the update
  for key in ("loss", "eval", "grad_norm", "rewards/chosen", "rewards/rejected",
              "rewards/margins", "rewards/accuracies", "tokens"):
    assert float(on[key]) == pytest.approx(float(pre[key]), rel=2e-5, abs=1e-6), key


def test_dpo_reference_is_checked():
  with pytest.raises(C.ConfigError, match=r"train.dpo_reference='live' is not one of "
                                          r"'precomputed', 'online'"):
    C.validate(C.Config(train=C.TrainConfig(dpo_reference="live")))
  with pytest.raises(C.ConfigError, match=r"train.dpo_reference='online' is read by "
                                          r"train.objective='dpo' only"):
    C.validate(C.Config(train=C.TrainConfig(dpo_reference="online")))


def test_preference_batches_hold_both_rows_and_the_reference_log_probs(tmp_path):
  text = " ".join(["reverse: red blue green -> green blue red; copy"] * 40)
  tok = tok_lib.SentencePieceTokenizer(tok_lib.train_sentencepiece(
      [text], 300, str(tmp_path / "t"), 100_000))
  words = ["red", "blue", "green", "cat"]
  path = tmp_path / "p.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"reverse: {a} {b}", "chosen": f"{b} {a}",
                                      "rejected": f"{a} {b}"}) + "\n"
                          for a in words for b in words if a != b))
  cfg = C.Config(model=C.ModelConfig(vocab_size=300), data=C.DataConfig(
      seq_len=80, val_fraction=0.25, sources=({"name": "p", "kind": "preference",
                                               "path": str(path)},)),
      train=C.TrainConfig(global_batch_size=4, objective="dpo", init_from=str(tmp_path / "w")))
  C.validate(cfg)
  spec = C.data_sources(cfg.data)[0]
  with pytest.raises(C.ConfigError, match="no reference log-probs"):
    batches.make_train_iterator(cfg, tok)
  records = [p.record for split in ("train", "validation") for p in pp.split_pairs(cfg, spec, split)]
  table = {r: [-float(i), -float(i) - 0.5] for i, r in enumerate(records)}
  ref = pp.reference_file(cfg, tok, spec)
  os.makedirs(os.path.dirname(ref))
  with open(ref, "w") as f:
    json.dump({"step": 1, "logps": table}, f)
  batch = next(batches.make_train_iterator(cfg, tok))
  assert set(batch) == set(step_lib.batch_keys(cfg)) | {"source_tokens"}
  assert batch["ref_chosen_logps"].shape == (4,) and batch["inputs"].shape == (4, 80)
  for i in range(4):
    chosen = tok.decode(batch["targets"][i][batch["loss_weights"][i] == 1].tolist())
    rejected = tok.decode(batch["rejected_targets"][i][batch["rejected_loss_weights"][i] == 1]
                          .tolist())
    a, b = rejected[:-len("<|im_end|>")].split()
    assert chosen == f"{b} {a}<|im_end|>" and rejected.endswith("<|im_end|>")
    assert batch["ref_rejected_logps"][i] == batch["ref_chosen_logps"][i] - 0.5
    assert batch["source_tokens"][i, 0] == ((batch["segment_ids"][i] > 0).sum()
                                            + (batch["rejected_segment_ids"][i] > 0).sum())
  evals = batches.make_eval_batches(cfg, tok, num_batches=10)
  real = sum(int((b["loss_weights"].sum(-1) > 0).sum()) for b in evals)
  assert real == len(pp.split_pairs(cfg, spec, "validation"))  # filler pairs have no weight
