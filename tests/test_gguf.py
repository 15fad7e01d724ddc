"""GGUF (llama.cpp's format) both ways, against independent references:
- GGUF files written here with the `gguf` package itself (its GGUFWriter, its quantizers and its own
  HF -> llama.cpp tensor-name map, gguf.get_tensor_name_map) from random models that transformers
  builds, and gptkit's own export; each loads in gptkit with logits within 1e-4 of transformers
  loading the same file (`gguf_file=`, its own dequantizers), tokens equal to transformers' GGUF
  tokenizer, and the same chat template;
- the export reads back with gguf.GGUFReader (architecture, names, shapes, values);
- round trips gptkit -> GGUF -> gptkit (F32 exact, Q8_0 equal to gguf's quantize/dequantize);
- bad input: one error line each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gptkit.cli import main
from gptkit.errors import GptkitError
from gptkit.formats import gguf as G
from gptkit.loading import load_model

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

QT = gguf.GGMLQuantizationType
HELD_OUT = ("Héllo wörld! Ça va? 你好，世界 🤖🚀 naïve café\n\n"
            "def f(x: int) -> int:\n    return x ** 2  # square\n\tif a != b: print(f'{a}')\n"
            "  spaces   and 1234567 numbers <|im_start|>user\nhi<|im_end|> <|endoftext|> 'll 've")
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _train_bpe(pre: str, text: str, vocab_size: int = 400) -> dict:
    """A byte-level BPE tokenizer.json (dict) trained with `tokenizers`, with GPT-2's pre-tokenizer
    ("gpt2") or Llama 3's split ("llama-bpe")."""
    tk = Tokenizer(models.BPE())
    if pre == "llama-bpe":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(G.LLAMA3_SPLIT), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return json.loads(tk.to_str())


@pytest.fixture(scope="module")
def corpus() -> str:
    p = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    base = p.read_text()[:100_000] if p.is_file() else "To be, or not to be, that is the question. " * 500
    return base + "\ndef main():\n    for i in range(10):\n        print(i)\n" * 20


@pytest.fixture(scope="module")
def bpe(corpus) -> dict:
    return {pre: _train_bpe(pre, corpus) for pre in ("gpt2", "llama-bpe")}


def _meta(spec: dict, vocab_size: int, pre: str | None = None) -> dict:
    m = G.tokenizer_metadata(spec, vocab_size, bos=0, eos=0, chat_template=TEMPLATE)
    if pre:
        m["pre"] = pre
    return m


