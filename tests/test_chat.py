"""Chat formats: readers, templates (ChatML, HF with and without generation tags) and loss masks
against hand-built references and transformers' renderer; tokens and the SFT data pipeline."""

import json

import numpy as np
import pytest

from mai_jax import config as C
from mai_jax.data import batches, chat, chat_pipeline
from mai_jax.data import chat_template as T
from mai_jax.data import tokenizer as tok_lib

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao."},
]

# A Llama-3-style template: bos, headers, <|eot_id|>; no generation tags (like the stock one).
LLAMA3 = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
          "{% if message['role'] == 'assistant' %}{% generation %}"
          "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
          "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
LLAMA3_UNTAGGED = LLAMA3.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def _trained(text, mask):
  """The trained characters, as maximal runs."""
  runs, cur = [], ""
  for c, m in zip(text, mask):
    if m:
      cur += c
    elif cur:
      runs.append(cur)
      cur = ""
  return runs + ([cur] if cur else [])


def _llama3_reference():
  header = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731
  text = ("<|begin_of_text|>" + header("system") + "Be brief.<|eot_id|>" + header("user")
          + "Hi there<|eot_id|>" + header("assistant") + "Hello!<|eot_id|>" + header("user")
          + "Bye<|eot_id|>" + header("assistant") + "Ciao.<|eot_id|>")
  return text, ["Hello!<|eot_id|>", "Ciao.<|eot_id|>"]


def _hf_template(source):
  return T.ChatTemplate(source, "llama3-test", special_tokens=(("bos_token", "<|begin_of_text|>"),
                                                               ("eos_token", "<|eot_id|>")))


def test_chatml_text_and_mask_match_a_hand_built_reference():
  text, mask = T.render_with_mask(T.load_template("chatml"), CONVERSATION, "x:1")
  want = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
          "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
          "<|im_start|>assistant\nCiao.<|im_end|>\n")
  assert text == want
  assert _trained(text, mask) == ["Hello!<|im_end|>", "Ciao.<|im_end|>"]
  assert T.load_template("chatml").render(CONVERSATION[:2], add_generation_prompt=True) == (
      want[:want.index("Hello!")])


