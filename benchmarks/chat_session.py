"""`mai-jax chat`'s kept KV cache vs re-prefilling the whole conversation every turn: wall time
and jit compilations per turn of one greedy chat, on the test suite's tiny decoder and character
tokenizer (tests/test_chat_session.py), and whether both give the same replies.

  python benchmarks/chat_session.py [--turns 6] [--out benchmarks/results/chat_session_cpu.json]

What it shows is the schedule, not model speed: the kept cache compiles one prefill per bucket
length and prefills only each turn's new tokens; the re-prefill path compiles per prompt length.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import test_chat_session as fixtures  # noqa: E402  (the tiny model and tokenizer of the tests)
from train_step import save_result  # noqa: E402

from mai_jax import chat_session, sample  # noqa: E402
from mai_jax.config import Config  # noqa: E402

LINES = ["hi there", "why?", "bye", "tell me more", "ok", "what is it", "and then?", "sure"]


def _compiles() -> list[int]:
  return [f._cache_size() for f in (chat_session._prefill, sample._decode, sample.empty_cache)]


def _chat(model, lines, **kwargs):
  session = chat_session.ChatSession(Config(), model, fixtures.CharTokenizer(aliases=True),
                                     fixtures.GREEDY, **kwargs)
  before, replies, seconds = _compiles(), [], []
  for line in lines:
    start = time.perf_counter()
    replies.append(session.reply(line))
    seconds.append(round(time.perf_counter() - start, 3))
  compiles = dict(zip(("prefill", "decode", "empty_cache"),
                      [b - a for a, b in zip(before, _compiles())]))
  turns = [dict(prompt_tokens=t.prompt_tokens, reused=t.reused, prefilled=t.prefilled,
                padded_to=t.padded_to) for t in session.turns]
  return replies, {"seconds_per_turn": seconds, "compiles": compiles, "turns": turns}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--turns", type=int, default=6)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if not 1 <= args.turns <= len(LINES):
    parser.error(f"--turns must be in 1..{len(LINES)}")
  lines = LINES[:args.turns]
  model = fixtures.tiny_model(scan_layers=True)
  kept_replies, kept = _chat(model, lines, max_context=256)
  ref_replies, ref = _chat(model, lines, reuse_cache=False)
  result = {"kept_cache": kept, "re_prefill": ref, "same_replies": kept_replies == ref_replies,
            "model": "tests/test_chat_session.py tiny_model (d_model 32, 2 layers, vocab 64)",
            "sampling": "greedy, max_new_tokens 8"}
  path = save_result("chat_session", sys.argv[1:] if argv is None else argv, {"result": result},
                     args.out)
  print(f"same replies: {result['same_replies']}; kept cache s/turn {kept['seconds_per_turn']} "
        f"compiles {kept['compiles']}; re-prefill s/turn {ref['seconds_per_turn']} compiles "
        f"{ref['compiles']} -> {path}")


if __name__ == "__main__":
  main()
