"""The model against transformers' GPT2LMHeadModel on tiny random models that transformers saves."""

import pytest
import torch

from conftest import make_hf_model
from gptkit import GPT, GPTConfig
from gptkit.config import model_preset


def _pair(tmp_path, **kw):
    d = tmp_path / "hf"
    hf = make_hf_model(d, **kw)
    return hf, GPT.from_pretrained(str(d))


def test_logits_loss_and_grads_match_transformers(tmp_path):
    hf, m = _pair(tmp_path)
    m.eval(), hf.eval()  # transformers' default config has dropout 0.1; compare without it
    torch.manual_seed(1)
    idx = torch.randint(0, 320, (3, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    out = hf(x)
    logits, loss = m(x, y)
    hf_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 320), y.reshape(-1))
    assert (logits - out.logits).abs().max().item() <= 1e-5
    assert abs(loss.item() - hf_loss.item()) <= 1e-6
    loss.backward()
    hf_loss.backward()
    hf_params = dict(hf.named_parameters())
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    checked = 0
    for name, p in m.named_parameters():
        hp = hf_params[name]
        g_ref = hp.grad.t() if name.endswith(transposed) else hp.grad
        g = p.grad[: g_ref.shape[0]] if name == "transformer.wte.weight" else p.grad
        assert (g - g_ref).abs().max().item() <= 1e-5, name
        checked += 1
    assert checked == len(hf_params)  # every HF parameter has its gptkit twin (tied lm_head counted once)


def test_padding_rows_of_the_embedding_get_no_gradient(tmp_path):
    _, m = _pair(tmp_path)
    assert m.config.padded_vocab_size == 384 and m.transformer.wte.weight.shape[0] == 384
    _, loss = m(torch.randint(0, 320, (2, 8)), torch.randint(0, 320, (2, 8)))
    loss.backward()
    assert m.transformer.wte.weight.grad[320:].abs().max() == 0
    assert torch.all(m.transformer.wte.weight[320:] == 0)


def test_logits_cover_the_real_vocab_only():
    m = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=50))
    assert m(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 50)


def test_gpt2_presets_have_openai_parameter_counts():
    with torch.device("meta"):
        assert GPT(model_preset("gpt2")).num_params() == 124_439_808
        assert GPT(model_preset("gpt2")).config.padded_vocab_size == 50304
        assert GPT(model_preset("gpt2-medium")).num_params() == 354_823_168
        assert GPT(model_preset("gpt2-large")).num_params() == 774_030_080
        assert GPT(model_preset("gpt2-xl")).num_params() == 1_557_611_200


def test_lm_head_is_tied_to_wte():
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=50))
    assert m.lm_head.weight is m.transformer.wte.weight


def test_from_pretrained_reads_pytorch_model_bin_without_pickle(tmp_path):
    d = tmp_path / "hfbin"
    hf = make_hf_model(d)
    (d / "model.safetensors").unlink()
    torch.save({k: v.clone() for k, v in hf.state_dict().items()}, d / "pytorch_model.bin")
    m = GPT.from_pretrained(str(d))
    idx = torch.randint(0, 320, (1, 10))
    assert (m(idx) - hf(idx).logits).abs().max() <= 1e-5


def test_a_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65))
    x = torch.randint(0, 65, (4, 16))
    y = torch.randint(0, 65, (4, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(100):
        _, loss = m(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize("field,value", [("n_layer", 0), ("n_head", -1), ("n_embd", 30), ("attention", "nope")])
def test_invalid_model_config_fails_naming_the_field(field, value):
    from gptkit.errors import GptkitError

    kw = dict(n_layer=2, n_head=4, n_embd=32)
    kw[field] = value
    with pytest.raises(GptkitError) as e:
        GPTConfig(**kw)
    assert field in str(e.value)


def test_init_scales_residual_projections_as_transformers_does():
    """N(0, 0.02) weights, N(0, 0.02/sqrt(2L)) for the residual projections (attn.c_proj, mlp.c_proj):
    the standard deviations of gptkit's init equal those of transformers' GPT2 init."""
    transformers = pytest.importorskip("transformers")
    L, C = 6, 128
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=L, n_head=4, n_embd=C, n_positions=64,
                                                               vocab_size=512, initializer_range=0.02))
    m = GPT(GPTConfig(n_layer=L, n_head=4, n_embd=C, block_size=64, vocab_size=512))
    hf_params = dict(hf.named_parameters())
    checked = 0
    for name, p in m.named_parameters():
        if not name.endswith(".weight") or "ln_" in name:
            continue
        ours = p[:512].std().item() if name == "transformer.wte.weight" else p.std().item()
        ref = hf_params[name].std().item()
        assert ours == pytest.approx(ref, rel=0.05), name
        checked += 1
    assert checked == 2 + 4 * L
    proj = m.transformer.h[0].mlp.c_proj.weight.std().item()
    assert proj == pytest.approx(0.02 / (2 * L) ** 0.5, rel=0.05)


def test_embedding_dropout_drops_the_sum_of_token_and_position_embeddings():
    """In training mode the first block sees dropout(wte + wpe), zeros at rate p, survivors scaled 1/(1-p)."""
    p = 0.5
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=64, vocab_size=50, dropout=p))
    seen = []
    m.transformer.h[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    idx = torch.randint(0, 50, (4, 64))
    clean = m.transformer.wte(idx) + m.transformer.wpe(torch.arange(64))
    m.train()
    m(idx)
    x = seen[-1]
    zero = x == 0
    assert abs(zero.float().mean().item() - p) < 0.03
    torch.testing.assert_close(x[~zero], clean[~zero] / (1 - p))
    m.eval()
    m(idx)
    torch.testing.assert_close(seen[-1], clean)


def test_fresh_model_has_zero_padding_rows():
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=50))
    assert m.config.padded_vocab_size == 128
    assert torch.all(m.transformer.wte.weight[50:] == 0) and torch.all(m.transformer.wte.weight[:50] != 0)
    # an untied head (Llama family) has two tables: both pad with zero rows, each on its own
    u = GPT(GPTConfig(family="llama", n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=50,
                      tie_embeddings=False))
    for w in (u.transformer.wte.weight, u.lm_head.weight):
        assert torch.all(w[50:] == 0) and torch.all(w[:50].abs().sum(1) > 0)


def test_kv_cache_forward_equals_the_full_forward():
    """Prefill 5 tokens, then feed 3 one at a time through the cache: the logits of every position
    equal one full forward over the 8 tokens, and the cache has advanced by 8."""
    from gptkit.model import KVCache

    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=40)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    idx = torch.randint(0, 40, (2, 8))
    full = m(idx)
    cache = KVCache(m.config, batch_size=2)
    steps = [m(idx[:, :5], cache=cache)] + [m(idx[:, t:t + 1], cache=cache) for t in range(5, 8)]
    assert cache.pos == 8
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_loss_ignores_targets_of_minus_one():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    x = torch.randint(0, 50, (2, 8))
    y = torch.randint(0, 50, (2, 8))
    y[0, :3] = -1
    y[1, 5:] = -1
    logits, loss = m(x, y)
    keep = y != -1
    ref = torch.nn.functional.cross_entropy(logits[keep], y[keep])  # only the kept positions
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
