"""MoE layer against a dense SwiGLU MLP of the same active FLOPs (forward + backward), by batch size.

  python benchmarks/moe_layer.py [--tokens 1024 4096 16384] [--steps 10] [--d-model 256]
      [--num-experts 8] [--top-k 2] [--d-ff-expert 512] [--dtype bfloat16] [--out FILE.json]

The dense MLP has d_ff = top_k * d_ff_expert, so both do the same expert matmul FLOPs per token; the
MoE layer adds routing (router matmul, top-k, sort, gather/scatter). Its time over the dense time is
the overhead of sparsity, which should fall towards 1 as tokens grow and the grouped matmuls
dominate. `--impl` times the grouped-matmul implementations of mai_jax/model/moe.py ('auto' is
'tiled' on CPU, where jax lowers ragged_dot to a dense matmul against every expert). Single device, no expert parallelism (tests/test_moe.py covers EP correctness).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from mai_jax.config import ModelConfig
from mai_jax.model.layers import MLP
from mai_jax.model import moe as moe_lib
from mai_jax.model.moe import MoE

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import save_result  # noqa: E402


def time_fwd_bwd(module: nnx.Module, x_BTD: jax.Array, steps: int, returns_aux: bool) -> dict:
  graphdef, state = nnx.split(module)

  def loss(state, x_BTD):
    out = nnx.merge(graphdef, state)(x_BTD)
    y_BTD = out[0] if returns_aux else out
    return jnp.sum(y_BTD.astype(jnp.float32) ** 2)

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  t0 = time.perf_counter()
  compiled = step.lower(state, x_BTD).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(state, x_BTD))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(state, x_BTD))
    times.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(times), "min_s": min(times), "compile_s": compile_s}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--d-model", type=int, default=256)
  parser.add_argument("--num-experts", type=int, default=8)
  parser.add_argument("--top-k", type=int, default=2)
  parser.add_argument("--d-ff-expert", type=int, default=512)
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--impl", nargs="+", default=["auto"],
                      choices=("auto", "ragged_dot", "tiled"),
                      help="grouped-matmul implementations to time (mai_jax.model.moe)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  moe_cfg = ModelConfig(d_model=args.d_model, d_ff=args.d_ff_expert, num_experts=args.num_experts,
                        experts_per_token=args.top_k, compute_dtype=args.dtype)
  dense_cfg = ModelConfig(d_model=args.d_model, d_ff=args.top_k * args.d_ff_expert,
                          compute_dtype=args.dtype)
  moe, dense = MoE(moe_cfg, rngs=nnx.Rngs(0)), MLP(dense_cfg, rngs=nnx.Rngs(0))
  rows = []
  for tokens in args.tokens:
    x_BTD = jax.random.normal(jax.random.key(1), (tokens // 256, 256, args.d_model),
                              jnp.dtype(args.dtype))
    d = time_fwd_bwd(dense, x_BTD, args.steps, returns_aux=False)
    for impl in args.impl:
      moe_lib.EXPERT_FFN_IMPL = impl
      m = time_fwd_bwd(moe, x_BTD, args.steps, returns_aux=True)
      rows.append({"tokens": tokens, "impl": impl, "moe": m, "dense": d,
                   "moe_over_dense": m["median_s"] / d["median_s"]})
      print(f"tokens {tokens} {impl}: moe {m['median_s'] * 1e3:.1f} ms, dense "
            f"{d['median_s'] * 1e3:.1f} ms, ratio {rows[-1]['moe_over_dense']:.2f}")
  out = save_result(
      "moe_layer", sys.argv[1:] if argv is None else argv,
      {"shape": {"d_model": args.d_model, "num_experts": args.num_experts, "top_k": args.top_k,
                 "d_ff_expert": args.d_ff_expert, "dense_d_ff": args.top_k * args.d_ff_expert,
                 "dtype": args.dtype},
       "timing": "median of --steps jitted forward+backward calls after one warm-up",
       "results": rows}, args.out)
  print(f"-> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