def hf_gpt2(vocab_size: int, **kw):
    torch.manual_seed(0)
    # n_positions 1024: transformers' GGUF loader maps context_length to n_ctx only, so wpe must have GPT-2's 1024 rows
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=1024, vocab_size=vocab_size,
                                  initializer_range=0.3, bos_token_id=0, eos_token_id=0, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_llama(vocab_size: int, **kw):
    torch.manual_seed(0)
    cfg = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, vocab_size=vocab_size, initializer_range=0.3,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    cfg.update(kw)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def write_reference_gguf(path: Path, model, tok: dict, qtype=QT.F32, override: dict | None = None) -> Path:
    """`model` (a transformers GPT-2 or Llama) as GGUF, written with the gguf package's own writer,
    quantizers and HF -> llama.cpp name map (not gptkit's code). `override`: GGUF name -> raw type
    for tensors whose bytes are made up here (K-quants, which gguf can read but not write)."""
    c = model.config
    arch = "gpt2" if c.model_type == "gpt2" else "llama"
    n_layer = c.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2 if arch == "gpt2" else gguf.MODEL_ARCH.LLAMA, n_layer)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(n_layer)
    w.add_embedding_length(c.hidden_size)
    w.add_head_count(c.num_attention_heads)
    if arch == "gpt2":
        w.add_context_length(c.n_positions)
        w.add_feed_forward_length(4 * c.hidden_size)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
    else:
        w.add_context_length(c.max_position_embeddings)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        cd = c.to_dict()  # transformers 5 keeps rope_theta inside rope_parameters
        w.add_rope_freq_base((cd.get("rope_parameters") or {}).get("rope_theta", cd.get("rope_theta", 10000.0)))
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
        w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["token_types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    w.add_chat_template(tok["chat_template"])
    rng = np.random.default_rng(0)
    for k, v in model.state_dict().items():
        if k.endswith((".attn.bias", ".masked_bias")) or (k == "lm_head.weight" and c.tie_word_embeddings):
            continue
        name = names.get_name(k, try_suffixes=(".weight", ".bias"))
        a = v.detach().float().numpy()
        if arch == "gpt2" and k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            a = a.T.copy()  # HF's Conv1D (in, out) -> (out, in)
        if arch == "llama" and ("q_proj" in k or "k_proj" in k):  # llama.cpp's rotary row order
            n = c.num_attention_heads if "q_proj" in k else c.num_key_value_heads
            a = a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        if override and name in override:
            stored, raw = _random_kquant(rng, a.shape, override[name]), override[name]
        elif a.ndim == 1 or qtype == QT.F32:
            stored, raw = a, None
        elif qtype == QT.F16:
            stored, raw = a.astype(np.float16), None
        else:
            stored, raw = gguf.quants.quantize(a, qtype), qtype
        w.add_tensor(name, stored, raw_dtype=raw)
        if arch == "gpt2" and k == "transformer.wte.weight":  # llama.cpp's GPT-2 carries the tied head too
            w.add_tensor("output.weight", stored, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _random_kquant(rng, shape, qtype) -> np.ndarray:
    """Random K-quant blocks whose f16 scale fields are small, as bytes in gguf's layout."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    d = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    # where each type keeps its f16 super-block scale(s): Q4_K/Q5_K d, dmin first; Q6_K d last
    spots = [0, 2] if qtype in (QT.Q4_K, QT.Q5_K) else [size - 2]
    for s in spots:
        raw[:, s:s + 2] = d
    return raw.reshape(*shape[:-1], shape[-1] // block * size)


def _transformers_logits(d: Path, name: str, x: torch.Tensor) -> torch.Tensor:
    m = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(x).logits


def _gptkit_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(path).model(x)


# ------------------------------------------------------------------------------------------------
# parity with transformers, files written by the gguf package

@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1], ids=lambda q: q.name)
def test_gpt2_gguf_logits_equal_transformers(tmp_path, bpe, qtype):
    spec = bpe["gpt2"]
    V = len(spec["model"]["vocab"])
    f = write_reference_gguf(tmp_path / "m.gguf", hf_gpt2(V), _meta(spec, V), qtype)
    x = torch.randint(0, V, (2, 24))
    delta = (_gptkit_logits(f, x) - _transformers_logits(tmp_path, "m.gguf", x)).abs().max().item()
    assert delta < 1e-4, delta


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K, QT.Q6_K], ids=lambda q: q.name)
def test_gguf_k_quants_dequantize_like_transformers(tmp_path, bpe, qtype):
    """K-quant blocks (gguf reads but does not write them): the 256-wide ffn_down rows made up as bytes."""
    spec = bpe["gpt2"]
    V = len(spec["model"]["vocab"])
    override = {f"blk.{i}.ffn_down.weight": qtype for i in range(2)}
    f = write_reference_gguf(tmp_path / "m.gguf", hf_gpt2(V), _meta(spec, V), QT.F32, override)
    x = torch.randint(0, V, (2, 24))
    delta = (_gptkit_logits(f, x) - _transformers_logits(tmp_path, "m.gguf", x)).abs().max().item()
    assert delta < 1e-4, delta


# "gpt-2" is llama.cpp's name for GPT-2's pre-tokenizer; "gpt2" is what gptkit wrote before (still read)
@pytest.mark.parametrize("pre", ["gpt-2", "gpt2", "smollm", "llama-bpe"])
def test_gguf_tokenizer_encodes_like_transformers(tmp_path, bpe, pre):
    spec = bpe["llama-bpe" if pre == "llama-bpe" else "gpt2"]
    V = len(spec["model"]["vocab"])
    write_reference_gguf(tmp_path / "m.gguf", hf_gpt2(V), _meta(spec, V, pre))
    tt = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    loaded = load_model(tmp_path / "m.gguf")
    ours = Tokenizer.from_str(loaded.tokenizer_spec["json"])
    ids = ours.encode(HELD_OUT, add_special_tokens=False).ids
    assert ids == tt.encode(HELD_OUT, add_special_tokens=False)
    assert ids == Tokenizer.from_str(json.dumps(spec)).encode(HELD_OUT).ids  # and like the tokenizer it came from
    assert ours.decode(ids, skip_special_tokens=False) == tt.decode(ids)
    assert loaded.tokenizer_spec["chat_template"] == tt.chat_template == TEMPLATE
    assert loaded.tokenizer_spec["config"]["eos_token"] == tt.eos_token == "<|endoftext|>"


# ------------------------------------------------------------------------------------------------
# gptkit's export

def _gptkit_from_hf(tmp_path, model, spec) -> Path:
    d = tmp_path / "hf"
    model.save_pretrained(d)
    (d / "tokenizer.json").write_text(json.dumps(spec))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                                         "chat_template": TEMPLATE}))
    return d


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_export_reads_back_with_gguf_reader(tmp_path, bpe, dtype):
    spec = bpe["gpt2"]
    V = len(spec["model"]["vocab"])
    hfm = hf_gpt2(V)
    src = _gptkit_from_hf(tmp_path, hfm, spec)
    out = tmp_path / "out.gguf"
    assert main(["convert", str(src), str(out), "--to", "gguf", "--dtype", dtype]) == 0
    r = gguf.GGUFReader(out)
    assert r.get_field("general.architecture").contents() == "gpt2"
    assert r.get_field("gpt2.block_count").contents() == 2
    assert r.get_field("tokenizer.ggml.pre").contents() == "gpt-2"  # llama.cpp's name ("gpt2" is refused there)
    assert r.get_field("tokenizer.chat_template").contents() == TEMPLATE
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, 2)
    ref = {names.get_name(k, try_suffixes=(".weight", ".bias")): v.detach().numpy()
           for k, v in hfm.state_dict().items() if not k.endswith(".attn.bias")}
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == set(ref)  # output.weight included, as llama.cpp's GPT-2 reads it
    for name, want in ref.items():
        t = tensors[name]
        if name.endswith(("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")):
            want = want.T
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if dtype == "f32" or want.ndim == 1:
            assert t.tensor_type == QT.F32 and np.array_equal(got, want), name
        elif dtype == "f16":
            assert t.tensor_type == QT.F16 and np.array_equal(got, want.astype(np.float16).astype(np.float32)), name
        else:
            assert t.tensor_type == QT.Q8_0, name
            # within Q8_0's error: half a step of each 32-value block's scale (max|w|/127), plus the
            # scale's own rounding to f16 (2^-11 relative) over up to 127 steps
            step = np.abs(want.reshape(-1, 32)).max(1, keepdims=True) / 127
            assert (np.abs(got - want).reshape(-1, 32) <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), name


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_export_loads_in_transformers_and_gptkit_alike(tmp_path, bpe, dtype):
    spec = bpe["gpt2"]
    V = len(spec["model"]["vocab"])
    src = _gptkit_from_hf(tmp_path, hf_gpt2(V), spec)
    out = tmp_path / "out.gguf"
    assert main(["convert", str(src), str(out), "--to", "gguf", "--dtype", dtype]) == 0
    x = torch.randint(0, V, (2, 24))
    delta = (_gptkit_logits(out, x) - _transformers_logits(tmp_path, "out.gguf", x)).abs().max().item()
    assert delta < 1e-4, delta
    tt = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="out.gguf")
    assert tt.encode(HELD_OUT, add_special_tokens=False) == Tokenizer.from_str(json.dumps(spec)).encode(HELD_OUT).ids


def test_round_trip_f32_exact_q8_0_within_its_error(tmp_path, bpe):
    spec = bpe["gpt2"]
    V = len(spec["model"]["vocab"])
    src = load_model(_gptkit_from_hf(tmp_path, hf_gpt2(V), spec)).model
    sd = {k: v for k, v in src.state_dict().items()}
    G.write_gguf(tmp_path / "f32.gguf", src, "f32")
    back = load_model(tmp_path / "f32.gguf").model.state_dict()
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    G.write_gguf(tmp_path / "q8.gguf", src, "q8_0")
    back = load_model(tmp_path / "q8.gguf").model.state_dict()
    for k, v in sd.items():
        if v.ndim == 1:
            assert torch.equal(back[k], v), k
            continue
        want = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(v.numpy(), QT.Q8_0), QT.Q8_0))
        if k.endswith("wte.weight") or k == "lm_head.weight":
            want[V:] = 0  # the padded vocab rows are not in the file
        assert torch.equal(back[k], want.reshape(v.shape)), k


# ------------------------------------------------------------------------------------------------
# bad input: one error line each

def _cli_error(capsys, argv) -> str:
    capsys.readouterr()  # whatever building the inputs printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def small_gguf(tmp_path, bpe) -> Path:
    spec = bpe["gpt2"]
    V = len(spec["model"]["vocab"])
    return write_reference_gguf(tmp_path / "m.gguf", hf_gpt2(V), _meta(spec, V))


def test_truncated_gguf_is_one_error_line(tmp_path, small_gguf, capsys):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(small_gguf.read_bytes()[:5000])
    line = _cli_error(capsys, ["convert", str(bad), str(tmp_path / "o.gguf"), "--to", "gguf"])
    assert "truncated" in line and "cut.gguf" in line


def test_wrong_magic_is_one_error_line(tmp_path, small_gguf, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + small_gguf.read_bytes()[4:])
    line = _cli_error(capsys, ["convert", str(bad), str(tmp_path / "o.gguf"), "--to", "gguf"])
    assert "bad.gguf" in line


def test_unknown_architecture_is_one_error_line(tmp_path, capsys):
    w = gguf.GGUFWriter(tmp_path / "falcon.gguf", "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    line = _cli_error(capsys, ["convert", str(tmp_path / "falcon.gguf"), str(tmp_path / "o.gguf"), "--to", "gguf"])
    assert "'falcon'" in line and "gpt2 and llama" in line


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path, bpe):
    spec = bpe["gpt2"]
    V = len(spec["model"]["vocab"])
    f = write_reference_gguf(tmp_path / "m.gguf", hf_gpt2(V), _meta(spec, V), QT.Q5_0)
    with pytest.raises(GptkitError) as e:
        load_model(f)
    assert "Q5_0" in str(e.value) and "blk.0." in str(e.value) or "token_embd" in str(e.value)


def test_unsupported_pre_tokenizer_is_an_error_when_the_tokenizer_is_needed(tmp_path, bpe):
    spec = bpe["gpt2"]
    V = len(spec["model"]["vocab"])
    f = write_reference_gguf(tmp_path / "m.gguf", hf_gpt2(V), _meta(spec, V, "qwen2"))
    loaded = load_model(f)  # the weights still load (a --vocab could stand in)
    err = loaded.tokenizer_spec["error"]
    assert "'qwen2'" in str(err) and "gpt2, smollm, llama-bpe" in str(err)


def test_export_of_unsupported_dtype_is_one_error_line(tmp_path, capsys, bpe):
    spec = bpe["gpt2"]
    V = len(spec["model"]["vocab"])
    src = _gptkit_from_hf(tmp_path, hf_gpt2(V), spec)
    line = _cli_error(capsys, ["convert", str(src), str(tmp_path / "o.gguf"), "--to", "gguf", "--dtype", "q4_k"])
    assert "'q4_k'" in line and "--dtype" in line and "f32, f16, q8_0" in line
    assert not (tmp_path / "o.gguf").exists()


# ------------------------------------------------------------------------------------------------
# the Llama family (GQA, untied or tied head)

@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_gguf_logits_equal_transformers(tmp_path, bpe, qtype, tied):
    spec = bpe["llama-bpe"]
    V = len(spec["model"]["vocab"])
    f = write_reference_gguf(tmp_path / "m.gguf", hf_llama(V, tie_word_embeddings=tied), _meta(spec, V), qtype)
    cfg = load_model(f).model.config
    assert (cfg.family, cfg.n_head, cfg.kv_heads, cfg.tie_embeddings) == ("llama", 4, 2, tied)
    x = torch.randint(0, V, (2, 24))
    delta = (_gptkit_logits(f, x) - _transformers_logits(tmp_path, "m.gguf", x)).abs().max().item()
    assert delta < 1e-4, delta


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_llama_export_loads_in_transformers_and_reads_back(tmp_path, bpe, dtype):
    spec = bpe["llama-bpe"]
    V = len(spec["model"]["vocab"])
    hfm = hf_llama(V, rope_theta=50000.0)
    src = _gptkit_from_hf(tmp_path, hfm, spec)
    out = tmp_path / "out.gguf"
    assert main(["convert", str(src), str(out), "--to", "gguf", "--dtype", dtype]) == 0
    r = gguf.GGUFReader(out)
    assert r.get_field("general.architecture").contents() == "llama"
    assert r.get_field("llama.attention.head_count_kv").contents() == 2
    assert r.get_field("llama.rope.freq_base").contents() == 50000.0
    assert r.get_field("tokenizer.ggml.pre").contents() == "llama-bpe"
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    want = {names.get_name(k, try_suffixes=(".weight", ".bias")): tuple(v.shape) for k, v in hfm.state_dict().items()}
    got = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in r.tensors}
    assert got == want
    x = torch.randint(0, V, (2, 24))
    ours, theirs = _gptkit_logits(out, x), _transformers_logits(tmp_path, "out.gguf", x)
    assert (ours - theirs).abs().max().item() < 1e-4
    if dtype == "f32":
        with torch.no_grad():
            assert (ours - hfm(x).logits).abs().max().item() < 1e-4


# ------------------------------------------------------------------------------------------------
# the tokenizer and chat template as gptkit's commands use them (tokenizer_for)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 🤖, write f(x)?"},
            {"role": "assistant", "content": "def f(x):\n    return x"}, {"role": "user", "content": "Thanks!"}]


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe"])
def test_gguf_model_tokenizer_and_chat_template_equal_transformers(tmp_path, bpe, pre):
    import gptkit.tokenizer as tokenizer
    spec = bpe["gpt2" if pre == "gpt-2" else pre]
    V = len(spec["model"]["vocab"])
    write_reference_gguf(tmp_path / "m.gguf", hf_gpt2(V), _meta(spec, V, pre))
    tt = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    tok = tokenizer.tokenizer_for(load_model(tmp_path / "m.gguf"))
    assert tok.encode(HELD_OUT) == tt.encode(HELD_OUT, add_special_tokens=False)
    ids = tt.encode(HELD_OUT, add_special_tokens=False)
    assert tok.decode(ids) == tt.decode(ids)
    want = tt.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tok.chat_template.render(MESSAGES, add_generation_prompt=True) == want
    assert tok.encode(want) == tt.encode(want, add_special_tokens=False)
    assert tok.eos == tt.eos_token_id == 0


def test_gpt2_bpe_export_encodes_like_tiktoken(tmp_path, gpt2_vocab_path):
    """A 50257-token GPT-2 with no tokenizer files of its own exports GPT-2's BPE (from the
    .tiktoken vocabulary): transformers' GGUF tokenizer then encodes like tiktoken."""
    import gptkit.tokenizer as tokenizer
    from gptkit import GPT, GPTConfig
    from gptkit.checkpoint import save_checkpoint
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=1024))
    save_checkpoint(tmp_path / "run", 1, m, {"model_config": m.config.to_dict()})
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "g.gguf"), "--to", "gguf", "--vocab",
                 str(gpt2_vocab_path)]) == 0
    r = gguf.GGUFReader(tmp_path / "g.gguf")
    assert r.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert r.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    assert len(r.get_field("tokenizer.ggml.tokens").contents()) == 50257
    assert len(r.get_field("tokenizer.ggml.merges").contents()) == 50000
    assert r.get_field("tokenizer.ggml.eos_token_id").contents() == 50256
    tt = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="g.gguf")
    enc = tokenizer.load_bpe_vocab(gpt2_vocab_path)
    text = HELD_OUT.replace("<|endoftext|>", "")
    assert tt.encode(text, add_special_tokens=False) == enc.encode(text)


