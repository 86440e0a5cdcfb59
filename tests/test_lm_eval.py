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


def _harness_run(model, model_args, tasks_dir, batch_size=4):
  from lm_eval import evaluator
  from lm_eval.api.registry import get_model

  import mai_jax.harness.model  # noqa: F401  (registers mai_jax)
  lm = get_model(model).create_from_arg_string(model_args, {"batch_size": batch_size})
  return evaluator.evaluate(lm=lm, task_dict=harness_tasks.load_tasks(NAMES, tasks_dir),
                            log_samples=True, bootstrap_iters=0)


@pytest.fixture(scope="module")
def both(env):
  wd, exported, tasks_dir = env
  # logits_cache=False: lm-eval's hf model shares one forward pass between requests whose
  # context + continuation[:-1] coincide and then slices it with the first one's continuation
  # length, so a 3-token rolling window that repeats a 16-token window's key is misscored (the
  # BPE trainer's tie-breaking varies per process, so this hit ~1 run in 4)
  hf = _harness_run("hf", f"pretrained={exported},dtype=float32,max_length=16,device=cpu,"
                    f"logits_cache=False", tasks_dir)
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
    ("malformed", "unknown lm-eval task(s) toy_mc: {bad}/mc.yaml does not parse as YAML"),
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
  assert err.startswith(f"mai-jax: error: {message.format(bad=bad)}") and "\n" not in err, err
  assert os.listdir(wd) == before


def test_eval_tokens_sets_the_validation_batches_whatever_the_training_batch():
  from mai_jax import config as C
  from mai_jax.data.batches import eval_batch_count
  cfg = C.Config()
  with_size = lambda tokens, rows, seq: C.apply_overrides(cfg, {
      "data.eval_tokens": str(tokens), "train.global_batch_size": str(rows),
      "data.seq_len": str(seq), "train.eval_batches": "8"})
  assert eval_batch_count(with_size(0, 4, 16)) == 8  # 0: train.eval_batches
  assert eval_batch_count(with_size(1000, 4, 16)) == 16  # ceil(1000 / 64)
  assert eval_batch_count(with_size(1000, 32, 16)) == 2  # ceil(1000 / 512)
  with pytest.raises(C.ConfigError, match="data.eval_tokens=-1 must be >= 0"):
    C.validate(with_size(-1, 4, 16))


_HARNESS_ON_ONE_DEVICE = """
import json, os, sys
from mai_jax import cli
run, tasks, out = sys.argv[1:4]
rc = cli.main(["eval", "--workdir", run, "--tasks", "toy_mc", "--include-path", tasks])
sys.argv = ["lm_eval", "--model", "mai_jax", "--model_args", "workdir=" + run, "--tasks",
            "toy_mc", "--include_path", tasks, "--output_path", out, "--log_samples"]
from mai_jax.harness.__main__ import main
print("RCS " + json.dumps([rc, main()]))
"""


@pytest.mark.slow  # a tiny tensor=2 training run with task evals, then a 1-device reader (~60 s)
def test_a_tensor_2_run_logs_task_evals_and_reads_on_one_device(env, tmp_path):
  import glob

  from cli_runs import SMOKE, cli_env, metrics
  from mai_jax import config as C
  from mai_jax.train import loop as loop_lib
  _, _, tasks_dir = env
  cfg = C.apply_overrides(C.load_experiment(SMOKE), {
      "model.num_layers": "1", "model.d_model": "32", "model.num_heads": "2",
      "model.num_kv_heads": "2", "model.head_dim": "16", "model.d_ff": "64",
      "model.remat": "'none'", "data.seq_len": "16", "data.max_files": "20",
      "data.val_fraction": "0.3", "data.tokenizer_train_chars": "60000", "train.num_steps": "2",
      "train.eval_every": "1", "train.eval_batches": "1", "data.eval_tokens": "200",
      "mesh.tensor": "2", "train.eval_tasks": "('toy_mc',)",
      "train.eval_tasks_path": repr(tasks_dir)})
  C.validate(cfg)
  run = tmp_path / "run"
  loop_lib.train(cfg, str(run))
  logged = {m["step"]: m for m in metrics(run) if "eval_loss" in m}
  assert sorted(logged) == [1, 2]
  rows = cfg.train.global_batch_size * cfg.data.seq_len
  batches = -(-200 // rows)  # 2, whatever train.eval_batches says
  for m in logged.values():
    assert (batches - 1) * rows < m["eval_tokens"] <= batches * rows
    assert 0 <= m["tasks/toy_mc/acc"] <= 1 and "tasks/toy_mc/acc_norm" in m
  # The same docs scored by the tensor=2 model here (8 devices) and on 1 device (fitted mesh).
  here = _harness_run("mai_jax", f"workdir={run}", tasks_dir,  # the loop's batch: compiled
                      batch_size=cfg.train.global_batch_size)
  assert here["results"]["toy_mc"]["acc,none"] == logged[2]["tasks/toy_mc/acc"]
  proc = subprocess.run([sys.executable, "-c", _HARNESS_ON_ONE_DEVICE, str(run), tasks_dir,
                         str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO,
                        env=cli_env(devices=1), timeout=600)
  assert "RCS [0, 0]" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "does not fit the 1 device(s) here" in proc.stderr
  with open(run / "eval.json") as f:
    assert json.load(f)["harness"]["toy_mc"]["acc"] == logged[2]["tasks/toy_mc/acc"]
  [samples] = glob.glob(str(tmp_path / "out" / "**" / "samples_toy_mc_*.jsonl"), recursive=True)
  with open(samples) as f:
    one_device = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in map(json.loads, f)}
  for doc_id, sample in _by_doc(here, "toy_mc").items():
    np.testing.assert_allclose(one_device[doc_id], [r[0][0] for r in sample["resps"]],
                               rtol=1e-5, atol=1e-5)