@pytest.mark.parametrize("source", [LLAMA3, LLAMA3_UNTAGGED], ids=["tags", "prefix"])
def test_hf_template_masks_the_replies_with_or_without_generation_tags(source):
  from transformers.utils.chat_template_utils import render_jinja_template
  template = _hf_template(source)
  assert template.has_generation_tags == (source is LLAMA3)
  text, mask = T.render_with_mask(template, CONVERSATION, "x:1")
  want_text, want_trained = _llama3_reference()
  assert text == want_text
  assert _trained(text, mask) == want_trained
  (hf_text,), (hf_spans,) = render_jinja_template(
      [CONVERSATION], chat_template=LLAMA3, return_assistant_tokens_mask=True,
      bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
  assert text == hf_text  # transformers renders the same text and marks the same characters
  assert [text[s:e] for s, e in hf_spans] == want_trained


def test_templates_load_from_an_hf_folder_with_its_special_tokens(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "chat_template": [{"name": "default", "template": LLAMA3}, {"name": "x", "template": "?"}],
      "bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|eot_id|>"}))
  from_config = T.load_template(str(tmp_path))
  assert from_config.source == LLAMA3 and dict(from_config.special_tokens) == {
      "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
  assert T.end_of_turn(from_config) == "<|eot_id|>"
  (tmp_path / "chat_template.jinja").write_text(LLAMA3_UNTAGGED)
  from_jinja = T.load_template(str(tmp_path))  # the .jinja file wins, as in transformers
  assert from_jinja.source == LLAMA3_UNTAGGED and not from_jinja.prepend_bos
  assert from_jinja.render(CONVERSATION) == _llama3_reference()[0]
  with pytest.raises(C.ConfigError, match="data.chat_template=.*no such file"):
    T.load_template(str(tmp_path / "nope.jinja"))


def test_per_message_loss_overrides_the_role():
  messages = [dict(m) for m in CONVERSATION]
  messages[2]["loss"] = False  # do not learn the first reply
  messages[3]["loss"] = True  # learn the user's turn, header included
  for template in (T.load_template("chatml"), _hf_template(LLAMA3_UNTAGGED)):
    text, mask = T.render_with_mask(template, messages, "x:1")
    trained = _trained(text, mask)
    if template.name == "chatml":
      assert trained == ["<|im_start|>user\nBye<|im_end|>\n", "Ciao.<|im_end|>"]
    else:
      assert trained == ["<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>",
                         "Ciao.<|eot_id|>"]


def _write(path, records):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return path


def test_an_empty_mask_is_an_error_naming_the_record(tmp_path):
  _write(tmp_path / "c.jsonl", [{"prompt": "a", "completion": "b"},
                                {"messages": [{"role": "user", "content": "only a question"}]},
                                {"messages": [{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": "a",
                                               "loss": False}]}])
  convs = list(chat.read_conversations(str(tmp_path), "c.jsonl"))
  template, tok = T.load_template("chatml"), _CharTokenizer()
  assert chat.encode(convs[0], template, tok).weights.any()
  for line, conv in ((2, convs[1]), (3, convs[2])):
    with pytest.raises(T.ChatError, match=f"^c.jsonl:{line}: nothing to learn"):
      chat.encode(conv, template, tok)


def test_the_three_formats_read_to_the_same_messages(tmp_path):
  user, reply = {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}
  _write(tmp_path / "f.jsonl", [
      {"messages": [user, reply]}, {"prompt": "2+2?", "completion": "4"},
      {"prompt": [user], "completion": [reply]},
      {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}])
  convs = list(chat.read_conversations(str(tmp_path), "f.jsonl"))
  assert [c.record for c in convs] == ["f.jsonl:1", "f.jsonl:2", "f.jsonl:3", "f.jsonl:4"]
  assert all(list(c.messages) == [user, reply] for c in convs)
  for bad, why in (("{not json", "not JSON"), ({"text": "x"}, "none of the formats"),
                   ({"messages": [{"role": "user"}]}, "string 'content'"),
                   ({"messages": [{"role": "user", "content": "x", "loss": 1}]}, "true or false"),
                   ({"conversations": [{"from": "robot", "value": "x"}]}, "'from' in")):
    _write(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, bad])
    with pytest.raises(T.ChatError, match=f"bad.jsonl:2: .*{why}"):
      list(chat.read_conversations(str(tmp_path), "bad.jsonl"))


def test_a_template_that_is_not_prefix_stable_is_an_error():
  # Drops all but the last assistant reply's text, like templates that strip earlier reasoning.
  unstable = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}[old]"
              "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}")
  with pytest.raises(T.ChatError, match="x:7: .*not prefix-stable"):
    T.render_with_mask(T.ChatTemplate(unstable, "unstable"), CONVERSATION, "x:7")


def test_templates_run_in_the_sandbox():
  escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
  with pytest.raises(T.ChatError, match="x:1: chat template evil failed.*SecurityError"):
    T.render_with_mask(T.ChatTemplate(escape, "evil"), CONVERSATION, "x:1")
  raising = "{{ raise_exception('no system role') }}"
  with pytest.raises(T.ChatError, match="no system role"):
    T.render_with_mask(T.ChatTemplate(raising, "strict"), CONVERSATION, "x:1")


class _CharTokenizer:
  """One id per character (ord + 4): token boundaries are character boundaries."""
  vocab_size, pad_id, bos_id, eos_id = 1 << 16, 0, 2, 3

  def encode(self, text):
    return [ord(c) + 4 for c in text]

  def decode(self, ids):
    return "".join(chr(i - 4) for i in ids)


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
  text = " ".join(["Hello there, how are you? I am fine. Be brief."] * 50)
  path = tok_lib.train_sentencepiece([text], 300, str(tmp_path_factory.mktemp("tok") / "t"),
                                     100_000)
  return tok_lib.SentencePieceTokenizer(path)


