"""The Llama family against transformers' LlamaForCausalLM, on tiny random models that transformers
builds and saves itself.

initializer_range 0.3 (weights), and random norm weights and biases (transformers would start them
at 1 and 0, where a wrong mapping hides), so wrong numerics can't hide under the tolerances. At that
init the logits reach about 12, so the tolerances scale with the reference's magnitude: logits
within 1e-5 * max(1, max|logit|), the loss within 1e-6 * max(1, loss), each gradient within
1e-5 * max(1, max|its gradient|). Measured: 0.0 for gptkit's math backend against transformers'
eager attention, and sdpa against sdpa, except where a projection has 8 outputs (MQA's k and v):
gptkit's stacked q/k/v matmul rounds differently from transformers' separate 8-wide one (1.5e-6),
which two layers grow to 2.6e-5 in logits of magnitude 10.
"""

import copy
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from gptkit import GPT, GPTConfig
from gptkit.config import MODEL_PRESETS, model_preset
from gptkit.errors import GptkitError
from gptkit.formats.hf import llama_state_dict_to_hf, save_hf
from gptkit.loading import load_model

transformers = pytest.importorskip("transformers")

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)
# name -> LlamaConfig overrides; the base is GQA with 8 query heads and 2 key/value heads, untied
CASES = {
    "gqa-untied": dict(),
    "llama3-tied": dict(rope_scaling=LLAMA3, tie_word_embeddings=True, rms_norm_eps=0.05),
    "linear": dict(rope_scaling=dict(rope_type="linear", factor=4.0), rope_theta=500.0),
    "bias-headdim": dict(attention_bias=True, mlp_bias=True, head_dim=16, num_key_value_heads=4, rms_norm_eps=0.02),
    "mqa": dict(num_key_value_heads=1, rope_theta=100000.0),
}


def make_llama(path, initializer_range=0.3, arch="llama", **kw):
    """A tiny random LlamaForCausalLM (or MistralForCausalLM) written by transformers itself."""
    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
               initializer_range=initializer_range, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    cfg.update(copy.deepcopy(kw))  # transformers writes into the rope dicts it is given
    torch.manual_seed(0)
    if arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**cfg))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    with torch.no_grad():  # norms and biases away from 1 and 0, so that their mapping matters
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    model.eval()
    model.save_pretrained(path)
    return model


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def assert_logits_close(a, ref):
    """max |Δ| <= 1e-5, relative to the reference's magnitude where it is above 1 (see the top)."""
    d = max_diff(a, ref)
    assert d <= 1e-5 * max(1.0, ref.abs().max().item()), d


def check_parity(ours: GPT, hf, T: int = 33, seed: int = 1) -> dict:
    """Logits, loss and every gradient of gptkit vs transformers; returns the max |Δ|s, each
    relative to the reference's magnitude (where it is above 1)."""
    torch.manual_seed(seed)
    V = ours.config.vocab_size
    idx = torch.randint(0, V, (3, T + 1))
    x, y = idx[:, :-1], idx[:, 1:]
    ours.zero_grad(), hf.zero_grad()
    logits, loss = ours(x, y)
    ref = hf(x).logits
    ref_loss = torch.nn.functional.cross_entropy(ref.reshape(-1, V), y.reshape(-1))
    loss.backward()
    ref_loss.backward()
    grads = llama_state_dict_to_hf({n: p.grad for n, p in ours.named_parameters()}, ours.config)
    hf_params = dict(hf.named_parameters())
    assert set(grads) == set(hf_params)  # every transformers parameter has its gptkit twin
    scale = lambda t: max(1.0, t.abs().max().item())  # noqa: E731
    out = {"logits": max_diff(logits, ref) / scale(ref), "loss": abs(loss.item() - ref_loss.item()) / scale(ref_loss),
           "grad": max(max_diff(grads[k], p.grad) / scale(p.grad) for k, p in hf_params.items())}
    assert out["logits"] <= 1e-5 and out["loss"] <= 1e-6 and out["grad"] <= 1e-5, out
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """case -> (HF dir, transformers model)."""
    out = {}
    for name, kw in CASES.items():
        d = tmp_path_factory.mktemp("llama") / name
        out[name] = d, make_llama(d, **kw)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_logits_loss_and_every_gradient_match_transformers(pairs, case):
    d, hf = pairs[case]
    ours = load_model(d).model.train()
    hf.train()  # dropout is 0 on both sides; train() only turns autograd bookkeeping on
    hf_sdpa = transformers.LlamaForCausalLM.from_pretrained(d, attn_implementation="sdpa")
    check_parity(ours, hf_sdpa)
    math = GPT(ours.config.replace(attention="math"))  # the reference backend against eager attention
    math.load_state_dict(ours.state_dict())
    check_parity(math, hf)


