"""lm-evaluation-harness: the `mai_jax` model against the harness's own `hf` model on the same
exported checkpoint (log-likelihoods, accuracies, rolling perplexity, greedy generations), local
YAML tasks made here (nothing is downloaded), one-line errors for bad tasks, `mai-jax eval
--tasks`, train.eval_tasks, and a tensor=2 run read on 1 device."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mai_jax import cli  # noqa: E402
from mai_jax.harness import tasks as harness_tasks  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 96
CORPUS = ["def add(a, b):\n    return a + b\n", "x = 1\ny = 2\nprint(x + y)\n",
          "the cat sat on the mat. the dog ran.\n"]

MC_DOCS = [
    {"context": "def add(a, b):", "choices": [" return a + b", " pass", " x = 1"], "answer": 0},
    {"context": "x = 1\ny =", "choices": [" 2", " def", " the cat"], "answer": 0},
    {"context": "the cat sat on the", "choices": [" mat.", " dog", " print(x)"], "answer": 0},
    {"context": "print(x", "choices": [" + y)", " ran.", " sat"], "answer": 0},
    {"context": "the dog", "choices": [" ran.", " return", " = 1"], "answer": 1},
    {"context": "y = 2\nprint(", "choices": ["x + y)", "the mat", "a, b"], "answer": 2},
]
GEN_DOCS = [{"prompt": "def add(a, b):", "target": "return"}, {"prompt": "x = 1", "target": "y"},
            {"prompt": "the cat", "target": "sat"}, {"prompt": "print(", "target": "x"},
            {"prompt": "the", "target": "dog"}]
TEXT_DOCS = [{"text": t} for t in CORPUS + ["the cat ran on the dog. " * 6]]


def _write_tasks(root):
  """Three local lm-eval tasks: multiple choice, greedy generation, rolling perplexity."""
  os.makedirs(root, exist_ok=True)
  for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS), ("text", TEXT_DOCS)):
    with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
      f.writelines(json.dumps(d) + "\n" for d in docs)
  data = lambda name: f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " \
                      f"{os.path.join(root, name + '.jsonl')}\ntest_split: test\n"
  with open(os.path.join(root, "mc.yaml"), "w") as f:
    f.write("task: toy_mc\n" + data("mc") + "output_type: multiple_choice\n"
            "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
            "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
  with open(os.path.join(root, "gen.yaml"), "w") as f:
    f.write("task: toy_gen\n" + data("gen") + "output_type: generate_until\n"
            "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
            "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
            "metric_list:\n  - metric: exact_match\n")
  with open(os.path.join(root, "text.yaml"), "w") as f:
    f.write("task: toy_text\n" + data("text") + "output_type: loglikelihood_rolling\n"
            "doc_to_text: ''\ndoc_to_target: '{{text}}'\n"
            "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
  return root


def _write_hf_checkpoint(directory):
  """A tiny random LlamaForCausalLM and a BPE tokenizer.json that, like Llama's, prepends <s>."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256,
                                 bos_token_id=1, eos_token_id=2)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # sharper logits than the default init: fewer near-ties
    for p in model.parameters():
      p.mul_(3.0)
  model.save_pretrained(directory)
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:70])
  tok.train_from_iterator(CORPUS * 20, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class":
               "PreTrainedTokenizerFast"}, f)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """(workdir, its `convert to-hf` export, task folder), offline."""
  mp = pytest.MonkeyPatch()
  mp.setenv("HF_DATASETS_OFFLINE", "1")
  mp.setenv("HF_HUB_OFFLINE", "1")
  root = tmp_path_factory.mktemp("lm_eval")
  mp.setenv("HF_HOME", str(root / "hf_home"))
  _write_hf_checkpoint(str(root / "src"))
  wd, out = str(root / "wd"), str(root / "exported")
  # seq_len 16: the default max_length, so every scored row is one length bucket (one compile)
  assert cli.main(["convert", "from-hf", "--hf-dir", str(root / "src"), "--workdir", wd,
                   "--config.data.seq_len=16", "--config.model.remat=none"]) == 0
  assert cli.main(["convert", "to-hf", "--workdir", wd, "--out", out]) == 0
  yield wd, out, _write_tasks(str(root / "tasks"))
  mp.undo()


NAMES = ["toy_mc", "toy_gen", "toy_text"]


def _harness_run(model, model_args, tasks_dir):
  from lm_eval import evaluator
  from lm_eval.api.registry import get_model

  import mai_jax.harness.model  # noqa: F401  (registers mai_jax)
  lm = get_model(model).create_from_arg_string(model_args, {"batch_size": 4})
  return evaluator.evaluate(lm=lm, task_dict=harness_tasks.load_tasks(NAMES, tasks_dir),
                            log_samples=True, bootstrap_iters=0)


@pytest.fixture(scope="module")
def both(env):
  wd, exported, tasks_dir = env
  hf = _harness_run("hf", f"pretrained={exported},dtype=float32,max_length=16,device=cpu",
                    tasks_dir)
  ours = _harness_run("mai_jax", f"workdir={wd}", tasks_dir)  # max_length: data.seq_len=16
  return hf, ours


def _by_doc(results, task):
  return {s["doc_id"]: s for s in results["samples"][task]}