def test_llama3_rope_travels_as_rope_freqs(tmp_path, bpe):
    """Llama 3.1's RoPE scaling is written as llama.cpp's rope_freqs tensor and read back from it:
    the GGUF model's logits equal transformers' float model with the same rope_scaling."""
    spec = bpe["llama-bpe"]
    V = len(spec["model"]["vocab"])
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
            "original_max_position_embeddings": 2048}
    hfm = hf_llama(V, rope_scaling=rope)
    src = _gptkit_from_hf(tmp_path, hfm, spec)
    assert main(["convert", str(src), str(tmp_path / "out.gguf"), "--to", "gguf"]) == 0
    r = gguf.GGUFReader(tmp_path / "out.gguf")
    factors = next(t for t in r.tensors if t.name == "rope_freqs.weight").data
    assert factors.shape == (8,) and factors.max() == 8.0 and factors.min() == 1.0
    cfg = load_model(tmp_path / "out.gguf").model.config
    assert cfg.rope["rope_type"] == "llama3" and cfg.rope["factor"] == 8.0
    x = torch.randint(0, V, (2, 100))
    with torch.no_grad():
        assert (_gptkit_logits(tmp_path / "out.gguf", x) - hfm(x).logits).abs().max().item() < 1e-4


def test_fine_tune_a_gguf_model_and_export_it_back(tmp_path, bpe):
    """`train --init FILE.gguf` fine-tunes the GGUF's weights; the run converts back to GGUF."""
    from gptkit.data import write_shard
    spec = bpe["llama-bpe"]
    V = len(spec["model"]["vocab"])
    f = write_reference_gguf(tmp_path / "m.gguf", hf_llama(V), _meta(spec, V), QT.Q8_0)
    data = tmp_path / "data"
    data.mkdir()
    ids = Tokenizer.from_str(json.dumps(spec)).encode(HELD_OUT * 20).ids
    write_shard(data / "train.bin", np.array(ids))
    write_shard(data / "val.bin", np.array(ids[:300]))
    (data / "meta.json").write_text(json.dumps({"vocab_size": V}))
    run = tmp_path / "run"
    argv = ["train", "--init", str(f), "--data", str(data), "--out", str(run), "max_steps=3", "batch_size=2",
            "block_size=32", "lr=1e-3", "eval_interval=0", "final_eval=false", "sample_tokens=0", "progress=false",
            "device=cpu", "dtype=float32", "warmup_steps=1"]
    assert main(argv) == 0
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "tuned.gguf"
    assert main(["convert", str(run), str(out), "--to", "gguf", "--dtype", "q8_0",
                 "--vocab", str(tmp_path / "tok" / "tokenizer.json")]) == 0
    before, after = load_model(f).model.state_dict(), load_model(out).model.state_dict()
    assert load_model(out).model.config == load_model(f).model.config
    assert not torch.equal(before["transformer.h.0.attn.c_attn.weight"], after["transformer.h.0.attn.c_attn.weight"])


