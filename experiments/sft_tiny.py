"""Post-training (SFT, then DPO) of the tiny model (experiments/tiny.py) into a chat model.

Starts from the weights and tokenizer of a `make train` run (train.init_from=runs/tiny) and trains
on conversations (data.sources of kind 'chat', JSONL in the formats of mai_jax/data/chat.py),
rendered with the ChatML template; the loss covers the assistant replies only. Point it at your
data with an override, e.g.

  mai-jax train --config experiments/sft_tiny.py --workdir runs/sft \
    --config.data.sources="[{'name': 'chat', 'kind': 'chat', 'path': 'data/chat.jsonl'}]"

The same file runs preference optimization from the SFT run, on pairs of kind 'preference':

  mai-jax train --config experiments/sft_tiny.py --workdir runs/dpo \
    --config.train.init_from=runs/sft --config.train.objective=dpo \
    --config.data.sources="[{'name': 'prefs', 'kind': 'preference', 'path': 'data/prefs.jsonl'}]"

Why a constant, lower learning rate than pretraining and a short warmup: fine-tuning starts from
trained weights, where a pretraining-sized step forgets more than it teaches; the run is short,
so a decay schedule buys little.

Variants:
  smoke   the smoke-sized model of tiny.py:smoke (start from a run of that variant)
"""

import dataclasses

from mai_jax.config import Config, sibling_experiment

VARIANTS = ("smoke",)


def _tiny(variant):
  return sibling_experiment(__file__, "tiny").get_config(variant)


def get_config(variant=None) -> Config:
  base = _tiny("smoke" if variant == "smoke" else None)
  return dataclasses.replace(
      base,
      data=dataclasses.replace(
          base.data, chat_template="chatml", val_fraction=0.05, max_files=0,
          sources=({"name": "chat", "kind": "chat", "path": "data/chat.jsonl"},)),
      optim=dataclasses.replace(base.optim, learning_rate=base.optim.learning_rate / 3,
                                schedule="constant", warmup_steps=10, weight_decay=0.0),
      train=dataclasses.replace(base.train, objective="sft", init_from="runs/tiny",
                                num_steps=base.train.num_steps if variant == "smoke" else 200,
                                eval_every=0 if variant == "smoke" else 100),
  )
