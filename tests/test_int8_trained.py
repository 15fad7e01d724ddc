"""int8 weight-only (per-channel scales through torch._weight_int8pack_mm) keeps a *trained* model's
quality: logits within a relative error bound of fp32 and val perplexity within 1%. Random weights
give near-tied logits, so only a trained model says whether int8 keeps quality."""

import math

import pytest
import torch

from gptkit.config import GPTConfig
from gptkit.model import GPT
from gptkit.quantize import quantize_for_inference


@pytest.mark.slow  # ~10 s idle: 150 training steps of a tiny char model
def test_int8_keeps_a_trained_models_logits_and_perplexity(shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")[:40000]
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    tr, va = data[:36000], data[36000:]
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=len(chars), n_layer=2, n_head=2, n_embd=64))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(150):
        i = torch.randint(0, len(tr) - 33, (16,)).tolist()
        x = torch.stack([tr[j:j + 32] for j in i])
        y = torch.stack([tr[j + 1:j + 33] for j in i])
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    xv, yv = va[:32 * 120].view(120, 32), va[1:32 * 120 + 1].view(120, 32)
    with torch.no_grad():
        logits32, loss32 = m(xv, yv)
        q = quantize_for_inference(m, "int8")
        logits8, loss8 = q(xv, yv)
    assert math.exp(loss32) < 20  # it learned something (uniform would be ~len(chars))
    assert (logits8 - logits32).norm() / logits32.norm() < 0.02  # measured 0.003
    assert abs(math.exp(loss8) / math.exp(loss32) - 1) < 0.01  # measured 1.0002
