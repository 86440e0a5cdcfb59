"""`mai-jax sample` and `mai-jax chat`: decoding from a workdir's checkpoint (parsers and runners;
cli.py dispatches here)."""

from __future__ import annotations

import sys

from mai_jax.cli_args import add_sampling_flags, sampling_from_args


def add_sample_parser(sub) -> None:
  p = sub.add_parser("sample", help="continue prompts with a workdir's latest checkpoint "
                     "(KV cache; several --prompt run as one batch)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
  add_sampling_flags(p)
  p.add_argument("--chat", action="store_true",
                 help="each --prompt is a user message, rendered with the workdir's "
                      "data.chat_template; prints the assistant's reply up to its end of turn")


def add_chat_parser(sub) -> None:
  p = sub.add_parser("chat", help="chat with a workdir's latest checkpoint: one user turn per "
                     "line on stdin, the assistant's replies on stdout (empty line or EOF ends)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--system", default="", help="a system message to start the conversation")
  p.add_argument("--max-context", type=int, default=None,
                 help="slots of the KV cache kept across turns (default: data.seq_len); once "
                      "the conversation plus --max-new-tokens exceeds it, every turn "
                      "re-prefills the whole conversation")
  add_sampling_flags(p)


def run_chat(args, overrides) -> None:
  from mai_jax import chat_session  # heavy imports
  from mai_jax import workdir as workdir_lib
  from mai_jax.data import chat_template
  settings = sampling_from_args(args)
  cfg, step = workdir_lib.open_checkpoint(args.workdir, args.step, overrides)
  chat_template.load_template(cfg.data.chat_template)  # a bad template fails before loading
  cfg, model, _, mesh = workdir_lib.load_model(args.workdir, cfg=cfg, step=step)
  tokenizer = workdir_lib.load_tokenizer(cfg, args.workdir)
  interactive = sys.stdin.isatty()
  if interactive:
    print(f"mai-jax: chatting with {args.workdir}; an empty line ends", flush=True)
  def read_line() -> str:
    if not interactive:
      return sys.stdin.readline()
    try:
      return input("user> ")
    except EOFError:
      return ""
  lines = iter(read_line, "")
  for reply in chat_session.chat_session(cfg, model, tokenizer, lines, settings, mesh, args.system,
                                         max_context=args.max_context):
    print(f"assistant> {reply}", flush=True)


def run_sample(args, overrides) -> None:
  from mai_jax import sample  # heavy imports
  from mai_jax import workdir as workdir_lib
  settings = sampling_from_args(args)
  cfg, step = workdir_lib.open_checkpoint(args.workdir, args.step, overrides)
  cfg, model, _, mesh = workdir_lib.load_model(args.workdir, cfg=cfg, step=step)
  tokenizer = workdir_lib.load_tokenizer(cfg, args.workdir)
  if args.chat:
    conversations = [[{"role": "user", "content": p}] for p in args.prompt]
    replies = sample.chat_replies(cfg, model, tokenizer, conversations, settings, mesh)
    for prompt, reply in zip(args.prompt, replies):
      print(f"=== {prompt!r}\n{reply}")
    return
  # A run trained here (step > 0) saw data.seq_len tokens; imported weights (step 0) carry their
  # source's context, which the import does not record: no warning for them.
  texts = sample.sample_text(cfg, model, tokenizer, args.prompt, settings, mesh,
                             trained_context=cfg.data.seq_len if step > 0 else None)
  for prompt, text in zip(args.prompt, texts):
    print(f"=== {prompt!r}\n{prompt}{text}")
