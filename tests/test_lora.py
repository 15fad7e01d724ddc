"""LoRA against PEFT as the reference: forward logits, gradients, merge, and the PEFT export."""

import json

import pytest
import torch

from gptkit import GPT, GPTConfig
from gptkit.errors import GptkitError
from gptkit.formats.hf import save_hf
from gptkit.formats.peft import hf_module_path, write_peft
from gptkit.lora import (LoraSpec, adapter_tensors, apply_lora, family_of, freeze_base, lora_layers, merge_lora,
                         parse_targets, set_merged)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=97, block_size=16)
LLAMA = GPTConfig(family="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48, vocab_size=97,
                  block_size=16)
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def _peft_layers(ours, pm):
    """(gptkit LoRALinear, target, PEFT's LoRA layer of the same adapter) for every adapter."""
    fam = family_of(ours)
    for path, m in lora_layers(ours).items():
        for t in m.slices:
            yield m, t, pm.base_model.model.get_submodule(hf_module_path(path, t, fam))


def _pair(tmp_path, targets=("c_attn",), rank=4, alpha=8.0, cfg=CFG):
    """A random gptkit model with LoRA, and PEFT's LoRA on transformers' copy of the same base, sharing
    A and B (B random, so that A's gradient is not zero)."""
    torch.manual_seed(0)
    base = GPT(cfg)
    save_hf(base, tmp_path / "hf")
    hf = getattr(transformers, HF_CLASS[cfg.family]).from_pretrained(tmp_path / "hf").float()
    spec = LoraSpec(rank, alpha, 0.0, targets)
    apply_lora(base, spec)
    freeze_base(base)
    for m in lora_layers(base).values():
        for b in m.lora_B.values():
            torch.nn.init.normal_(b, std=0.05)
    # HF GPT-2's Conv1D stores (in, out): fan_in_fan_out
    pcfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets),
                           fan_in_fan_out=cfg.family == "gpt2")
    pm = peft.get_peft_model(hf, pcfg)
    with torch.no_grad():
        for m, t, pl in _peft_layers(base, pm):
            pl.lora_A["default"].weight.copy_(m.lora_A[t])
            pl.lora_B["default"].weight.copy_(m.lora_B[t])
    return base, pm


@pytest.mark.parametrize("cfg,targets,n_adapters", [
    (CFG, ("c_attn",), 1), (CFG, ("c_attn", "c_proj", "c_fc"), 4),  # c_proj: attention and MLP
    (LLAMA, ("q_proj", "v_proj"), 2),
    (LLAMA, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 7),
], ids=["gpt2-default", "gpt2-all", "llama-default", "llama-all"])
def test_lora_logits_and_gradients_equal_peft(tmp_path, cfg, targets, n_adapters):
    ours, theirs = _pair(tmp_path, targets, cfg=cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    logits = ours(idx)
    out = theirs(input_ids=idx)
    assert (logits - out.logits).abs().max() < 1e-5
    # one common loss for both: a fixed random projection of the logits
    g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (logits * g).sum().backward()
    (out.logits * g).sum().backward()
    pairs = list(_peft_layers(ours, theirs))
    assert len(pairs) == n_adapters * cfg.n_layer
    for m, t, pl in pairs:
        assert (m.lora_A[t].grad - pl.lora_A["default"].weight.grad).abs().max() < 1e-5
        assert (m.lora_B[t].grad - pl.lora_B["default"].weight.grad).abs().max() < 1e-5
        assert m.lora_A[t].grad.abs().max() > 0
    # the base is frozen: no gradient reaches it
    assert all(p.grad is None for k, p in ours.named_parameters() if "lora_" not in k)


def test_peft_files_load_in_peft_with_equal_logits_for_both_families(tmp_path):
    for cfg, targets in ((CFG, ("c_attn", "c_fc")), (LLAMA, ("q_proj", "v_proj", "down_proj"))):
        d = tmp_path / cfg.family
        ours, _ = _pair(d, targets, cfg=cfg)
        write_peft(ours, adapter_tensors(ours), LoraSpec(4, 8.0, 0.0, targets), "base", d / "adapters")
        hf = getattr(transformers, HF_CLASS[cfg.family]).from_pretrained(d / "hf").float()
        pm = peft.PeftModel.from_pretrained(hf, d / "adapters").eval()
        idx = torch.randint(0, cfg.vocab_size, (2, 10))
        with torch.no_grad():
            assert (ours(idx) - pm(input_ids=idx).logits).abs().max() < 1e-5


@pytest.mark.parametrize("cfg,targets", [(CFG, ("c_attn", "c_proj")), (LLAMA, ("q_proj", "k_proj", "up_proj"))],
                         ids=["gpt2", "llama"])
def test_merged_equals_unmerged_and_merge_lora_gives_a_pure_model(tmp_path, cfg, targets):
    ours, _ = _pair(tmp_path, targets, cfg=cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        ref = ours(idx)
        set_merged(ours, True)
        merged = ours(idx)
        set_merged(ours, False)
        again = ours(idx)
        merge_lora(ours)
        pure = ours(idx)
    assert (ref - merged).abs().max() < 1e-5
    assert (ref - again).abs().max() < 1e-5
    assert (ref - pure).abs().max() < 1e-5
    assert not lora_layers(ours) and all("lora_" not in k for k in ours.state_dict())


def test_lora_keeps_base_parameter_names():
    m = GPT(CFG)
    names = set(m.state_dict())
    apply_lora(m, LoraSpec(2, 4.0, 0.0, ("c_attn", "c_fc")))
    new = set(m.state_dict())
    assert names <= new
    assert new - names == set(adapter_tensors(m))
    assert freeze_base(m) == CFG.n_layer * (2 * (32 + 96) + 2 * (32 + 128))


def test_default_targets_follow_peft_and_unknown_target_is_an_error():
    m = GPT(CFG)
    assert parse_targets("", m) == ("c_attn",)
    assert parse_targets("c_attn, c_fc", m) == ("c_attn", "c_fc")
    with pytest.raises(GptkitError, match="unknown LoRA target module 'q_proj'") as e:
        parse_targets("q_proj", m)
    assert e.value.where == "lora_targets"
    llama = GPT(LLAMA)
    assert parse_targets("", llama) == ("q_proj", "v_proj")
    with pytest.raises(GptkitError, match="unknown LoRA target module 'c_attn' for a llama model"):
        parse_targets("c_attn", llama)
