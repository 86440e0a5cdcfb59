"""The peer on a GPU: the same dense model, batch and optimizer trained by PyTorch + transformers.

The issue's MaxText side-by-side needs MaxText and its dependencies on the GPU image, which has
neither them nor room to carry them (the device tool carries 64 MiB; MaxText pulls TensorFlow). The
image does have torch and transformers, so this is the peer measured in the same GPU call as our
step (benchmarks/gpu_suite.py runs it as `torch_peer_dense`): LlamaForCausalLM built from
`convert.hf.hf_config` of the experiment (the same architecture our HF export loads into, so the
parameter count is checked equal), float32 master weights with bfloat16 autocast, SDPA attention
(flash on Hopper), gradient checkpointing for remat 'full', AdamW with the same hyperparameters
and gradient clipping, torch.compile on a GPU. MFU uses our formula (mai_jax/metrics.py: 6 N + 6 L
T H K per token, causal attention halved, over the dense bf16 peak).

  python benchmarks/torch_peer.py --config experiments/gpu_bench.py:dense [--steps 10] [--no-compile]

jax is imported for the config only and kept off the GPU (JAX_PLATFORMS=cpu), so torch has the
whole device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported: the GPU is torch's

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# How our remat policies map onto transformers: only these two have an equivalent.
REMAT_TO_CHECKPOINTING = {"none": False, "full": True}


def hf_llama(cfg):
  """transformers.LlamaForCausalLM with cfg.model's architecture (float32 weights)."""
  import transformers
  from mai_jax.convert.hf import hf_config
  if cfg.model.num_experts:
    raise ValueError("torch_peer.py measures dense models; transformers' Mixtral loops over the "
                     "experts in Python and would not be a fair peer")
  fields = {k: v for k, v in hf_config(cfg).items()
            if k not in ("architectures", "model_type", "dtype", "torch_dtype")}
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields,
                                                                attn_implementation="sdpa",
                                                                use_cache=False))


def peak_flops(device_name: str):
  from mai_jax import metrics
  return next((p for n, p in metrics.PEAK_BF16_FLOPS.items() if n in device_name), None)


def run(cfg, steps: int, warmup: int, compile_model: bool) -> dict:
  import torch
  import transformers
  from mai_jax import metrics
  from mai_jax.model import count_params
  from mai_jax.model.transformer import count_active_params

  if cfg.model.remat not in REMAT_TO_CHECKPOINTING:
    raise ValueError(f"model.remat={cfg.model.remat!r} has no transformers equivalent; use one of "
                     f"{', '.join(REMAT_TO_CHECKPOINTING)}")
  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  torch.manual_seed(0)
  model = hf_llama(cfg).to(device)
  n = sum(p.numel() for p in model.parameters())
  if n != count_params(cfg.model):
    raise AssertionError(f"transformers model has {n:,} parameters, ours {count_params(cfg.model):,}")
  if REMAT_TO_CHECKPOINTING[cfg.model.remat]:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  model.train()
  o = cfg.optim
  optimizer = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2),
                                eps=o.eps, weight_decay=o.weight_decay, fused=cuda)
  forward = torch.compile(model) if compile_model else model
  rows, seq = cfg.train.global_batch_size, cfg.data.seq_len
  tokens = torch.randint(1, cfg.model.vocab_size, (rows, seq), device=device,
                         generator=torch.Generator(device=device).manual_seed(0))
  bf16 = cfg.model.compute_dtype == "bfloat16"

  def step() -> float:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
      loss = forward(input_ids=tokens, labels=tokens).loss
    loss.backward()
    if o.grad_clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  def timed() -> float:
    t0 = time.perf_counter()
    loss = step()
    if cuda:
      torch.cuda.synchronize()
    timed.loss = float(loss.detach())
    return time.perf_counter() - t0

  first_s = timed()  # torch.compile's compile and autotuning land here
  for _ in range(max(warmup - 1, 0)):
    timed()
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  times = [timed() for _ in range(steps)]
  step_s = statistics.median(times)
  fpt = metrics.train_flops_per_token(cfg.model, count_active_params(cfg.model), seq)
  name = torch.cuda.get_device_name() if cuda else "cpu"
  peak = peak_flops(name)
  tps = rows * seq / step_s
  return {"peer": "torch+transformers", "torch": torch.__version__,
          "transformers": transformers.__version__, "device": name,
          "torch_compile": compile_model, "attn_implementation": "sdpa",
          "gradient_checkpointing": REMAT_TO_CHECKPOINTING[cfg.model.remat],
          "autocast_bf16": bf16, "params": n, "flops_per_token": fpt,
          "tokens_per_step": rows * seq, "step_time_s_median": step_s,
          "step_time_s_min": min(times), "step_time_s_all": times, "tokens_per_sec": tps,
          "mfu": metrics.mfu(tps, fpt, 1, peak), "peak_flops_per_device": peak,
          "compile_s": first_s, "final_loss": timed.loss,
          "peak_bytes_in_use": torch.cuda.max_memory_allocated() if cuda else None}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="experiments/gpu_bench.py:dense")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--no-compile", action="store_true", help="eager PyTorch (no torch.compile)")
  args = parser.parse_args(argv)
  from mai_jax import cli
  try:
    result = run(cli.resolve_config(args.config, None, {}), args.steps, args.warmup,
                 not args.no_compile)
  except ValueError as e:  # a config the peer has no equivalent for: one line, no traceback
    raise SystemExit(f"torch_peer.py: error: {e}") from None
  print({k: v for k, v in result.items() if k != "step_time_s_all"})
  return 0


if __name__ == "__main__":
  sys.exit(main())