def test_the_config_maps_every_llama_choice(pairs):
    c = load_model(pairs["bias-headdim"][0]).model.config
    assert (c.family, c.n_head, c.kv_heads, c.head_size, c.mlp_size) == ("llama", 8, 4, 16, 96)
    assert c.attention_bias and c.mlp_bias and not c.tie_embeddings and c.norm_eps == 0.02
    c = load_model(pairs["llama3-tied"][0]).model.config
    assert c.tie_embeddings and c.rope == LLAMA3
    c = load_model(pairs["linear"][0]).model.config
    assert c.rope == {"rope_type": "linear", "factor": 4.0} and c.rope_theta == 500.0


def test_num_params_counts_unique_parameters_like_transformers(pairs):
    for d, hf in pairs.values():
        assert load_model(d).model.num_params() == sum(p.numel() for p in hf.parameters())


def test_classic_rope_keys_load_like_rope_parameters(pairs, tmp_path):
    """transformers 5 saves rope_parameters; configs written by transformers 4 (and most hub
    repos) carry rope_theta + rope_scaling instead. Both give the same model."""
    src, hf = pairs["llama3-tied"]
    d = tmp_path / "classic"
    d.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in rp.items()}  # the oldest spelling
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").symlink_to(src / "model.safetensors")
    m = load_model(d).model
    assert m.config == load_model(src).model.config
    x = torch.randint(0, 300, (2, 20))
    assert_logits_close(m(x), hf(x).logits)


def test_dynamic_ntk_rope_grows_past_max_position_embeddings_as_transformers_does(tmp_path):
    hf = make_llama(tmp_path / "dyn", rope_scaling=dict(rope_type="dynamic", factor=2.0), max_position_embeddings=16)
    m = load_model(tmp_path / "dyn").model
    assert m.config.block_size == 16
    long = GPT(m.config.replace(block_size=64))  # a context past the trained one: the base grows with it
    long.load_state_dict(m.state_dict())
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert_logits_close(long(x), hf(x).logits)
        assert_logits_close(long(x[:, :12]), hf(x[:, :12]).logits)  # within 16 positions: plain RoPE
        assert max_diff(long(x)[:, :12], long(x[:, :12])) > 1e-3  # the growth is real


def test_mistral_without_sliding_window_loads_as_llama(tmp_path):
    hf = make_llama(tmp_path / "mistral", arch="mistral", sliding_window=None)
    m = load_model(tmp_path / "mistral").model
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert_logits_close(m(x), hf(x).logits)


def _trusted_prefix(scores) -> int:
    """Leading steps whose top-2 logit margin is > 1e-4 (past a near-tie either choice is right)."""
    n = 0
    for s in scores:
        top2 = torch.topk(s[0].float(), 2).values
        if float(top2[0] - top2[1]) <= 1e-4:
            break
        n += 1
    return n


@pytest.mark.parametrize("case", ["gqa-untied", "llama3-tied"])
def test_greedy_generation_equals_transformers_token_for_token(pairs, case):
    from gptkit.generate import SamplingParams, generate_batch

    d, hf = pairs[case]
    model = load_model(d).model
    prompts = [[5, 17, 3], [100, 2, 250, 31, 7, 7, 9], [44]]
    # one padded batch (RoPE positions per row, a KV cache at 2 key/value heads) against one call per prompt
    ours = generate_batch(model, prompts, SamplingParams(max_new_tokens=20, temperature=0, ignore_eot=True), eot=0)
    for p, c in zip(prompts, ours):
        out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                          max_new_tokens=20, min_new_tokens=20, return_dict_in_generate=True, output_logits=True,
                          pad_token_id=0)
        n = _trusted_prefix(out.logits)
        assert n >= 10, "too many near-ties for a meaningful comparison"
        assert c.token_ids[:n] == out.sequences[0, len(p):len(p) + n].tolist()


