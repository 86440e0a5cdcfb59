"""Chat templates: a conversation -> the text the model reads, and which characters it learns.

A template is Jinja source, rendered the way Hugging Face's `apply_chat_template` renders it (so a
model imported with its tokenizer sees exactly the text it was tuned on): jinja2's
`ImmutableSandboxedEnvironment` with `trim_blocks`/`lstrip_blocks`, the `loopcontrols` extension,
HF's globals `raise_exception` and `strftime_now`, its `tojson` filter, and the variables
`messages`, `add_generation_prompt` and the special tokens of the tokenizer_config.json beside the
template (`bos_token`, `eos_token`, ...). The sandbox matters: a template is code that came with a
downloaded model, and must not reach Python internals.

Which characters are trained (the loss mask), in order of authority:
  1. `{% generation %}...{% endgeneration %}` blocks, when the template has them (HF's convention
     for `return_assistant_tokens_mask`): exactly the characters they render. The built-in
     'chatml' template marks each assistant reply plus its `<|im_end|>`.
  2. Otherwise incremental prefix rendering, since the stock Llama-3.1 / Qwen3 / Gemma-3
     templates have no such tags: assistant message i trains the characters between
     render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]), i.e. its
     content and end-of-turn, not the header the prompt already holds. This needs a
     prefix-stable template (rendering a conversation's start does not change when later messages
     follow); one that is not (e.g. one that drops earlier turns' reasoning) is an error naming
     the record, never a silently wrong mask.
  3. A message's own `loss` (true/false) overrides the role: false trains nothing of it, true on a
     non-assistant message trains its whole rendered span, header included (spans again from
     prefix rendering).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import re
from typing import Optional, Sequence

import numpy as np

from mai_jax.config import ConfigError

# Sentinels the generation block wraps its output in (Unicode private use: never in real text;
# a message containing one is refused rather than mis-masked).
_OPEN, _CLOSE = "\ue000", "\ue001"
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")

# ChatML (OpenAI, Qwen): <|im_start|>role\ncontent<|im_end|>\n per message.
CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}{{- message['content'] + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
CHATML_END_OF_TURN = "<|im_end|>"


class ChatError(ConfigError):
  """A conversation or template that cannot be trained on; the message names the record."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """Jinja `source` and where it came from. `prepend_bos`: the tokenizer's bos id goes before
  the rendered text (the built-in ChatML; HF templates write `{{ bos_token }}` themselves)."""
  source: str
  name: str
  special_tokens: tuple[tuple[str, str], ...] = ()
  prepend_bos: bool = False

  @functools.cached_property
  def _compiled(self):
    try:
      return _environment().from_string(self.source)
    except Exception as e:  # jinja2.TemplateSyntaxError and friends
      raise ChatError(f"chat template {self.name}: does not compile ({type(e).__name__}: {e})"
                      ) from None

  @property
  def has_generation_tags(self) -> bool:
    return bool(_GENERATION_TAG.search(self.source))

  def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The plain text (generation marks removed)."""
    return self.render_marked(messages, add_generation_prompt)[0]

  def render_marked(self, messages: Sequence[dict], add_generation_prompt: bool = False
                    ) -> tuple[str, list[tuple[int, int]]]:
    """(text, [start, end) character spans of its generation blocks)."""
    raw = self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                **dict(self.special_tokens))
    text, spans, start = [], [], None
    pos = 0
    for piece in re.split(f"([{_OPEN}{_CLOSE}])", raw):
      if piece == _OPEN:
        start = pos if start is None else start  # nested blocks count once
      elif piece == _CLOSE:
        if start is not None:
          spans.append((start, pos))
        start = None
      else:
        text.append(piece)
        pos += len(piece)
    return "".join(text), spans


