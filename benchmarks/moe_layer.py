"""MoE layer against a dense SwiGLU MLP of the same active FLOPs (forward + backward), by batch size.

  python benchmarks/moe_layer.py [--tokens 1024 4096 16384] [--steps 10] [--d-model 256]
      [--num-experts 8] [--top-k 2] [--d-ff-expert 512] [--dtype bfloat16] [--out FILE.json]
      [--expert 8 --dispatch compute float8_e4m3fn]
      [--expert 8 --expert-devices-per-node 0 4 2 --capacity-factor 1.25 --router-groups 2
       --router-topk-groups 1]

The dense MLP has d_ff = top_k * d_ff_expert, so both do the same expert matmul FLOPs per token; the
MoE layer adds routing (router matmul, top-k, sort, gather/scatter). Its time over the dense time is
the overhead of sparsity, which should fall towards 1 as tokens grow and the grouped matmuls
dominate. `--impl` times the grouped-matmul implementations of mai_jax/model/moe.py ('auto' is
'tiled' on CPU, where jax lowers ragged_dot to a dense matmul against every expert). Single device
by default (tests/test_moe.py covers EP correctness).

`--expert N` shards the experts over N devices (mesh fsdp=-1 x expert=N; on CPU run with
XLA_FLAGS=--xla_force_host_platform_device_count=8, and give tokens / 256 rows divisible by the
devices) and reports each row's all-to-all bytes per device, read from the compiled HLO
(mai_jax/compiled_collectives.py); `--dispatch` runs each model.moe_dispatch_dtype, so the fp8
dispatch's saving is measured from the program, not only planned. XLA:CPU runs a bfloat16
all-to-all in float32 (the compiled HLO says f32), so on CPU the compute-dtype all-to-alls show 4
bytes an element whatever --dtype; on GPU they move the compute dtype's bytes.

`--expert-devices-per-node` runs each model.expert_devices_per_node (0: the flat all-to-all; n:
the hierarchical dispatch over ep / n nodes of n devices) and splits each row's all-to-all bytes
by replica group kind: 'flat' (a group spanning nodes and devices within them), 'inter' (one device
per node), 'intra' (one node's devices), with the node of device id d taken as d // n (this mesh:
expert the innermost axis, tensor 1); `inter_node_bytes` is the part that leaves the node (a tiled
all-to-all sends 1 / group size of its buffer to each member), reported for the flat rows under
every n asked for. The buffers are fixed-size, so the bytes do not depend on the routing;
`--router-groups` / `--router-topk-groups` (node-limited routing) and `--capacity-factor` set the
routing the timed layer runs.
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

from mai_jax import config as config_lib, sharding as sharding_lib
from mai_jax.compiled_collectives import all_to_all_bytes, all_to_alls
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
  hlo = compiled.as_text()
  collectives = all_to_all_bytes(hlo)
  jax.block_until_ready(compiled(state, x_BTD))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(state, x_BTD))
    times.append(time.perf_counter() - t0)
  by_dtype = {}
  for dtype, nbytes in collectives:
    by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
  return {"median_s": statistics.median(times), "min_s": min(times), "compile_s": compile_s,
          "all_to_all_calls": len(collectives),
          "all_to_all_bytes_per_device": sum(by_dtype.values()),
          "all_to_all_bytes_by_dtype": by_dtype, "hlo": hlo}


def bytes_by_group_kind(hlo: str, per_node: int) -> dict:
  """All-to-all bytes per device by replica group kind (module docstring) for nodes of `per_node`
  devices, and the part of them that crosses between nodes."""
  out = {"flat": 0, "inter": 0, "intra": 0, "inter_node_bytes": 0.0}
  for _, nbytes, groups in all_to_alls(hlo):
    groups = groups or (tuple(range(jax.device_count())),)
    nodes = [{d // per_node for d in g} for g in groups]
    kind = ("intra" if all(len(n) == 1 for n in nodes) else
            "inter" if all(len(n) == len(g) for n, g in zip(nodes, groups)) else "flat")
    out[kind] += nbytes
    # each member gets 1 / len(g) of the buffer; the leaving share averaged over the devices
    share = [sum(d // per_node != e // per_node for e in g) / len(g) for g in groups for d in g]
    out["inter_node_bytes"] += nbytes * sum(share) / len(share)
  return out


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
  parser.add_argument("--expert", type=int, default=1,
                      help="devices the experts are sharded over (1: no expert parallelism)")
  parser.add_argument("--dispatch", nargs="+", default=["compute"],
                      choices=("compute", "float8_e4m3fn"),
                      help="model.moe_dispatch_dtype values to run")
  parser.add_argument("--expert-devices-per-node", type=int, nargs="+", default=[0],
                      help="model.expert_devices_per_node values to run (0: flat all-to-all)")
  parser.add_argument("--capacity-factor", type=float, default=None,
                      help="model.capacity_factor (default: dropless)")
  parser.add_argument("--router-groups", type=int, default=0)
  parser.add_argument("--router-topk-groups", type=int, default=0)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  dense_cfg = ModelConfig(d_model=args.d_model, d_ff=args.top_k * args.d_ff_expert,
                          compute_dtype=args.dtype)
  dense = MLP(dense_cfg, rngs=nnx.Rngs(0))
  mesh_cfg = config_lib.MeshConfig(data=1, fsdp=-1, expert=args.expert, tensor=1)
  rows = []
  for tokens in args.tokens:
    x_BTD = jax.random.normal(jax.random.key(1), (tokens // 256, 256, args.d_model),
                              jnp.dtype(args.dtype))
    d = time_fwd_bwd(dense, x_BTD, args.steps, returns_aux=False)
    d.pop("hlo")
    for impl, dispatch, per_node in ((i, dd, n) for i in args.impl for dd in args.dispatch
                                     for n in args.expert_devices_per_node):
      moe_lib.EXPERT_FFN_IMPL = impl
      moe = MoE(ModelConfig(d_model=args.d_model, d_ff=args.d_ff_expert,
                            num_experts=args.num_experts, experts_per_token=args.top_k,
                            compute_dtype=args.dtype, moe_dispatch_dtype=dispatch,
                            expert_devices_per_node=per_node,
                            capacity_factor=args.capacity_factor,
                            router_groups=args.router_groups,
                            router_topk_groups=args.router_topk_groups),
                rngs=nnx.Rngs(0))
      if args.expert > 1:
        with sharding_lib.activate(sharding_lib.make_mesh(mesh_cfg), mesh_cfg.rules):
          m = time_fwd_bwd(moe, x_BTD, args.steps, returns_aux=True)
      else:
        m = time_fwd_bwd(moe, x_BTD, args.steps, returns_aux=True)
      hlo = m.pop("hlo")
      nodes = ({n: bytes_by_group_kind(hlo, n) for n in args.expert_devices_per_node if n}
               if per_node == 0 else {per_node: bytes_by_group_kind(hlo, per_node)})
      if nodes:
        m["all_to_all_bytes_by_group_kind"] = nodes
      rows.append({"tokens": tokens, "impl": impl, "dispatch": dispatch,
                   "expert_devices_per_node": per_node, "moe": m, "dense": d,
                   "moe_over_dense": m["median_s"] / d["median_s"]})
      print(f"tokens {tokens} {impl} {dispatch} per_node {per_node}: moe "
            f"{m['median_s'] * 1e3:.1f} ms, dense "
            f"{d['median_s'] * 1e3:.1f} ms, ratio {rows[-1]['moe_over_dense']:.2f}, all-to-all "
            f"{m['all_to_all_bytes_per_device'] / 2**20:.2f} MiB/device "
            f"{m['all_to_all_bytes_by_dtype']} {nodes}")
  out = save_result(
      "moe_layer", sys.argv[1:] if argv is None else argv,
      {"shape": {"d_model": args.d_model, "num_experts": args.num_experts, "top_k": args.top_k,
                 "d_ff_expert": args.d_ff_expert, "dense_d_ff": args.top_k * args.d_ff_expert,
                 "dtype": args.dtype, "expert": args.expert,
                 "capacity_factor": args.capacity_factor, "router_groups": args.router_groups,
                 "router_topk_groups": args.router_topk_groups},
       "timing": "median of --steps jitted forward+backward calls after one warm-up",
       "results": rows}, args.out)
  print(f"-> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
