"""`mai-jax distill ...`: the offline teacher for logit distillation (parser and runner; cli.py
dispatches here). Online distillation needs no command: `mai-jax train` with
--config.train.objective=distill --config.train.distill_teacher=WORKDIR."""

from __future__ import annotations


def add_distill_parser(sub) -> None:
  distill = sub.add_parser("distill", help="teacher top-K caches for logit distillation")
  tasks = distill.add_subparsers(dest="distill_command", required=True)
  cache = tasks.add_parser(
      "cache", help="write a teacher's top-K next-token log-probs for every train window of a "
      "token cache into TOKEN_CACHE/distill/NAME (resumes an interrupted run); students read it "
      "with --config.train.objective=distill --config.train.distill_cache=NAME")
  cache.add_argument("--teacher", required=True, help="the teacher's workdir (or "
                     "WORKDIR/checkpoints/STEP)")
  cache.add_argument("--data", required=True, help="a token cache folder (`mai-jax data "
                     "tokenize` OUT/NAME) tokenized with the teacher's tokenizer")
  cache.add_argument("--top-k", type=int, default=64, help="log-probs kept per token")
  cache.add_argument("--seq-len", type=int, default=0, help="window length; students must train "
                     "with this data.seq_len (0: the teacher's)")
  cache.add_argument("--batch-size", type=int, default=0, help="windows per teacher forward "
                     "(0: the teacher's train.global_batch_size)")
  cache.add_argument("--name", default="", help="folder name under TOKEN_CACHE/distill "
                     "(default: topK)")
  cache.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                     help="storage of the log-probs (float16: 6 B per kept token with its id)")


def run_distill(args) -> None:
  # pylint: disable-next=import-outside-toplevel
  from mai_jax.train.distill_cache import write_teacher_cache
  write_teacher_cache(args.teacher, args.data, args.top_k, seq_len=args.seq_len,
                      batch_size=args.batch_size, name=args.name, dtype=args.dtype,
                      log=lambda msg: print(msg, flush=True))
