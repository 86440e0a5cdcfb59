"""MoE export to Hugging Face: the real expert width when d_ff_expert is left at 0 (parity with
transformers' MixtralForCausalLM), and a one-line refusal of what Mixtral cannot express."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mai_jax import checkpoint as checkpoint_lib  # noqa: E402
from mai_jax import cli  # noqa: E402
from mai_jax import config as C  # noqa: E402
from mai_jax.convert import hf  # noqa: E402
from mai_jax.model import Decoder  # noqa: E402

MOE = C.ModelConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=40,
                    vocab_size=96, num_experts=4, experts_per_token=2, d_ff_expert=0,
                    compute_dtype="float32", remat="none", init_std=0.1)


def _model(**changes):
  cfg = C.Config(model=dataclasses.replace(MOE, **changes))
  return cfg, Decoder(cfg.model, rngs=nnx.Rngs(3))


def test_default_expert_width_exports_as_intermediate_size_and_matches_mixtral(tmp_path):
  cfg, model = _model()
  hf.to_hf(cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)), str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["intermediate_size"] == 40  # d_ff_expert=0 means d_ff
  ref = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path)).eval()
  tokens_BT = np.random.RandomState(0).randint(0, 96, (2, 9))
  with torch.no_grad():
    theirs = ref(torch.tensor(tokens_BT)).logits.numpy()
  ours = np.asarray(model(jnp.asarray(tokens_BT)))
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("changes,key", [
    (dict(router="sigmoid_bias"), "model.router='sigmoid_bias'"),
    (dict(num_shared_experts=1), "model.num_shared_experts=1"),
])
def test_what_mixtral_cannot_express_is_refused_in_one_line(tmp_path, capsys, changes, key):
  cfg, model = _model(**changes)
  with pytest.raises(hf.HFConversionError, match="cannot be exported"):
    hf.to_hf(cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)), str(tmp_path / "direct"))
  assert not os.path.exists(tmp_path / "direct")
  # Through the CLI, on a workdir holding such a model: one line, nothing written.
  workdir = tmp_path / "run"
  params = nnx.to_pure_dict(nnx.state(model))
  checkpoint_lib.save_params(str(workdir / "checkpoints"), 0, params, C.to_dict(cfg), {})
  (workdir / "config.json").write_text(C.to_json(cfg))
  assert cli.main(["convert", "to-hf", "--workdir", str(workdir), "--out",
                   str(tmp_path / "hf")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and key in err and "MixtralForCausalLM" in err, err
  assert not os.path.exists(tmp_path / "hf")