def test_tokens_and_weights_cover_exactly_the_trained_characters(sp_tokenizer):
  conv = chat.Conversation("x:1", tuple(CONVERSATION))
  template = T.load_template("chatml")
  e = chat.encode(conv, template, sp_tokenizer)
  text, mask = T.render_with_mask(template, CONVERSATION, "x:1")
  assert e.tokens[0] == sp_tokenizer.bos_id and e.weights[0] == 0
  assert sp_tokenizer.decode(e.tokens[1:].tolist()) == text
  assert sp_tokenizer.decode(e.tokens[e.weights == 1].tolist()) == "".join(_trained(text, mask))
  assert set(np.unique(e.weights)) == {0.0, 1.0}
  # A prompt for sampling is tokenized as in training: the reply's tokens follow it.
  prompt = chat.prompt_tokens(CONVERSATION[:4], template, sp_tokenizer)
  assert e.tokens[:len(prompt)].tolist() == prompt
  assert sp_tokenizer.decode(e.tokens[len(prompt):].tolist()).startswith("Ciao.<|im_end|>")


def _sft_config(path, **data):
  cfg = C.Config(
      model=C.ModelConfig(vocab_size=300),
      data=C.DataConfig(seq_len=160, val_fraction=0.25, sources=(
          {"name": "chat", "kind": "chat", "path": str(path)},), **data),
      train=C.TrainConfig(global_batch_size=4, objective="sft", init_from="somewhere"))
  C.validate(cfg)
  return cfg


def test_the_sft_pipeline_packs_conversations_with_weights_on_replies(tmp_path, sp_tokenizer):
  replies = [f"Fine{'!' * i}" for i in range(24)]
  path = _write(tmp_path / "c.jsonl", [{"prompt": f"how are you {i}?", "completion": r}
                                       for i, r in enumerate(replies)])
  cfg = _sft_config(path)
  batch = next(batches.make_train_iterator(cfg, sp_tokenizer))
  assert batch["loss_weights"].dtype == np.float32 and batch["loss_weights"].shape == (4, 160)
  seg, w = batch["segment_ids"], batch["loss_weights"]
  assert (w[seg == 0] == 0).all() and w.sum() > 0
  rows = 0
  for r in range(4):
    for s in set(seg[r][seg[r] > 0].tolist()):
      trained = sp_tokenizer.decode(batch["targets"][r][(seg[r] == s) & (w[r] == 1)].tolist())
      assert trained.endswith("<|im_end|>") and trained[:-len("<|im_end|>")] in replies
      rows += 1
  assert rows > 4  # short conversations are packed several per row
  # Held-out conversations: each trained target scored once.
  val = chat_pipeline.split_conversations(cfg, C.data_sources(cfg.data)[0], "validation")
  want = sum(chat.encode(c, T.load_template("chatml"), sp_tokenizer).weights[1:].sum()
             for c in val)
  evals = batches.make_eval_batches(cfg, sp_tokenizer, num_batches=8)
  assert sum(b["loss_weights"].sum() for b in evals) == want


def test_post_training_config_errors_name_the_key():
  chat_source = ({"name": "c", "kind": "chat", "path": "c.jsonl"},)
  pairs = ({"name": "p", "kind": "preference", "path": "p.jsonl"},)
  cases = [
      (dict(train=C.TrainConfig(objective="sft", init_from="w")), "every data.sources entry"),
      (dict(data=C.DataConfig(sources=chat_source)), "read by train.objective=sft only"),
      (dict(data=C.DataConfig(sources=chat_source), train=C.TrainConfig(objective="sft")),
       "train.init_from"),
      (dict(data=C.DataConfig(sources=chat_source), train=C.TrainConfig(objective="dpo",
                                                                        init_from="w")),
       "reads kind 'preference'"),
      (dict(data=C.DataConfig(sources=pairs, tokenizer_path="t.model"),
            train=C.TrainConfig(objective="dpo")), "scores against the starting weights"),
      (dict(data=C.DataConfig(sources=pairs), train=C.TrainConfig(
          objective="simpo", init_from="w", preference_beta=0.0)), "preference_beta=0.0"),
      (dict(train=C.TrainConfig(objective="ipo")), "train.objective='ipo' is not one of"),
  ]
  for kwargs, message in cases:
    with pytest.raises(C.ConfigError, match=message):
      C.validate(C.Config(**kwargs))


