"""The optimizer against torch.optim.AdamW."""

import pytest
import torch

from gptkit.config import GPTConfig
from gptkit.model import GPT
from gptkit.optim import LowPrecisionAdamW, make_adamw


def _steps(opt, model, n=6):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        x = torch.randint(0, 50, (2, 8), generator=g)
        _, loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("state_dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 5e-2)])
def test_low_precision_adamw_follows_torch_adamw(state_dtype, tol):
    """With fp32 moments LowPrecisionAdamW is torch.optim.AdamW (bias corrections, decoupled decay);
    with bf16 moments it stays close."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50)
    ref, ours = GPT(cfg), GPT(cfg)
    ours.load_state_dict(ref.state_dict())
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    _steps(torch.optim.AdamW(ref.parameters(), **kw), ref)
    _steps(LowPrecisionAdamW(ours.parameters(), state_dtype=state_dtype, **kw), ours)
    moved = max((p - q).abs().max().item() for p, q in zip(ref.parameters(), GPT(cfg).parameters()))
    err = max((p - q).abs().max().item() for p, q in zip(ref.parameters(), ours.parameters()))
    assert moved > 1e-2  # the steps did move the weights
    assert err <= tol * moved, (err, moved)


def test_make_adamw_decays_matrices_only_and_names_every_parameter():
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    opt, names = make_adamw(m, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sorted(names.values()) == sorted(n for n, _ in m.named_parameters())
    opt16, _ = make_adamw(m, lr=1e-3, weight_decay=0.1, state_dtype=torch.bfloat16)
    assert isinstance(opt16, LowPrecisionAdamW)