def test_beam_search_equals_transformers_beam_search(pairs):
    from gptkit.beam import beam_search
    from gptkit.generate import SamplingParams, generate_batch

    d, hf = pairs["gqa-untied"]
    model = load_model(d).model
    prompt = [12, 40, 7]
    eos = generate_batch(model, [prompt], SamplingParams(max_new_tokens=6, temperature=0))[0].token_ids[3]
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 3, dtype=torch.long), do_sample=False,
                      num_beams=4, max_new_tokens=12, num_return_sequences=2, eos_token_id=eos, pad_token_id=eos,
                      return_dict_in_generate=True, output_scores=True)
    ours = beam_search(model, prompt, 4, 12, 1.0, False, [eos], 2)
    for i, (seq, score) in enumerate(ours):
        ref = out.sequences[i, 3:].tolist()
        assert seq == ref[: len(seq)] and all(t == eos for t in ref[len(seq):])
        assert score == pytest.approx(float(out.sequences_scores[i]), abs=1e-4)


def test_kv_cache_holds_only_the_key_value_heads():
    from gptkit.model import KVCache

    c = model_preset("llama-tiny")
    assert KVCache(c, 3, 10).k.shape == (2, 3, 2, 10, 16)  # (L, B, nkv, T, hs)


# ------------------------------------------------------------------------------------------------
# a wrong op must fail the parity checks
def test_a_wrong_rope_sign_or_eps_fails_the_parity_check(pairs, monkeypatch):
    import gptkit.model as gm

    d, hf = pairs["llama3-tied"]
    right = gm.apply_rope

    def wrong_sign(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((x2, -x1), dim=-1) * sin

    monkeypatch.setattr(gm, "apply_rope", wrong_sign)
    with pytest.raises(AssertionError):
        check_parity(load_model(d).model, hf)
    monkeypatch.setattr(gm, "apply_rope", right)
    m = load_model(d).model
    bad = GPT(m.config.replace(norm_eps=1e-5))  # transformers' config says 0.05
    bad.load_state_dict(m.state_dict())
    with pytest.raises(AssertionError):
        check_parity(bad, hf)
    check_parity(m, hf)


# ------------------------------------------------------------------------------------------------
# export, shards
def test_export_writes_a_llama_dir_transformers_loads_with_equal_logits(pairs, tmp_path):
    for case in ("gqa-untied", "llama3-tied", "bias-headdim"):
        m = load_model(pairs[case][0]).model
        out = tmp_path / case
        files = save_hf(m, out)
        assert [f.name for f in files] == ["config.json", "model.safetensors"]
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        assert type(hf).__name__ == "LlamaForCausalLM"
        x = torch.randint(0, 300, (2, 30))
        with torch.no_grad():
            assert_logits_close(m(x), hf(x).logits)
        assert load_model(out).model.config == m.config


def test_export_shards_above_max_shard_size_and_both_sides_read_them(pairs, tmp_path):
    m = load_model(pairs["gqa-untied"][0]).model
    files = save_hf(m, tmp_path / "sharded", max_shard_size=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {f.name for f in files} == {"config.json", "model.safetensors.index.json", *shards}
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "sharded", attn_implementation="eager").eval()
    back = load_model(tmp_path / "sharded").model
    x = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        assert_logits_close(m(x), hf(x).logits)
        assert torch.equal(back(x), m(x))


def test_sharded_dir_saved_by_transformers_loads(pairs, tmp_path):
    _, hf = pairs["bias-headdim"]
    hf.save_pretrained(tmp_path / "hf-sharded", max_shard_size="30KB")
    assert (tmp_path / "hf-sharded" / "model.safetensors.index.json").is_file()
    m = GPT.from_pretrained(str(tmp_path / "hf-sharded"))
    x = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        assert_logits_close(m(x), hf(x).logits)


# ------------------------------------------------------------------------------------------------
# bad input: one error line each
def _broken_config(src, dst, **changes):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    return dst


def test_missing_shard_is_an_error_naming_the_shard(pairs, tmp_path):
    m = load_model(pairs["gqa-untied"][0]).model
    files = save_hf(m, tmp_path / "s", max_shard_size=40_000)
    gone = sorted(f for f in files if f.name.startswith("model-"))[1]
    gone.unlink()
    with pytest.raises(GptkitError, match=f"missing shard {gone.name} \\(named by model.safetensors.index.json\\)") as e:
        load_model(tmp_path / "s")
    assert e.value.line().startswith("error: ") and "\n" not in e.value.line()


def test_unknown_rope_type_is_one_error_line(pairs, tmp_path):
    src = pairs["gqa-untied"][0]
    d = _broken_config(src, tmp_path / "yarn", rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                 "rope_theta": 10000.0})
    with pytest.raises(GptkitError, match="unknown rope_type 'yarn'"):
        load_model(d)
    r = subprocess.run([sys.executable, "-m", "gptkit", "sample", "--model", str(d), "--max-new-tokens", "2"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown rope_type 'yarn'") and "Traceback" not in r.stderr
    assert str(d / "config.json") in r.stderr


def test_heads_not_divisible_by_kv_heads_is_one_error_line(pairs, tmp_path):
    d = _broken_config(pairs["gqa-untied"][0], tmp_path / "gqa3", num_key_value_heads=3)
    with pytest.raises(GptkitError, match="num_attention_heads 8 is not divisible by num_key_value_heads 3") as e:
        load_model(d)
    assert "config.json" in e.value.line()
    with pytest.raises(GptkitError, match="n_head=8 is not divisible by n_kv_head=3"):
        GPTConfig(family="llama", n_head=8, n_kv_head=3, n_embd=64)


def test_bad_rope_scaling_values_and_gpt2_misuse_name_the_field():
    with pytest.raises(GptkitError, match="needs a positive number 'factor'"):
        GPTConfig(family="llama", rope_scaling={"rope_type": "linear"})
    with pytest.raises(GptkitError, match="unknown rope_type"):
        GPTConfig(family="llama", rope_scaling='{"rope_type": "longrope"}')
    with pytest.raises(GptkitError, match="n_kv_head=4 is not GPT-2's architecture"):
        GPTConfig(n_kv_head=4)


# ------------------------------------------------------------------------------------------------
# config and presets
def test_config_round_trips_and_stays_hashable():
    c = model_preset("llama-3.2-1b")
    assert GPTConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert hash(c) == hash(GPTConfig.from_dict(c.to_dict()))
    assert c.rope["rope_type"] == "llama3" and isinstance(c.rope_scaling, str)
    old = {k: v for k, v in model_preset("gpt2").to_dict().items()
           if k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "attention")}
    assert GPTConfig.from_dict(old) == model_preset("gpt2")  # an old checkpoint's config still loads


# published parameter counts (tied embeddings counted once)
PRESET_PARAMS = {"tinyllama-1.1b": 1_100_048_384, "smollm2-135m": 134_515_008, "smollm2-360m": 361_821_120,
                 "llama-3.2-1b": 1_235_814_400}


@pytest.mark.parametrize("name", list(PRESET_PARAMS))
def test_llama_presets_have_the_published_parameter_counts(name):
    from gptkit.formats.hf import config_to_hf

    with torch.device("meta"):
        m = GPT(model_preset(name))
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(m.config)))
    assert m.num_params() == PRESET_PARAMS[name] == sum(p.numel() for p in hf.parameters())


