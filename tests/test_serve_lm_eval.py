"""lm-evaluation-harness itself against `gptkit serve`: `lm_eval --model local-completions` with the
remote tokenizer, on a multiple-choice task defined in a local YAML over a local jsonl, must give the
acc `gptkit eval --task mc` gives on the same items (llm.c's scoring: the context's tokens, then the
tokens of " " + choice; acc = the choice with the largest summed logprob), and each choice's
loglikelihood must equal transformers' on the same random model. Needs `lm-eval[api]` (the `lm-eval`
extra; CI installs it); nothing is downloaded (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE)."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import data_file

pytest.importorskip("fastapi")
pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

NAME = "tiny-hf"
WORDS = "the a cat dog sat ran on under table house quickly slowly red blue big small and then it was".split()

TASK_YAML = """task: gptkit_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
"""


def items(n: int = 12) -> list[dict]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        ctx = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))).capitalize()
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(4)]
        out.append({"context": ctx, "choices": choices, "label": rng.randrange(4)})
    return out


def reference_scores(ref, tok, item) -> list[float]:
    """Summed logprob of each choice's tokens after the context's, with transformers."""
    ctx = tok.encode(item["context"])
    out = []
    for c in item["choices"]:
        cont = tok.encode(" " + c)
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([ctx + cont])).logits[0].double(), dim=-1)
        out.append(sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(cont)))
    return out


@pytest.mark.slow
def test_lm_eval_local_completions_scores_what_gptkit_scores(tmp_path):
    data_file("gpt2.tiktoken")
    from gptkit.serve import Server, ServeConfig, load_for_serving
    from gptkit.tokenizer import gpt2_tokenizer

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, initializer_range=0.3)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(tmp_path / "model")
    its = items()
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in its))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gptkit_mc.yaml").write_text(TASK_YAML.format(data=tmp_path / "items.jsonl"))

    tok = gpt2_tokenizer()
    scores = [reference_scores(ref, tok, i) for i in its]
    want_acc = sum(max(range(4), key=s.__getitem__) == i["label"] for s, i in zip(scores, its)) / len(its)
    p = subprocess.run([sys.executable, "-m", "gptkit", "eval", "--model", str(tmp_path / "model"), "--task", "mc",
                        "--data-file", str(tmp_path / "items.jsonl"), "--device", "cpu", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    gptkit_acc = json.loads(p.stdout.strip().splitlines()[-1])["acc"]
    assert gptkit_acc == pytest.approx(want_acc)

    model, stok, _ = load_for_serving(str(tmp_path / "model"), device="cpu")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home")}
    with Server(model, stok, NAME, config=ServeConfig(max_batch=8, batch_wait_s=0.005)) as s:
        cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
               f"base_url={s.url}/v1/completions,tokenizer_backend=remote,model={NAME},max_length=62,"
               "num_concurrent=1,max_retries=1", "--batch_size", "4",
               "--tasks", "gptkit_mc", "--include_path", str(tmp_path / "tasks"),
               "--output_path", str(tmp_path / "out"), "--log_samples"]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    result = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert result["results"]["gptkit_mc"]["acc,none"] == pytest.approx(gptkit_acc)
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_gptkit_mc_*.jsonl")).open()]
    assert len(samples) == len(its)
    for smp in samples:  # each choice's loglikelihood, not only the accuracy
        got = [float(r[0][0]) for r in smp["resps"]]  # lm-eval logs them as strings
        assert got == pytest.approx(scores[smp["doc_id"]], abs=1e-4)
