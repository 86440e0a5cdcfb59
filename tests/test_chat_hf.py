"""Chat models across the HF boundary: an imported HF chat model answers `sample --chat` with the
tokens transformers' `generate` gives on the same rendered prompt; `convert to-hf` exports the
chat template so transformers' `apply_chat_template` renders (and tokenizes) what ours does, and
`convert from-hf` reads it back."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_convert_hf import (VOCAB, hf_greedy, make_hf_llama,  # noqa: E402
                             write_hf_tokenizer)

from mai_jax import cli, sample  # noqa: E402
from mai_jax import workdir as workdir_lib  # noqa: E402
from mai_jax.convert import workdir as convert_lib  # noqa: E402
from mai_jax.data import chat  # noqa: E402
from mai_jax.data import chat_template as T  # noqa: E402
from mai_jax.data import tokenizer as tok_lib  # noqa: E402

# Phi-3 style: role markers, <|end|> ends every turn (and is the eos); no generation tags.
TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CONVERSATION = [{"role": "system", "content": "def add(a, b):"},
                {"role": "user", "content": "return a + b"},
                {"role": "assistant", "content": "def add(a):"}]
PROMPT = "def add(a, b):\n"


def _tokenizer_with(directory, markers):
  """write_hf_tokenizer's BPE, cut to leave room, plus `markers` as special tokens, padded to
  exactly VOCAB ids."""
  from tokenizers import Tokenizer
  write_hf_tokenizer(directory)
  tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
  state = json.loads(tok.to_str())  # the trainer's size varies with its tie-breaking: drop the
  room = VOCAB - len(markers)  # newest merges so that the markers fit below VOCAB
  state["model"]["vocab"] = {k: v for k, v in state["model"]["vocab"].items() if v < room}
  state["model"]["merges"] = [m for m in state["model"]["merges"] if all(
      p in state["model"]["vocab"] for p in (m.split(" ") if isinstance(m, str) else m))
      and "".join(m.split(" ") if isinstance(m, str) else m) in state["model"]["vocab"]]
  tok = Tokenizer.from_str(json.dumps(state))
  tok.add_special_tokens(markers)
  assert tok.get_vocab_size() <= VOCAB
  tok.add_special_tokens([f"<|unused_{i}|>" for i in range(VOCAB - tok.get_vocab_size())])
  tok.save(str(directory / "tokenizer.json"))
  return tok


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """A tiny random HF Llama with a chat template saved by transformers (chat_template.jinja),
  imported with `convert from-hf`."""
  root = tmp_path_factory.mktemp("chat_hf")
  src, wd = root / "src", root / "wd"
  ref = make_hf_llama(src, seed=4)
  _tokenizer_with(src, MARKERS)
  hf_tok = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(src / "tokenizer.json"), bos_token="<s>", eos_token="<|end|>",
      chat_template=TEMPLATE)
  hf_tok.save_pretrained(str(src))
  assert (src / "chat_template.jinja").is_file()  # where transformers keeps it now
  assert cli.main(["convert", "from-hf", "--hf-dir", str(src), "--workdir", str(wd)]) == 0
  return {"root": root, "src": src, "wd": wd, "ref": ref,
          "hf_tok": transformers.AutoTokenizer.from_pretrained(str(src))}


def test_an_imported_chat_model_answers_with_the_tokens_of_transformers_generate(imported,
                                                                                  capsys):
  wd, hf_tok = imported["wd"], imported["hf_tok"]
  cfg = workdir_lib.load_config(str(wd))
  assert cfg.data.chat_template == str(wd) and (wd / "chat_template.jinja").is_file()
  messages = [{"role": "user", "content": PROMPT}]
  want_ids = list(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"])
  template = T.load_template(cfg.data.chat_template)
  tokenizer = workdir_lib.load_tokenizer(cfg, str(wd))
  assert chat.prompt_tokens(messages, template, tokenizer) == want_ids
  with torch.no_grad():
    out = imported["ref"].generate(torch.tensor([want_ids]), max_new_tokens=8, do_sample=False,
                                   eos_token_id=hf_tok.eos_token_id, pad_token_id=0)
  hf_new = out[0, len(want_ids):].tolist()
  cfg, model, _, mesh = workdir_lib.load_model(str(wd))
  ours = sample.generate(model, [want_ids], sample.SamplingConfig(8, temperature=0),
                         eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, mesh=mesh,
                         rules=cfg.mesh.rules)[0]
  assert ours == hf_new
  # Without an eos, 8 greedy tokens; a multi-token stop text (the text of two of them) ends the
  # reply at its last token.
  free = hf_greedy(imported["ref"], want_ids, 8)
  ours = sample.generate(model, [want_ids], sample.SamplingConfig(8, temperature=0), eos_id=None,
                         pad_id=tokenizer.pad_id, mesh=mesh, rules=cfg.mesh.rules)[0]
  assert ours == free
  end = tokenizer.decode(free[2:4])
  first = next(n for n in range(1, 9) if end in tokenizer.decode(free[:n]))
  stopped = sample.generate(model, [want_ids], sample.SamplingConfig(8, temperature=0),
                            eos_id=None, pad_id=tokenizer.pad_id, mesh=mesh, rules=cfg.mesh.rules,
                            stop=sample.turn_end_stop(tokenizer, end))[0]
  assert stopped == free[:first] and first < 8
  assert cli.main(["sample", "--workdir", str(wd), "--chat", "--prompt", PROMPT,
                   "--temperature", "0", "--max-new-tokens", "8"]) == 0
  reply = hf_tok.decode(hf_new, skip_special_tokens=False).split("<|end|>")[0]
  assert capsys.readouterr().out == f"=== {PROMPT!r}\n{reply}\n"


def test_to_hf_exports_the_template_and_from_hf_reads_it_back(imported, tmp_path):
  wd, out, again = imported["wd"], tmp_path / "out", tmp_path / "again"
  assert cli.main(["convert", "to-hf", "--workdir", str(wd), "--out", str(out)]) == 0
  assert (out / "chat_template.jinja").read_text() == TEMPLATE
  assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
  exported = transformers.AutoTokenizer.from_pretrained(str(out))
  ours = T.load_template(str(wd))
  for gen in (False, True):
    assert exported.apply_chat_template(CONVERSATION, tokenize=False,
                                        add_generation_prompt=gen) == ours.render(CONVERSATION, gen)
  assert cli.main(["convert", "from-hf", "--hf-dir", str(out), "--workdir", str(again)]) == 0
  back = T.load_template(workdir_lib.load_config(str(again)).data.chat_template)
  assert back.source == TEMPLATE and dict(back.special_tokens)["eos_token"] == "<|end|>"


def test_the_exported_chatml_template_gives_the_ids_and_mask_we_train_on(tmp_path):
  _tokenizer_with(tmp_path, ["<|im_start|>", "<|im_end|>"])
  template = T.load_template("chatml")
  convert_lib.write_chat_template(template, str(tmp_path), {"bos_token": "<s>",
                                                            "eos_token": "</s>"})
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  ours = tok_lib.load_tokenizer(str(tmp_path / "tokenizer.json"))
  encoded = chat.encode(chat.Conversation("x:1", tuple(CONVERSATION)), template, ours)
  want = hf_tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                    return_assistant_tokens_mask=True)
  assert encoded.tokens.tolist() == list(want["input_ids"])  # bos first, as we prepend it
  assert encoded.weights.astype(int).tolist() == list(want["assistant_masks"])
  assert hf_tok.apply_chat_template(CONVERSATION, tokenize=False) == "<s>" + template.render(
      CONVERSATION)
  assert np.sum(encoded.weights) > 0
