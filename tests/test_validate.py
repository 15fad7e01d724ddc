"""`gptkit validate` (llm.c's test_gpt2) against debug states computed by transformers.

The reference state is what llm.c's train_gpt2.py writes, computed here by a transformers model:
logits, loss and gradients on a batch, gradients mapped to llm.c's (out, in) layout with wte's
padded to Vp. The 10 reference losses come from transformers + torch.optim.AdamW.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from gptkit.formats import llmc
from gptkit.formats.hf import state_dict_from_hf
from gptkit.validate import validate

B, T, V = 2, 16, 320


def batch():
    g = torch.Generator().manual_seed(42)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def hf_loss(hf_model, x, y):
    logits = hf_model(x).logits  # (B, T, V); llm.c's y is already the next token, no shift
    return logits, F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))


def write_reference_state(hf_model, path):
    """The debug state of a transformers model, in llm.c's layout."""
    from gptkit.loading import load_model  # only for the config of the saved model

    x, y = batch()
    hf_model.zero_grad()
    logits, loss = hf_loss(hf_model, x, y)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in hf_model.named_parameters()}
    config = load_model(path.parent / "hf-tiny").model.config
    st = llmc.DebugState(x, y, logits.detach(), loss.detach(), state_dict_from_hf(grads, config))
    llmc.write_state(path, st, config)
    return st, config


@pytest.fixture
def reference(hf_tiny, tmp_path):
    d, hf_model = hf_tiny
    hf_model.train(False)
    state = tmp_path / "debug_state.bin"
    st, config = write_reference_state(hf_model, state)
    return d, hf_model, state, st, config


def test_validate_passes_on_a_transformers_debug_state(reference):
    d, _, state, _, _ = reference
    lines = []
    res = validate(d, state, steps=2, log=lines.append)
    assert res.ok and not res.failed
    assert res.logits_diff < 1e-5 and res.loss_diff < 1e-6 and max(res.grad_diffs.values()) < 1e-5
    assert list(res.grad_diffs) == ["wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
                                    "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb"]
    assert any(line.startswith("grad fcprojw") for line in lines)


@pytest.mark.parametrize("what", ["logits", "loss", "grad"])
def test_validate_fails_on_a_perturbed_state(reference, tmp_path, what):
    d, _, _, st, config = reference
    if what == "logits":
        st.logits[0, 3, 7] += 0.05
    elif what == "loss":
        st.loss += 0.05
    else:
        st.grads["transformer.h.1.attn.c_proj.weight"][2, 3] += 0.05
    bad = tmp_path / "perturbed.bin"
    llmc.write_state(bad, st, config)
    res = validate(d, bad, steps=1, log=lambda s: None)
    assert not res.ok
    assert res.failed == {"logits": ["logits"], "loss": ["loss"], "grad": ["dattprojw"]}[what]


def test_ten_losses_agree_with_transformers_and_torch_adamw(reference):
    d, hf_model, state, _, _ = reference
    res = validate(d, state, steps=10, log=lambda s: None)
    # independent run: transformers + torch.optim.AdamW, weight decay on every parameter
    x, y = batch()
    opt = torch.optim.AdamW(hf_model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    expected = []
    for _ in range(10):
        opt.zero_grad()
        _, loss = hf_loss(hf_model, x, y)
        loss.backward()
        opt.step()
        expected.append(loss.item())
    assert len(res.losses) == 10 and res.losses[0] == pytest.approx(expected[0], abs=1e-6)
    assert max(abs(a - b) for a, b in zip(res.losses, expected)) < 1e-5
    assert expected[-1] < expected[0] - 1e-3  # the steps did move the model


def test_gptkit_writes_the_state_transformers_computes(reference, tmp_path):
    """gptkit's debug state is judged against the one computed by transformers, not by gptkit."""
    from gptkit.loading import load_model
    from gptkit.validate import write_debug_state

    d, _, _, ref, config = reference
    x, y = batch()
    write_debug_state(load_model(d).model, x, y, tmp_path / "ours.bin")
    ours = llmc.read_state(tmp_path / "ours.bin", config)
    assert torch.equal(ours.x, ref.x) and torch.equal(ours.y, ref.y)
    assert (ours.logits - ref.logits).abs().max() <= 1e-5
    assert abs(ours.loss.item() - ref.loss.item()) <= 1e-6
    assert len(ours.grads) == len(dict(load_model(d).model.named_parameters()))  # every parameter, per layer
    for k in ours.grads:
        assert (ours.grads[k] - ref.grads[k]).abs().max() <= 1e-5, k


def test_cli_exit_codes_and_step_lines(reference, tmp_path):
    d, _, state, st, config = reference
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "gptkit", "validate", "--model", d, "--debug-state", state,
                        "--steps", "3"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = re.findall(r"^step (\d+): loss (\d+\.\d{6})$", r.stdout, re.M)
    assert [int(s) for s, _ in steps] == [0, 1, 2]
    assert float(steps[0][1]) == pytest.approx(st.loss.item(), abs=1e-6)
    st.grads["transformer.wte.weight"][5, 0] += 1.0
    llmc.write_state(tmp_path / "bad.bin", st, config)
    r = subprocess.run([sys.executable, "-m", "gptkit", "validate", "--model", d, "--debug-state",
                        tmp_path / "bad.bin", "--steps", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "FAILED: dwte" in r.stdout
    (tmp_path / "short.bin").write_bytes((tmp_path / "bad.bin").read_bytes()[:2000])
    r = subprocess.run([sys.executable, "-m", "gptkit", "validate", "--model", d, "--debug-state",
                        tmp_path / "short.bin"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: truncated debug state")
