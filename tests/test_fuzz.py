"""Property-based fuzzing of every reader of untrusted bytes.

The property: any byte string, and in particular truncations, bit flips, overwritten header fields
and spliced junk of a valid file, either loads or raises GptkitError (one line, which the CLI
prints and exits 2 with). Never another exception, a hang (an alarm fails the example after
HANG_S seconds) or a peak memory growth above MEM_BOUND.

The default suite runs a fixed, derandomized FEW examples per reader; `-m slow` runs MANY.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptkit.config import GPTConfig
from gptkit.errors import GptkitError

ROOT = Path(__file__).resolve().parents[1]
FEW, MANY = 25, 600
HANG_S = 30  # generous: a reader of a few KB takes milliseconds; only a loop that never ends gets here
MEM_BOUND = 512 * 2**20  # bytes of peak RSS growth over a test; the valid files are a few KB

EXAMPLES = [pytest.param(FEW, id="few"), pytest.param(MANY, id="many", marks=pytest.mark.slow)]
# llm.c header slots get these values as well as random ones: the edges of every size check
INTERESTING = [0, 1, -1, 2, 3, 5, 7, 8, 16, 128, 255, 256, 1023, 1024, 50257, 2**16, 2**20, 2**31 - 1, -2**31]


def config() -> GPTConfig:
    return GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16)


# ----------------------------------------------------------------------------------------------
# strategies: a valid file, damaged


def _flip(valid: bytes, bits) -> bytes:
    b = bytearray(valid)
    for pos, bit in bits:
        b[pos % len(b)] ^= 1 << bit
    return bytes(b)


def _set_int32(valid: bytes, slot: int, value: int) -> bytes:
    b = bytearray(valid.ljust(4 * (slot + 1), b"\0"))
    b[4 * slot: 4 * slot + 4] = int(value).to_bytes(4, "little", signed=True)
    return bytes(b)


def damaged(valid: bytes, int32_header: bool = False) -> st.SearchStrategy[bytes]:
    """Truncations, bit flips, overwritten (int32 header) fields, spliced and appended junk of
    `valid`, and plain random bytes."""
    n = len(valid)
    options = [
        st.integers(0, max(n - 1, 0)).map(lambda k: valid[:k]),
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 7)), min_size=1, max_size=6)
          .map(lambda bits: _flip(valid, bits)),
        st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=32))
          .map(lambda a: valid[:a[0]] + a[1] + valid[a[0] + len(a[1]):]),
        st.binary(min_size=1, max_size=64).map(lambda junk: valid + junk),
        st.binary(max_size=2048),
    ]
    if int32_header:
        value = st.one_of(st.sampled_from(INTERESTING), st.integers(-2**31, 2**31 - 1))
        options.append(st.tuples(st.integers(0, 8), value).map(lambda a: _set_int32(valid, *a)))
        options.append(st.lists(st.tuples(st.integers(0, 8), value), min_size=2, max_size=4)
                       .map(lambda fs: _apply_all(valid, fs)))
    return st.one_of(*options)


def _apply_all(valid: bytes, fields) -> bytes:
    for slot, v in fields:
        valid = _set_int32(valid, slot, v)
    return valid


def json_values() -> st.SearchStrategy:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63), st.floats(allow_nan=False),
                        st.text(max_size=12))
    return st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                        st.dictionaries(st.text(max_size=12), kids, max_size=4)),
                        max_leaves=12)


def mutated_json(valid: dict) -> st.SearchStrategy[bytes]:
    """A valid JSON object with one key replaced, removed or retyped, as bytes; or damaged bytes."""
    keys = sorted(valid)

    def replace(a):
        d = dict(valid)
        d[keys[a[0] % len(keys)]] = a[1]
        return json.dumps(d).encode()

    def drop(i):
        d = dict(valid)
        d.pop(keys[i % len(keys)])
        return json.dumps(d).encode()

    raw = json.dumps(valid).encode()
    return st.one_of(st.tuples(st.integers(0, 99), json_values()).map(replace), st.integers(0, 99).map(drop),
                     json_values().map(lambda v: json.dumps(v).encode()), damaged(raw), deeply_nested())


def deeply_nested() -> st.SearchStrategy[bytes]:
    """JSON nested deeper than Python's recursion limit (json.loads raises RecursionError)."""
    return st.tuples(st.sampled_from([b"[", b'{"a":', b'{"model": [']), st.integers(1, 100_000)).map(
        lambda a: a[0] * a[1])