def test_the_sft_stream_resumes_exactly_from_its_state(tmp_path, sp_tokenizer):
  path = _write(tmp_path / "c.jsonl", [{"prompt": f"q{i}", "completion": "a" * (i % 7 + 1)}
                                       for i in range(40)])
  cfg = _sft_config(path)
  it = batches.make_train_iterator(cfg, sp_tokenizer)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  resumed = batches.make_train_iterator(cfg, sp_tokenizer)
  resumed.set_state(state)
  for a, b in zip(want, (next(resumed) for _ in range(2))):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_preference_pairs_split_off_the_shared_prefix_and_weight_the_completions(sp_tokenizer):
  user, extra = {"role": "user", "content": "Hi there"}, {"role": "user", "content": "Bye"}
  good, bad = {"role": "assistant", "content": "Hello!"}, {"role": "assistant", "content": "No."}
  as_strings = chat.parse_preference({"prompt": "Hi there", "chosen": "Hello!",
                                      "rejected": "No."}, "p:1")
  as_conversations = chat.parse_preference({"chosen": [user, good], "rejected": [user, bad]}, "p:2")
  for pair in (as_strings, as_conversations):
    assert (pair.prompt, pair.chosen, pair.rejected) == ((user,), (good,), (bad,))
  template = T.load_template("chatml")
  chosen, rejected = chat.encode_preference(as_strings, template, sp_tokenizer)
  prompt = chat.prompt_tokens([user], template, sp_tokenizer)
  for e, reply in ((chosen, "Hello!"), (rejected, "No.")):
    assert e.tokens[:len(prompt)].tolist() == prompt and not e.weights[:len(prompt)].any()
    assert sp_tokenizer.decode(e.tokens[e.weights == 1].tolist()) == reply + "<|im_end|>"
  # A multi-turn prompt's own assistant reply is context, not a completion.
  history = chat.parse_preference({"prompt": [user, good, extra], "chosen": "Ciao.",
                                   "rejected": "No."}, "p:3")
  chosen, _ = chat.encode_preference(history, template, sp_tokenizer)
  assert sp_tokenizer.decode(chosen.tokens[chosen.weights == 1].tolist()) == "Ciao.<|im_end|>"
  for raw, why in (({"prompt": "q", "chosen": "a", "rejected": "a"}, "the same"),
                   ({"chosen": "a", "rejected": "b"}, "no prompt"), ({"prompt": "q"}, "'chosen'")):
    with pytest.raises(T.ChatError, match=f"p:9: .*{why}"):
      chat.parse_preference(raw, "p:9")


def test_an_hf_tokenizer_gives_the_ids_and_assistant_mask_transformers_gives(tmp_path):
  import tokenizers
  from transformers import PreTrainedTokenizerFast
  from mai_jax.data import tokenizer_files
  path = str(tmp_path / "tokenizer.json")
  tokenizer_files.train_hf_bpe([" ".join(m["content"] for m in CONVERSATION) * 20], 300, path,
                               10_000)
  tok = tokenizers.Tokenizer.from_file(path)
  tok.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>"])
  tok.save(path)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "chat_template": LLAMA3, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
  ours = chat.encode(chat.Conversation("x:1", tuple(CONVERSATION)),
                     T.load_template(str(tmp_path)), tok_lib.load_tokenizer(path))
  hf = PreTrainedTokenizerFast(tokenizer_file=path, chat_template=LLAMA3,
                               bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
  want = hf.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                return_assistant_tokens_mask=True)
  assert ours.tokens.tolist() == list(want["input_ids"])
  assert ours.weights.astype(int).tolist() == list(want["assistant_masks"])
  assert ours.tokens[ours.weights == 1][-1] == tok.token_to_id("<|eot_id|>")  # one token