def test_char_model_exports_without_a_vocabulary(tmp_path, capsys):
    from gptkit import GPT, GPTConfig
    from gptkit.checkpoint import save_checkpoint
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=20))
    save_checkpoint(tmp_path / "run", 1, m, {"model_config": m.config.to_dict(), "chars": [chr(97 + i) for i in range(20)]})
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "c.gguf"), "--to", "gguf"]) == 0
    assert "note: no tokenizer" in capsys.readouterr().err
    assert gguf.GGUFReader(tmp_path / "c.gguf").get_field("tokenizer.ggml.model").contents() == "no_vocab"
    loaded = load_model(tmp_path / "c.gguf")
    assert loaded.tokenizer_spec is None
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k


def _spm_tokenizer_meta(corpus: str) -> dict:
    """A SentencePiece-style vocabulary as llama.cpp's `llama` tokenizer stores it (Llama 2's shape):
    <unk>, <s>, </s>, the 256 byte tokens, then BPE pieces with `▁` for spaces, scored by rank, no merges."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.train_from_iterator([corpus], trainers.BpeTrainer(vocab_size=600))
    pieces = sorted(tk.get_vocab(), key=tk.get_vocab().get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return {"tokens": tokens, "types": types, "scores": scores}


def test_sentencepiece_gguf_tokenizer_encodes_like_transformers(tmp_path, corpus):
    spm = _spm_tokenizer_meta(corpus)
    V = len(spm["tokens"])
    w = gguf.GGUFWriter(tmp_path / "spm.gguf", "llama")
    hfm = hf_llama(V)
    # the weights through the reference writer's path, the tokenizer by hand: model "llama"
    ref = write_reference_gguf(tmp_path / "w.gguf", hfm, {**_meta(_train_bpe("gpt2", corpus), V), "tokens":
                               [f"t{i}" for i in range(V)], "token_types": [1] * V, "merges": []})
    r = gguf.GGUFReader(ref)
    for f in r.fields.values():
        if f.name.startswith("llama.") and not f.name.startswith("tokenizer"):
            w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    w.add_tokenizer_model("llama")
    w.add_token_list(spm["tokens"])
    w.add_token_types(spm["types"])
    w.add_token_scores(spm["scores"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tt = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    loaded = load_model(tmp_path / "spm.gguf")
    ours = Tokenizer.from_str(loaded.tokenizer_spec["json"])
    ids = ours.encode(HELD_OUT, add_special_tokens=False).ids
    assert ids == tt.encode(HELD_OUT, add_special_tokens=False)
    assert ours.decode(ids) == tt.decode(ids) == HELD_OUT
    assert loaded.tokenizer_spec["config"]["add_bos_token"] is True and loaded.tokenizer_spec["config"]["bos_token"] == "<s>"


def test_llama2_tokenizer_exports_as_sentencepiece(tmp_path, corpus):
    """A Llama model with a Llama-2-style tokenizer.json (BPE with byte fallback, Metaspace) exports
    llama.cpp's `llama` tokenizer; transformers' GGUF tokenizer then encodes like the tokenizer.json."""
    spm = _spm_tokenizer_meta(corpus)
    vocab = {t: i for i, t in enumerate(spm["tokens"])}
    pieces = spm["tokens"][259:]
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trained.train_from_iterator([corpus], trainers.BpeTrainer(vocab_size=600))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(trained.to_str())["model"]["merges"]]
    assert set(pieces) == set(trained.get_vocab())
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1)])
    from tokenizers import AddedToken
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    V = len(vocab)
    d = tmp_path / "hf"
    hf_llama(V).save_pretrained(d)
    (d / "tokenizer.json").write_text(tk.to_str())
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                                                         "add_bos_token": True, "chat_template": TEMPLATE}))
    assert main(["convert", str(d), str(tmp_path / "l2.gguf"), "--to", "gguf"]) == 0
    r = gguf.GGUFReader(tmp_path / "l2.gguf")
    assert r.get_field("tokenizer.ggml.model").contents() == "llama"
    assert r.get_field("tokenizer.ggml.token_type").contents()[3] == gguf.TokenType.BYTE
    want = tk.encode(HELD_OUT, add_special_tokens=False).ids
    tt = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="l2.gguf")
    assert tt.encode(HELD_OUT, add_special_tokens=False) == want
    loaded = load_model(tmp_path / "l2.gguf")
    assert Tokenizer.from_str(loaded.tokenizer_spec["json"]).encode(HELD_OUT, add_special_tokens=False).ids == want
    assert loaded.tokenizer_spec["config"]["add_bos_token"] is True


def test_export_refuses_an_existing_file_unless_force(tmp_path, capsys, small_gguf):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep")
    line = _cli_error(capsys, ["convert", str(small_gguf), str(out), "--to", "gguf"])
    assert "exists" in line and "--force" in line and out.read_bytes() == b"keep"
    assert main(["convert", str(small_gguf), str(out), "--to", "gguf", "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