# ----------------------------------------------------------------------------------------------
# the property


@contextmanager
def _alarm(seconds: int):
    def on_alarm(signum, frame):
        raise AssertionError(f"the reader ran for more than {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def loads_or_refuses(read) -> None:
    """Run `read()`; only success or a one-line GptkitError may come out."""
    try:
        with _alarm(HANG_S):
            read()
    except GptkitError as e:
        assert "\n" not in str(e) and str(e).startswith("error: "), str(e)


def fuzz(n: int, strategy, check) -> None:
    """Run `check(example)` on n derandomized examples of `strategy`, bounding peak memory."""
    before = _peak_rss()

    @settings(max_examples=n, derandomize=True, deadline=None, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(example):
        check(example)
        assert _peak_rss() - before < MEM_BOUND, "a reader allocated far more than the file could hold"

    run()


pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SIGALRM and ru_maxrss in KiB are Linux's")


# ----------------------------------------------------------------------------------------------
# llm.c model, tokenizer, debug state and token shards


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """Small valid files of every llm.c kind, as bytes."""
    from gptkit.data import write_shard
    from gptkit.formats import llmc
    from gptkit.model import GPT
    from gptkit.validate import write_debug_state

    d = tmp_path_factory.mktemp("valid")
    torch.manual_seed(0)
    m = GPT(config())
    llmc.write_model(d / "model.bin", m.state_dict(), m.config)
    llmc.write_model(d / "model16.bin", m.state_dict(), m.config, dtype=torch.bfloat16)
    llmc.write_tokenizer(d / "tokenizer.bin", llmc.char_tokenizer([chr(97 + i) for i in range(16)]))
    x = torch.randint(0, 16, (1, 4))
    write_debug_state(m, x, torch.roll(x, -1, 1), d / "state.bin")
    write_shard(d / "shard.bin", list(range(16)) * 3)
    return {p.name: p.read_bytes() for p in d.iterdir()}


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("n", EXAMPLES)
@pytest.mark.parametrize("name", ["model.bin", "model16.bin"])
def test_llmc_model_file_loads_or_refuses(valid, tmp_path, n, name):
    from gptkit.formats import llmc
    from gptkit.loading import load_model

    def check(data):
        p = _file(tmp_path, "model.bin", data)
        loads_or_refuses(lambda: llmc.read_model(p))
        loads_or_refuses(lambda: load_model(str(p)))

    fuzz(n, damaged(valid[name], int32_header=True), check)


@pytest.mark.parametrize("n", EXAMPLES)
def test_llmc_tokenizer_file_loads_or_refuses(valid, tmp_path, n):
    from gptkit.formats import llmc

    fuzz(n, damaged(valid["tokenizer.bin"], int32_header=True),
         lambda data: loads_or_refuses(lambda: llmc.read_tokenizer(_file(tmp_path, "tokenizer.bin", data))))


@pytest.mark.parametrize("n", EXAMPLES)
def test_llmc_debug_state_loads_or_refuses(valid, tmp_path, n):
    from gptkit.formats import llmc

    fuzz(n, damaged(valid["state.bin"], int32_header=True),
         lambda data: loads_or_refuses(lambda: llmc.read_state(_file(tmp_path, "state.bin", data), config())))


@pytest.mark.parametrize("n", EXAMPLES)
def test_token_shard_loads_or_refuses(valid, tmp_path, n):
    from gptkit.data import read_shard

    def check(data):
        p = _file(tmp_path, "train.bin", data)
        loads_or_refuses(lambda: read_shard(p)[:].sum())

    fuzz(n, damaged(valid["shard.bin"], int32_header=True), check)


@pytest.mark.parametrize("n", EXAMPLES)
def test_data_meta_json_loads_or_refuses(tmp_path, n):
    from gptkit.data import read_meta

    meta = {"tokenizer": "char", "vocab_size": 16, "chars": [chr(97 + i) for i in range(16)], "source": "x"}
    fuzz(n, mutated_json(meta),
         lambda data: loads_or_refuses(lambda: (_file(tmp_path, "meta.json", data), read_meta(tmp_path))))


# ----------------------------------------------------------------------------------------------
# gptkit checkpoints: safetensors files and state.json


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from gptkit.checkpoint import save_checkpoint
    from gptkit.model import GPT

    torch.manual_seed(0)
    m = GPT(config())
    opt = torch.optim.AdamW(m.parameters())
    m(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))[1].backward()
    opt.step()
    names = dict(enumerate(n for n, _ in m.named_parameters()))
    return save_checkpoint(tmp_path_factory.mktemp("run"), 1, m,
                           {"model_config": m.config.to_dict(), "chars": [chr(97 + i) for i in range(16)]},
                           opt, names)


def _damaged_checkpoint(src: Path, tmp_path: Path, name: str, data: bytes) -> Path:
    d = tmp_path / "ckpt_00000001"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(src, d)
    (d / name).write_bytes(data)
    return d


@pytest.mark.parametrize("n", EXAMPLES)
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_checkpoint_tensors_load_or_refuse(checkpoint, tmp_path, n, name):
    from gptkit.checkpoint import read_tensors
    from gptkit.loading import load_checkpoint_model

    def check(data):
        d = _damaged_checkpoint(checkpoint, tmp_path, name, data)
        loads_or_refuses(lambda: read_tensors(d / name))
        loads_or_refuses(lambda: load_checkpoint_model(d))

    # safetensors: an 8-byte little-endian header length, then the JSON header
    fuzz(n, damaged((checkpoint / name).read_bytes(), int32_header=True), check)


@pytest.mark.parametrize("n", EXAMPLES)
def test_checkpoint_state_json_loads_or_refuses(checkpoint, tmp_path, n):
    from gptkit.loading import load_checkpoint_model
    from gptkit.loading import load_model

    valid_state = json.loads((checkpoint / "state.json").read_text())

    def check(data):
        d = _damaged_checkpoint(checkpoint, tmp_path, "state.json", data)
        loads_or_refuses(lambda: load_checkpoint_model(d))
        loads_or_refuses(lambda: load_model(str(d)))

    fuzz(n, mutated_json(valid_state), check)


# ----------------------------------------------------------------------------------------------
# OpenAI's TF checkpoints: the index (a LevelDB table of protobufs), the data shard, hparams.json

TF = ROOT / "tests" / "fixtures" / "tf-gpt2-tiny"


def _damaged_tf(tmp_path: Path, name: str, data: bytes) -> Path:
    d = tmp_path / "tf"
    if not d.is_dir():
        shutil.copytree(TF, d)
    for f in TF.iterdir():
        if f.name != name:
            shutil.copyfile(f, d / f.name)
    (d / name).write_bytes(data)
    return d


@pytest.mark.parametrize("n", EXAMPLES)
@pytest.mark.parametrize("name", ["model.ckpt.index", "model.ckpt.data-00000-of-00001", "hparams.json"])
def test_tf_checkpoint_loads_or_refuses(tmp_path, n, name):
    from gptkit.formats.tf import load_tf

    valid = (TF / name).read_bytes()
    strategy = mutated_json(json.loads(valid)) if name.endswith(".json") else damaged(valid)
    fuzz(n, strategy, lambda data: loads_or_refuses(lambda: load_tf(_damaged_tf(tmp_path, name, data))))


# ----------------------------------------------------------------------------------------------
# BPE vocabularies: tokenizer.json, encoder.json + vocab.bpe, .tiktoken


def _small_tokenizer_json() -> dict:
    from gptkit.tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = ["Ġ t", "h e", "Ġt he"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": merges}}


@pytest.mark.parametrize("n", EXAMPLES)
def test_tokenizer_json_loads_or_refuses(tmp_path, n):
    from gptkit.tokenizer import load_bpe_vocab

    valid = _small_tokenizer_json()
    model_field = st.one_of(
        st.tuples(st.sampled_from(["type", "vocab", "merges"]), json_values())
          .map(lambda a: json.dumps({**valid, "model": {**valid["model"], a[0]: a[1]}}).encode()),
        st.lists(st.one_of(st.text(max_size=6), json_values()), max_size=5)
          .map(lambda ms: json.dumps({**valid, "model": {**valid["model"], "merges": ms}}).encode()),
    )
    fuzz(n, st.one_of(mutated_json(valid), model_field),
         lambda data: loads_or_refuses(lambda: load_bpe_vocab(_file(tmp_path, "tokenizer.json", data))))


@pytest.mark.parametrize("n", EXAMPLES)
def test_tiktoken_and_encoder_files_load_or_refuse(tmp_path, n):
    import base64

    from gptkit.tokenizer import load_bpe_vocab

    tiktoken_text = b"".join(base64.b64encode(bytes([i])) + b" %d\n" % i for i in range(256))
    valid = _small_tokenizer_json()["model"]
    (tmp_path / "pair").mkdir()
    (tmp_path / "pair" / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(valid["merges"]) + "\n")

    def check(data):
        loads_or_refuses(lambda: load_bpe_vocab(_file(tmp_path, "gpt2.tiktoken", data)))
        loads_or_refuses(lambda: load_bpe_vocab(_file(tmp_path / "pair", "encoder.json", data)))

    fuzz(n, st.one_of(damaged(tiktoken_text), mutated_json(valid["vocab"])), check)


# ----------------------------------------------------------------------------------------------
# the server's request parser: any JSON body is a request or a 400 naming the problem


def _parser():
    try:  # the server split into a package (serve/protocol.py) or still one module
        from gptkit.serve import protocol as mod
    except ImportError:
        import gptkit.serve as mod
    return mod.parse_completion_request, mod.APIError, mod.ServeConfig, mod._SafeTokenizer


@pytest.mark.parametrize("n", EXAMPLES)
def test_completion_request_parser_accepts_or_answers_400(n):
    from gptkit.tokenizer import CharTokenizer

    parse, APIError, ServeConfig, SafeTokenizer = _parser()
    tok = SafeTokenizer(CharTokenizer([chr(97 + i) for i in range(16)]))  # as the app wraps it
    fields = ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "best_of", "seed", "stream",
              "stream_options", "stop", "echo", "logprobs", "logit_bias", "repetition_penalty", "suffix",
              "presence_penalty", "frequency_penalty"]
    valid = {"model": "m", "prompt": "abc", "max_tokens": 4}
    body = st.one_of(
        json_values(),
        st.dictionaries(st.sampled_from(fields), json_values(), max_size=6).map(lambda d: {**valid, **d}),
        st.tuples(st.sampled_from(fields), st.one_of(json_values(), st.lists(st.integers(-5, 40), max_size=5),
                                                     st.lists(st.lists(st.integers(-5, 40), max_size=3), max_size=3)))
          .map(lambda a: {**valid, a[0]: a[1]}),
    )

    def check(b):
        try:
            with _alarm(HANG_S):
                parse(b, tok, 8, "m", ServeConfig())
        except APIError as e:
            assert (e.status == 400 or (e.status, e.code) == (404, "model_not_found")) and e.body()["error"]["message"]

    fuzz(n, body, check)


# ----------------------------------------------------------------------------------------------
# --resume: a checkpoint's training state (optimizer tensors, state.json's loader, RNG and step)

RESUME_TEXT = "".join(f"line {i}: to be or not to be.\n" for i in range(200))


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    from gptkit.checkpoint import find_checkpoint
    from gptkit.config import resolve_config
    from gptkit.prepare import prepare
    from gptkit.train import train

    d = tmp_path_factory.mktemp("resume")
    (d / "text.txt").write_text(RESUME_TEXT)
    data = prepare(str(d / "text.txt"), tokenizer="char", out=d / "data")
    ov = dict(data=str(data), out=str(d / "run"), n_layer=1, n_head=1, n_embd=8, batch_size=2, block_size=8,
              max_steps=1, warmup_steps=1, eval_interval=0, final_eval=False, sample_tokens=0, progress=False,
              dtype="float32", dropout=0.1)
    cfg, mov = resolve_config(None, {k: str(v) for k, v in ov.items()})
    train(cfg, mov, log=lambda *a, **k: None)
    return find_checkpoint(d / "run"), data, cfg


@pytest.mark.parametrize("n", EXAMPLES)
@pytest.mark.parametrize("name", ["state.json", "optimizer.safetensors"])
def test_resume_state_loads_or_refuses(run_checkpoint, tmp_path, n, name):
    from gptkit.loading import load_checkpoint_model
    from gptkit.data import TokenLoader
    from gptkit.optim import make_adamw
    from gptkit.runtime import Dist
    from gptkit.train import restore_training_state

    ckpt, data, cfg = run_checkpoint
    valid = (ckpt / name).read_bytes()
    strategy = mutated_json(json.loads(valid)) if name.endswith(".json") else damaged(valid, int32_header=True)

    model = load_checkpoint_model(ckpt).model
    opt, names = make_adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)

    def check(raw):
        d = _damaged_checkpoint(ckpt, tmp_path, name, raw)
        loader = TokenLoader(data, "train", cfg.batch_size, cfg.block_size, seed=cfg.seed)
        loads_or_refuses(lambda: restore_training_state(d, model, opt, names, loader, False, Dist(), "cpu"))

    fuzz(n, strategy, check)