def test_small_llama_presets_train_a_step_on_the_cpu():
    for name in ("llama-tiny", "llama-char"):
        torch.manual_seed(0)
        m = GPT(model_preset(name))
        x, y = torch.randint(0, m.config.vocab_size, (2, 2, 32))
        _, loss = m(x, y)
        loss.backward()
        assert abs(loss.item() - torch.log(torch.tensor(m.config.vocab_size * 1.0)).item()) < 0.5
    assert abs(GPT(model_preset("llama-char")).num_params() - GPT(model_preset("shakespeare-char")).num_params()) \
        < 0.1 * GPT(model_preset("shakespeare-char")).num_params()
    assert set(MODEL_PRESETS) >= {"llama-tiny", "llama-char", "smollm2-135m-instruct"}


# ------------------------------------------------------------------------------------------------
# pretrained names through huggingface_hub, against test_hub's 127.0.0.1 imitation of the hub
@pytest.fixture
def llama_hub(monkeypatch, tmp_path, pairs):
    import huggingface_hub.constants as hc

    from test_hub import FakeHub, repo_files

    _, hf = pairs["gqa-untied"]
    d = tmp_path / "served"
    hf.save_pretrained(d, max_shard_size="40KB")  # a sharded repo, as the real ones above 5GB are
    (d / "tokenizer_config.json").write_text("{}")
    files = repo_files(d)
    shards = sorted(set(json.loads(files["model.safetensors.index.json"])["weight_map"].values()))
    assert len(shards) > 2
    server = FakeHub({"HuggingFaceTB/SmolLM2-135M": files,
                      "TinyLlama/TinyLlama-1.1B-Chat-v1.0": {k: v for k, v in files.items() if k != shards[1]}})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)  # huggingface_hub read the conftest's value at import
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield server, hf, shards
    server.close()


