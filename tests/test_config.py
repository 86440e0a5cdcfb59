"""Config: literal overrides against field types, every error names the key, experiments load."""

import dataclasses
import glob
import json
import os

import pytest

from mai_jax import config as C

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(REPO, "experiments", "*.py")))

REQUIRED_KEYS = (
    "train.num_steps train.log_every train.seed train.global_batch_size train.eval_every "
    "data.seq_len checkpoint.every_steps checkpoint.max_to_keep mesh.data mesh.fsdp mesh.expert "
    "mesh.tensor model.num_layers model.d_model model.num_heads model.num_kv_heads model.head_dim "
    "model.d_ff model.vocab_size model.rope_theta model.tie_embeddings optim.learning_rate "
    "optim.warmup_steps optim.schedule optim.weight_decay optim.grad_clip train.microbatches "
    "train.profile_steps").split()


@pytest.mark.parametrize("dotted", REQUIRED_KEYS)
def test_contract_keys_exist(dotted):
  section, key = dotted.split(".")
  assert key in {f.name for f in dataclasses.fields(getattr(C.Config(), section))}


def test_overrides_parse_literals_against_types():
  cfg = C.apply_overrides(C.Config(), {
      "train.num_steps": "17", "optim.learning_rate": "1e-3", "model.tie_embeddings": "True",
      "model.remat": "dots", "train.profile_steps": "(3, 5)", "optim.schedule": "'wsd'",
      "model.rope_theta": "500000"})
  assert cfg.train.num_steps == 17
  assert cfg.optim.learning_rate == 1e-3
  assert cfg.model.tie_embeddings is True
  assert cfg.model.remat == "dots"
  assert cfg.train.profile_steps == (3, 5)
  assert cfg.optim.schedule == "wsd"
  assert cfg.model.rope_theta == 500000.0 and isinstance(cfg.model.rope_theta, float)
  assert C.apply_overrides(cfg, {"train.profile_steps": "None"}).train.profile_steps is None
  # A string field keeps the text as typed, even when it reads as a number.
  assert C.apply_overrides(cfg, {"data.tokenizer_path": "1e3"}).data.tokenizer_path == "1e3"


def test_overrides_never_evaluate_code(tmp_path):
  marker = tmp_path / "pwned"
  with pytest.raises(C.ConfigError, match="expected int"):
    C.apply_overrides(C.Config(), {"train.num_steps": f"__import__('os').mkdir('{marker}')"})
  assert not marker.exists()


@pytest.mark.parametrize("overrides, message", [
    ({"train.num_step": "3"}, r"unknown config key train.num_step \(did you mean 'num_steps'\?\)"),
    ({"trian.seed": "3"}, r"unknown config section 'trian'.*did you mean 'train'"),
    ({"train.num_steps": "3.5"}, r"--config.train.num_steps='3.5': expected int"),
    ({"model.tie_embeddings": "1"}, r"model.tie_embeddings.*expected bool"),
    ({"train.profile_steps": "(1, 2, 3)"}, r"train.profile_steps"),
])
def test_override_errors_name_the_key(overrides, message):
  with pytest.raises(C.ConfigError, match=message):
    C.apply_overrides(C.Config(), overrides)


@pytest.mark.parametrize("overrides, devices, message", [
    ({"model.remat": "ful"}, None, r"model.remat='ful' is not one of .*did you mean 'full'"),
    ({"model.num_kv_heads": "3"}, None, r"model.num_kv_heads=3 must divide model.num_heads=4"),
    ({"train.microbatches": "3"}, None, r"train.microbatches=3 must divide"),
    ({"mesh.fsdp": "3"}, 8, r"multiply to 3 but there are 8 devices"),
    ({"mesh.fsdp": "-1", "mesh.tensor": "3"}, 8, r"does not divide 8"),
    ({"mesh.fsdp": "-1", "mesh.data": "-1"}, 8, r"only one mesh axis may be -1"),
    ({"train.global_batch_size": "4"}, 8, r"must be divisible by the 8 devices"),
    ({"train.profile_steps": "(5, 2)"}, None, r"train.profile_steps=\(5, 2\)"),
    ({"optim.schedule": "linear"}, None, r"optim.schedule='linear' is not one of"),
])
def test_validation_errors(overrides, devices, message):
  cfg = C.apply_overrides(C.Config(), overrides)
  with pytest.raises(C.ConfigError, match=message):
    C.validate(cfg, devices)


def test_mesh_minus_one_takes_the_rest():
  sizes = C.mesh_shape(C.MeshConfig(data=2, fsdp=-1, tensor=2), 8)
  assert dict(sizes) == {"data": 2, "stage": 1, "fsdp": 2, "expert": 1, "tensor": 2}


def test_json_round_trip(tmp_path):
  cfg = C.apply_overrides(C.Config(), {"train.profile_steps": "(1, 4)", "mesh.tensor": "2"})
  path = tmp_path / "config.json"
  path.write_text(C.to_json(cfg))
  assert C.load_json(str(path)) == cfg
  raw = json.loads(path.read_text())
  raw["train"]["num_stepz"] = 3
  path.write_text(json.dumps(raw))
  with pytest.raises(C.ConfigError, match="unknown key train.num_stepz"):
    C.load_json(str(path))


def test_a_workdirs_config_json_is_a_config_spec_and_init_from_a_string(tmp_path):
  cfg = C.apply_overrides(C.Config(), {"train.init_from": "/runs/base/checkpoints/500"})
  assert cfg.train.init_from == "/runs/base/checkpoints/500"  # a bare path needs no quotes
  (tmp_path / "config.json").write_text(C.to_json(cfg))
  assert C.load_experiment(str(tmp_path / "config.json")) == cfg
  with pytest.raises(C.ConfigError, match="file not found"):
    C.load_experiment(str(tmp_path / "other.json"))
  bad = C.Config(train=C.TrainConfig(init_from=3))
  with pytest.raises(C.ConfigError, match="train.init_from=3 must be a string"):
    C.validate(bad)


def test_missing_experiment_file_suggests_close_names():
  with pytest.raises(C.ConfigError, match=r"not found; did you mean .*tiny.py"):
    C.load_experiment(os.path.join(REPO, "experiments", "tinyy.py"))


def test_unknown_variant_lists_the_valid_ones():
  with pytest.raises(C.ConfigError, match=r"unknown variant 'smok' \(did you mean 'smoke'"):
    C.load_experiment(os.path.join(REPO, "experiments", "tiny.py") + ":smok")


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_every_experiment_and_variant_loads_and_validates(path):
  for variant in (None,) + C.experiment_variants(path):
    cfg = C.load_experiment(path + (f":{variant}" if variant else ""))
    C.validate(cfg)
    assert C.from_dict(C.to_dict(cfg)) == cfg