@pytest.mark.parametrize("n", EXAMPLES)
def test_request_body_bytes_are_a_request_or_a_400(n):
    """The raw body as the app reads it: JSON decoding, then the completion parser; deeply nested
    JSON included."""
    from gptkit.tokenizer import CharTokenizer

    try:
        from gptkit.serve.protocol import decode_json
    except ImportError:  # before the server split
        pytest.fail("gptkit.serve.protocol.decode_json is where the app decodes request bodies")
    parse, APIError, ServeConfig, SafeTokenizer = _parser()
    tok = SafeTokenizer(CharTokenizer([chr(97 + i) for i in range(16)]))
    valid = json.dumps({"model": "m", "prompt": "abc", "max_tokens": 4, "stop": ["b"], "n": 2}).encode()

    def check(raw):
        try:
            with _alarm(HANG_S):
                parse(decode_json(raw), tok, 8, "m", ServeConfig())
        except APIError as e:
            assert e.status == 400 and "\n" not in e.message

    fuzz(n, st.one_of(damaged(valid), deeply_nested(), st.binary(max_size=256)), check)


# ----------------------------------------------------------------------------------------------
# Hugging Face directories: config.json, model.safetensors, pytorch_model.bin (torch.load, weights only)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from gptkit.formats.hf import save_hf
    from gptkit.model import GPT

    torch.manual_seed(0)
    m = GPT(config())
    d = tmp_path_factory.mktemp("hf") / "hf"
    save_hf(m, d)
    from safetensors.torch import load_file

    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    return d


@pytest.mark.parametrize("n", EXAMPLES)
@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "pytorch_model.bin"])
def test_hf_directory_loads_or_refuses(hf_dir, tmp_path, n, name):
    from gptkit.loading import load_model

    valid = (hf_dir / name).read_bytes()
    strategy = mutated_json(json.loads(valid)) if name.endswith(".json") else damaged(valid, int32_header=True)

    def check(raw):
        d = tmp_path / "hf"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        shutil.copyfile(hf_dir / "config.json", d / "config.json")
        # the file under test, with the weights in the other format removed so that it is the one read
        weights = "pytorch_model.bin" if name == "pytorch_model.bin" else "model.safetensors"
        shutil.copyfile(hf_dir / weights, d / weights)
        (d / name).write_bytes(raw)
        loads_or_refuses(lambda: load_model(str(d)))

    fuzz(n, strategy, check)