def _environment():
  """HF's chat-template environment (transformers' `_compile_jinja_template`), with our
  generation-tag extension."""
  try:
    import jinja2  # pylint: disable=import-outside-toplevel
    from jinja2 import ext, nodes, sandbox  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ChatError("chat templates need jinja2: pip install 'mai_jax[chat]'") from None

  class GenerationTags(ext.Extension):
    """`{% generation %}body{% endgeneration %}` renders body between two sentinels."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
      return _OPEN + caller() + _CLOSE

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[GenerationTags, ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


def end_of_turn(template: ChatTemplate) -> str:
  """The text that ends an assistant reply: ChatML's <|im_end|>, else the template's eos_token
  ('' when it declares none)."""
  if template.name == "chatml":
    return CHATML_END_OF_TURN
  return dict(template.special_tokens).get("eos_token", "")


# ------------------------------------------------------------------------------------ loading

def load_template(spec: str) -> ChatTemplate:
  """data.chat_template: 'chatml', a chat_template.jinja, a tokenizer_config.json (its
  `chat_template`, the 'default' one of a list), or a folder holding one of them."""
  if spec == "chatml":
    return ChatTemplate(CHATML, "chatml", prepend_bos=True)
  fix = ("set data.chat_template to 'chatml', a chat_template.jinja, a tokenizer_config.json with "
         "a 'chat_template', or a folder holding one (e.g. a `convert from-hf` workdir)")
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    for name in ("chat_template.jinja", "tokenizer_config.json"):
      candidate = os.path.join(path, name)
      if os.path.isfile(candidate) and (name.endswith(".jinja") or _config_template(candidate)):
        path = candidate
        break
    else:
      raise ChatError(f"data.chat_template={spec}: the folder has no chat_template.jinja and no "
                      f"tokenizer_config.json with a 'chat_template'; {fix}")
  if not os.path.isfile(path):
    raise ChatError(f"data.chat_template={spec}: no such file or folder; {fix}")
  folder = os.path.dirname(os.path.abspath(path))
  if path.endswith(".json"):
    source = _config_template(path)
    if source is None:
      raise ChatError(f"data.chat_template={spec}: {path} has no 'chat_template'; {fix}")
  else:
    with open(path, encoding="utf-8") as f:
      source = f.read()
  return ChatTemplate(source, path, special_tokens=_special_tokens(folder))


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except ValueError as e:
    raise ChatError(f"{path}: not valid JSON ({e})") from None
  return raw if isinstance(raw, dict) else {}


def _config_template(path: str) -> Optional[str]:
  """The chat template of a tokenizer_config.json: a string, or the 'default' of a named list."""
  template = _read_json(path).get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  return template if isinstance(template, str) else None


def _special_tokens(folder: str) -> tuple[tuple[str, str], ...]:
  """bos_token, eos_token, ... of the tokenizer_config.json in `folder` (strings or
  {"content": ...}), the variables HF passes to the template."""
  path = os.path.join(folder, "tokenizer_config.json")
  settings = _read_json(path) if os.path.isfile(path) else {}
  out = []
  for key in _SPECIAL_TOKEN_KEYS:
    value = settings.get(key)
    value = value.get("content") if isinstance(value, dict) else value
    if isinstance(value, str):
      out.append((key, value))
  return tuple(out)


# --------------------------------------------------------------------------------------- masks

def render_with_mask(template: ChatTemplate, messages: Sequence[dict], record: str
                     ) -> tuple[str, np.ndarray]:
  """(text, bool [len(text)]: the characters the loss trains), by the rules of the module
  docstring. `messages` are {'role', 'content', 'loss'?} dicts; `record` names the conversation
  in errors (file:line)."""
  plain = [{k: v for k, v in m.items() if k != "loss"} for m in messages]
  if any(_OPEN in m["content"] or _CLOSE in m["content"] for m in plain):
    raise ChatError(f"{record}: a message contains U+E000/U+E001, which mark generation blocks")
  text, spans = _render(template, plain, False, record)
  mask = np.zeros(len(text), bool)
  overrides = [i for i, m in enumerate(messages) if m.get("loss") is not None]
  tagged = template.has_generation_tags
  bounds = _message_bounds(template, plain, text, record) if overrides or not tagged else None
  if tagged:
    for start, end in spans:
      mask[start:end] = True
  else:
    for i, m in enumerate(plain):
      if m["role"] == "assistant":
        mask[bounds[i][1]:bounds[i][2]] = True
  for i in overrides:
    start, body, end = bounds[i]
    if messages[i]["loss"]:
      mask[body if plain[i]["role"] == "assistant" else start:end] = True
    else:
      mask[start:end] = False
  return text, mask


def _render(template, messages, add_generation_prompt, record):
  try:
    return template.render_marked(messages, add_generation_prompt)
  except ChatError:
    raise
  except Exception as e:  # the template's own raise_exception, undefined names, ...
    raise ChatError(f"{record}: chat template {template.name} failed on this conversation "
                    f"({type(e).__name__}: {e})") from None


def _message_bounds(template, messages, full: str, record: str) -> list[tuple[int, int, int]]:
  """(start, body start, end) character offsets of each message in `full`: start = end of the
  rendered previous messages, body start = end of the same with the generation prompt (assistant
  messages only; others: start), end = end of the messages up to this one."""
  def prefix(n, generation_prompt=False):
    if n == 0 and not generation_prompt:
      try:
        text = template.render(messages[:0])
      except Exception:  # pylint: disable=broad-except  (templates may index messages[0])
        return 0
    else:
      text = _render(template, messages[:n], generation_prompt, record)[0]
    if not full.startswith(text):
      raise ChatError(
          f"{record}: chat template {template.name} is not prefix-stable (the rendering of the "
          f"first {n} messages{' plus the generation prompt' if generation_prompt else ''} is not "
          f"the start of the whole conversation's), so the assistant tokens cannot be found by "
          f"prefix rendering; use a template with {{% generation %}} tags around assistant "
          f"replies")
    return len(text)

  bounds = []
  for i, m in enumerate(messages):
    start, end = prefix(i), prefix(i + 1)
    body = prefix(i, True) if m["role"] == "assistant" else start
    bounds.append((start, min(max(body, start), end), end))
  return bounds