def test_llama_names_resolve_to_their_hub_repos():
    from gptkit.formats.hub import repo_id

    assert repo_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M"
    assert repo_id("llama-3.2-1b-instruct") == "meta-llama/Llama-3.2-1B-Instruct"
    assert repo_id("TinyLlama/TinyLlama-1.1B-Chat-v1.0") == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    from gptkit.formats.hub import REPOS

    assert set(REPOS) - {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"} <= set(MODEL_PRESETS)


def test_a_pretrained_llama_name_downloads_every_shard_and_loads(llama_hub):
    server, hf, shards = llama_hub
    m = GPT.from_pretrained("smollm2-135m")
    assert all(server.fetched(n) for n in shards) and server.fetched("tokenizer_config.json")
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert_logits_close(m(x), hf(x).logits)


def test_a_shard_missing_on_the_hub_is_named(llama_hub):
    shard = llama_hub[2][1]
    with pytest.raises(GptkitError, match=f"missing shard {shard} \\(named by"):
        load_model("tinyllama-1.1b-chat")


def test_checkpoint_round_trip_keeps_an_untied_head(pairs, tmp_path):
    from gptkit.checkpoint import save_checkpoint
    from gptkit.loading import load_checkpoint_model

    for case in ("gqa-untied", "llama3-tied"):
        m = load_model(pairs[case][0]).model
        ckpt = save_checkpoint(tmp_path / case, 7, m, {"model_config": m.config.to_dict()})
        back = load_checkpoint_model(ckpt).model
        assert back.config == m.config
        assert (back.lm_head.weight is back.transformer.wte.weight) == m.config.tie_embeddings
        x = torch.randint(0, 300, (2, 20))
        with torch.no_grad():
            assert torch.equal(back(x), m(x))


def test_convert_writes_hf_and_refuses_llmc_for_a_llama(pairs, tmp_path):
    from gptkit.convert import convert

    src, hf = pairs["gqa-untied"]
    res = convert(src, tmp_path / "out", "hf")
    assert {f.name for f in res.files} >= {"config.json", "model.safetensors"}
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert_logits_close(back(x).logits, hf(x).logits)
    with pytest.raises(GptkitError, match="llm.c's model.bin holds GPT-2 only, not a llama model"):
        convert(src, tmp_path / "llmc", "llmc")


def test_gqa_runs_unchanged_through_the_attention_backends(pairs):
    """k and v are expanded to the query heads before `attend`, so each backend sees plain MHA."""
    m = load_model(pairs["gqa-untied"][0]).model
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ref = m(x)
        for backend in ("math", "flash"):  # triton needs a GPU
            other = GPT(m.config.replace(attention=backend, block_q=16, block_k=16))
            other.load_state_dict(m.state_dict())
            assert_logits_close(other(x), ref)
