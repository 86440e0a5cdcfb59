"""Matmul forms on the current backend: 16-bit -> float32 dots two ways, logits backward two ways.

  python benchmarks/matmul_precision.py [--steps 20] [--dtype bfloat16] [--out FILE.json]

Both forms compute the same numbers (16-bit values embed exactly in float32 and both accumulate in
float32). On GPU the first one feeds the tensor cores; on XLA:CPU it takes a slower kernel than a
plain float32 dot, which is why mai_jax.model.layers.cpu_upcasts_16bit_matmuls upcasts the logits
and attention operands there. Shapes: experiments/tiny.py's unembedding and attention logits.

Second, the unembedding's forward + backward as a [B, T, D] x [D, V] einsum against one 2-D
[B*T, D] x [D, V] matmul (mai_jax.model.layers.float32_logits uses the second: the einsum's weight
gradient becomes a transposed, [B, T]-contracting dot that XLA:CPU runs slowly).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import save_result  # noqa: E402

SHAPES = {  # name: (einsum spec, lhs shape, rhs shape)
    "unembed [2048,256]x[256,4096]": ("nd,dv->nv", (2048, 256), (256, 4096)),
    "attention logits [8,4,256,64]x[8,4,256,64]": ("bhtk,bhsk->bhts", (8, 4, 256, 64),
                                                   (8, 4, 256, 64)),
}


def best_time_s(fn, *args, steps: int) -> float:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return min(times)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  rows = []
  for name, (spec, lhs_shape, rhs_shape) in SHAPES.items():
    lhs = jax.random.normal(jax.random.key(0), lhs_shape, dtype)
    rhs = jax.random.normal(jax.random.key(1), rhs_shape, dtype)
    preferred = best_time_s(
        lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32), lhs, rhs,
        steps=args.steps)
    upcast = best_time_s(
        lambda a, b: jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32)), lhs, rhs,
        steps=args.steps)
    rows.append({"shape": name, "preferred_element_type_s": preferred, "upcast_s": upcast,
                 "preferred_over_upcast": preferred / upcast})
    print(f"{name}: preferred_element_type {preferred * 1e3:.2f} ms, upcast {upcast * 1e3:.2f} ms "
          f"({preferred / upcast:.2f}x)")
  x_BTD = jax.random.normal(jax.random.key(2), (8, 256, 256), jnp.float32)
  w_DV = jax.random.normal(jax.random.key(3), (256, 4096), jnp.float32)
  g_BTV = jax.random.normal(jax.random.key(4), (8, 256, 4096), jnp.float32)

  def logits_vjp(logits_fn):
    return lambda x, w, g: jax.vjp(logits_fn, x, w)[1](g)

  einsum_3d = best_time_s(logits_vjp(lambda x, w: jnp.einsum("btd,dv->btv", x, w)), x_BTD, w_DV,
                          g_BTV, steps=args.steps)
  matmul_2d = best_time_s(logits_vjp(lambda x, w: (x.reshape(-1, 256) @ w).reshape(8, 256, 4096)),
                          x_BTD, w_DV, g_BTV, steps=args.steps)
  logits_row = {"shape": "unembedding forward+backward [8,256,256]x[256,4096] float32",
                "einsum_3d_s": einsum_3d, "matmul_2d_s": matmul_2d,
                "einsum_over_matmul": einsum_3d / matmul_2d}
  print(f"{logits_row['shape']}: 3-D einsum {einsum_3d * 1e3:.1f} ms, 2-D matmul "
        f"{matmul_2d * 1e3:.1f} ms ({einsum_3d / matmul_2d:.2f}x)")
  out = save_result("matmul_precision", sys.argv[1:] if argv is None else argv,
                    {"dtype": args.dtype, "timing": "best of --steps jitted calls after one warm-up",
                     "results": rows, "logits_backward": logits_row}, args.out)
  print(f"-> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
