"""The engine against transformers' generate on tiny random models that transformers writes itself.

A large initializer_range (0.5) keeps greedy choices away from near-ties; tokens are compared only
up to the first step whose top-2 logit margin is below 1e-4 (past it, either choice is right)."""

import pytest
import torch

from gptkit.beam import beam_search
from gptkit.generate import SamplingParams, generate_batch
from gptkit.loading import load_model
from tests.conftest import make_hf_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf-gen") / "tiny"
    hf = make_hf_model(d, initializer_range=0.5, n_positions=64, vocab_size=320)
    return hf, load_model(d).model


def _trusted_prefix(scores) -> int:
    """Number of leading steps whose top-2 margin is > 1e-4."""
    n = 0
    for s in scores:
        top2 = torch.topk(s[0].float(), 2).values
        if float(top2[0] - top2[1]) <= 1e-4:
            break
        n += 1
    return n


@pytest.mark.parametrize("prompt", [[5, 17, 3], [100, 2, 250, 31, 7, 7, 9]])
def test_greedy_equals_transformers_greedy(pair, prompt):
    hf, model = pair
    eos = hf.config.eos_token_id
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      do_sample=False, max_new_tokens=30, return_dict_in_generate=True, output_logits=True,
                      pad_token_id=eos)
    ref = out.sequences[0, len(prompt):].tolist()
    n = _trusted_prefix(out.logits)
    assert n >= 10, "the tiny model has too many near-ties for a meaningful comparison"
    ours = generate_batch(model, [prompt], SamplingParams(max_new_tokens=30, temperature=0), eot=eos)[0]
    got = ours.token_ids + ([eos] if ours.finish_reason == "stop" else [])
    assert got[:n] == ref[:n]


def test_padded_batch_greedy_equals_transformers_per_prompt(pair):
    hf, model = pair
    prompts = [[5], [9, 8, 7, 6, 5, 4], [44, 45]]
    batch = generate_batch(model, prompts, SamplingParams(max_new_tokens=15, temperature=0, ignore_eot=True), eot=0)
    for p, c in zip(prompts, batch):
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                          max_new_tokens=15, min_new_tokens=15, return_dict_in_generate=True, output_logits=True,
                          pad_token_id=0)
        n = _trusted_prefix(out.logits)
        assert c.token_ids[:n] == out.sequences[0, len(p):len(p) + n].tolist()


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,num_return", [
    (4, 1.0, False, 2),
    (3, 0.5, True, 3),
    (4, 2.0, "never", 1),
])
def test_beam_search_equals_transformers_beam_search(pair, num_beams, length_penalty, early_stopping, num_return):
    hf, model = pair
    prompt = [12, 40, 7]
    # pick an EOS the model actually produces, so finished hypotheses and early stopping matter
    greedy = generate_batch(model, [prompt], SamplingParams(max_new_tokens=6, temperature=0))[0].token_ids
    eos = greedy[3]
    kw = dict(do_sample=False, num_beams=num_beams, max_new_tokens=12, length_penalty=length_penalty,
              early_stopping=early_stopping, num_return_sequences=num_return, eos_token_id=eos, pad_token_id=eos,
              return_dict_in_generate=True, output_scores=True)
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 3, dtype=torch.long), **kw)
    ours = beam_search(model, prompt, num_beams, 12, length_penalty, early_stopping, [eos], num_return)
    assert len(ours) == num_return
    for i, (seq, score) in enumerate(ours):
        ref = out.sequences[i, 3:].tolist()
        assert seq == ref[: len(seq)]
        assert all(t == eos for t in ref[len(seq):])  # transformers pads with the EOS id
        assert score == pytest.approx(float(out.sequences_scores[i]), abs=1e-4)
    assert any(s[-1] == eos and len(s) < 12 for s, _ in ours) or num_return == 1