def test_loglikelihoods_and_accuracies_match_the_hf_model(both):
  hf, ours = both
  theirs, mine = _by_doc(hf, "toy_mc"), _by_doc(ours, "toy_mc")
  assert sorted(mine) == list(range(len(MC_DOCS)))
  for doc_id, sample in theirs.items():
    want = np.array([r[0][0] for r in sample["resps"]])
    got = np.array([r[0][0] for r in mine[doc_id]["resps"]])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert [r[0][1] for r in mine[doc_id]["resps"]] == [r[0][1] for r in sample["resps"]]
  for metric in ("acc,none", "acc_norm,none"):
    assert ours["results"]["toy_mc"][metric] == hf["results"]["toy_mc"][metric]
  # acc is the share of docs whose answer has the highest log-likelihood (recomputed here)
  picks = [int(np.argmax([r[0][0] for r in mine[i]["resps"]])) for i in range(len(MC_DOCS))]
  want_acc = np.mean([p == d["answer"] for p, d in zip(picks, MC_DOCS)])
  assert ours["results"]["toy_mc"]["acc,none"] == pytest.approx(want_acc)


def test_rolling_perplexity_matches_the_hf_model(both):
  hf, ours = both
  theirs, mine = _by_doc(hf, "toy_text"), _by_doc(ours, "toy_text")
  for doc_id, sample in theirs.items():
    np.testing.assert_allclose(mine[doc_id]["resps"][0][0], sample["resps"][0][0], rtol=1e-4)
  assert len(mine) == len(TEXT_DOCS)  # the last doc spans several 16-token windows
  for metric in ("word_perplexity,none", "bits_per_byte,none"):
    assert ours["results"]["toy_text"][metric] == pytest.approx(
        hf["results"]["toy_text"][metric], rel=1e-4)


def test_greedy_generations_match_the_hf_model(both):
  hf, ours = both
  theirs, mine = _by_doc(hf, "toy_gen"), _by_doc(ours, "toy_gen")
  got = [mine[i]["resps"][0][0] for i in range(len(GEN_DOCS))]
  assert got == [theirs[i]["resps"][0][0] for i in range(len(GEN_DOCS))]
  assert any(got) and all("\n" not in g for g in got)  # cut at the task's stop string
  assert ours["results"]["toy_gen"]["exact_match,none"] == hf["results"]["toy_gen"][
      "exact_match,none"]


def test_mai_jax_eval_tasks_writes_the_harness_metrics(env, both, capsys):
  wd, _, tasks_dir = env
  _, ours = both
  assert cli.main(["eval", "--workdir", wd, "--tasks", "toy_mc,toy_text", "--include-path",
                   tasks_dir, "--batch-size", "3"]) == 0
  out = capsys.readouterr().out
  assert "toy_mc" in out and "acc" in out
  with open(os.path.join(wd, "eval.json")) as f:
    written = json.load(f)
  assert written["step"] == 0 and set(written["harness"]) == {"toy_mc", "toy_text"}
  assert written["harness"]["toy_mc"]["acc"] == ours["results"]["toy_mc"]["acc,none"]
  assert written["harness"]["toy_text"]["word_perplexity"] == pytest.approx(
      ours["results"]["toy_text"]["word_perplexity,none"], rel=1e-6)


def test_train_evals_log_task_metrics_under_tasks_prefix(env, both):
  import dataclasses

  from mai_jax import workdir as workdir_lib
  wd, _, tasks_dir = env
  _, ours = both
  cfg, model, _, mesh = workdir_lib.load_model(wd)
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(
      cfg.train, eval_tasks=("toy_mc",), eval_tasks_path=tasks_dir, global_batch_size=8))
  scalars = harness_tasks.TrainEvals(cfg, mesh, workdir_lib.load_tokenizer(cfg, wd)).run(model)
  assert scalars == {"tasks/toy_mc/acc": ours["results"]["toy_mc"]["acc,none"],
                     "tasks/toy_mc/acc_norm": ours["results"]["toy_mc"]["acc_norm,none"]}


@pytest.mark.parametrize("break_it,message", [
    ("missing", "lm-eval task toy_mc does not load (FileNotFoundError"),
    ("malformed", "unknown lm-eval task(s) toy_mc"),
    ("unknown", "unknown lm-eval task(s) no_such_task"),
])
def test_a_bad_task_is_a_one_line_error(env, tmp_path, capsys, break_it, message):
  wd, _, tasks_dir = env
  bad = tmp_path / "tasks"
  bad.mkdir()
  text = open(os.path.join(tasks_dir, "mc.yaml")).read()
  if break_it == "missing":
    text = text.replace(os.path.join(tasks_dir, "mc.jsonl"), str(bad / "gone.jsonl"))
  elif break_it == "malformed":
    text = text.replace("output_type: multiple_choice", "output_type: [multiple_choice")
  (bad / "mc.yaml").write_text(text)
  name = "no_such_task" if break_it == "unknown" else "toy_mc"
  before = os.listdir(wd)
  assert cli.main(["eval", "--workdir", wd, "--tasks", name, "--include-path", str(bad)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"mai-jax: error: {message}") and "\n" not in err, err
  assert os.listdir(wd) == before
