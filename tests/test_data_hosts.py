"""Host-invariant global batches: 2 real JAX processes x 4 CPU devices (jax.distributed over
localhost) load exactly the rows that 1 process x 8 devices loads, for a raw-source mixture and
for token caches alike."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from cli_runs import xla_flags

from mai_jax import config as config_lib
from mai_jax.config import Config, DataConfig, ModelConfig, TrainConfig
from mai_jax.data import cache, make_train_iterator, sources
from mai_jax.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

STEPS = 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    port, pid, cfg_path, tok_path, out = sys.argv[1:]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(pid))
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    from mai_jax import config as config_lib
    from mai_jax.data import make_train_iterator
    from mai_jax.data.tokenizer import SentencePieceTokenizer
    cfg = config_lib.load_json(cfg_path)
    it = make_train_iterator(cfg, SentencePieceTokenizer(tok_path),
                             process_index=jax.process_index(), process_count=jax.process_count())
    batches = [next(it) for _ in range(%d)]
    np.savez(out, **{f"{s}_{k}": b[k] for s, b in enumerate(batches) for k in b})
    jax.distributed.shutdown()
""" % STEPS)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("hosts")
  tok = SentencePieceTokenizer(train_sentencepiece(sources.stdlib_documents(20).texts, 512,
                                                   str(root / "sp"), max_chars=150_000))
  rng = np.random.default_rng(2)
  (root / "a.jsonl").write_text("".join(
      json.dumps({"text": " ".join(rng.choice(["x", "y", "def", "\n"], int(rng.integers(5, 80))))})
      + "\n" for _ in range(120)))
  raw = ({"name": "code", "kind": "stdlib", "weight": 0.5},
         {"name": "synth", "kind": "jsonl", "path": str(root / "a.jsonl"), "weight": 0.5})
  base = Config(model=ModelConfig(vocab_size=512),
                data=DataConfig(seq_len=32, max_files=15, prefetch_buffer=0, sources=raw),
                train=TrainConfig(global_batch_size=8))
  caches = []
  for spec in sources.source_specs(base.data):
    cache.tokenize_source(spec, base.data, tok, str(root / "cache" / spec.name))
    caches.append({"name": spec.name, "kind": "cache", "path": str(root / "cache" / spec.name),
                   "weight": spec.weight})
  cached = config_lib.from_dict({**config_lib.to_dict(base),
                                 "data": {**config_lib.to_dict(base)["data"],
                                          "sources": tuple(caches)}})
  return root, tok, {"raw": base, "cache": cached}


@pytest.mark.parametrize("kind", ["raw", "cache"])
def test_two_processes_load_the_one_process_global_batch(setup, kind):
  root, tok, cfgs = setup
  cfg = cfgs[kind]
  cfg_path = root / f"{kind}.json"
  cfg_path.write_text(config_lib.to_json(cfg))
  assert jax.process_count() == 1 and jax.device_count() == 8
  whole = make_train_iterator(cfg, tok)
  expected = [next(whole) for _ in range(STEPS)]

  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "XLA_FLAGS": xla_flags(4)}
  port = str(free_port())
  outs = [root / f"{kind}_{i}.npz" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, port, str(i), str(cfg_path), tok.path,
                             str(outs[i])], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=180)
    assert p.returncode == 0, out[-3000:]
  parts = [np.load(o) for o in outs]
  for s, batch in enumerate(expected):
    for key, value in batch.items():
      halves = [p[f"{s}_{key}"] for p in parts]
      assert halves[0].shape[0] == value.shape[0] // 2
      np.testing.assert_array_equal(np.concatenate(halves), value, err_msg=f"step {s} {key}")
