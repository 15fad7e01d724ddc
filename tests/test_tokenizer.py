"""GPT-2 BPE from every accepted vocabulary format, and the char tokenizer.

Offline, tiktoken's own get_encoding("gpt2") can't load, so the references are fixed facts
("Hello world" -> [15496, 995], round trips) and transformers' GPT2TokenizerFast reading the
vocab.json + merges.txt these tests derive from gpt2.tiktoken.
"""

import base64
import json
from pathlib import Path

import pytest

from gptkit.cli import main
from gptkit.errors import GptkitError
from gptkit.tokenizer import CharTokenizer, bytes_to_unicode, gpt2_tokenizer, load_bpe_vocab

TRICKY = [
    "Hello world",
    "",
    " ",
    "\n\n\n",
    "héllo wörld — naïve café",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 and flags 🇫🇷🇯🇵",
    "combining: e\u0301 a\u0308 \u0915\u094d\u0937",
    "zero width\u200bjoiner\u200d and BOM \ufeff",
    "tabs\tand  double  spaces   \r\n windows\r\nlines",
    "I'm we've they'll you'd she's IT'S",
    "numbers 1234567890 3.14159 1e-10",
    "<|endoftext|> is plain text here",
    "\x00\x01\x7f control \u0085 \u2028 \u2029",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 and lone surrogates are not valid str",
]


def _read_tiktoken(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        tok, rank = line.split()
        ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair BPE merged last to make `token`: run BPE on its bytes with lower ranks only."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 30))
        if ranks.get(parts[best] + parts[best + 1], 1 << 30) >= limit:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    assert len(parts) == 2, token
    return parts[0], parts[1]


@pytest.fixture(scope="session")
def vocab_formats(tmp_path_factory):
    """gpt2.tiktoken rewritten as OpenAI's encoder.json + vocab.bpe, HF's vocab.json + merges.txt
    and HF's tokenizer.json (written by transformers itself): {format: path}."""
    import os

    d = os.environ.get("GPTKIT_DATA")
    src = Path(d) / "gpt2.tiktoken" if d else None
    if src is None or not src.is_file():
        pytest.skip("gpt2.tiktoken not found: set GPTKIT_DATA to the folder holding it (../shared/data in CI)")
    ranks = _read_tiktoken(src)
    b2u = bytes_to_unicode()

    def u(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    encoder = {u(t): r for t, r in ranks.items()}
    encoder["<|endoftext|>"] = 50256
    merges = [" ".join(u(p) for p in _merge_of(t, ranks)) for t, r in sorted(ranks.items(), key=lambda kv: kv[1])
              if r >= 256]
    assert len(merges) == 50000
    root = tmp_path_factory.mktemp("vocab")
    openai, hf = root / "openai", root / "hf"
    openai.mkdir()
    hf.mkdir()
    (openai / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (openai / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (hf / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (hf / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    out = {"tiktoken": src, "openai": openai, "hf-pair": hf}
    transformers = pytest.importorskip("transformers")
    fast = transformers.GPT2TokenizerFast.from_pretrained(hf)
    assert len(fast) == 50257
    tj = root / "tj"
    fast.save_pretrained(tj)
    for extra in ("vocab.json", "merges.txt"):  # keep only tokenizer.json so that it is the file read
        (tj / extra).unlink(missing_ok=True)
    assert (tj / "tokenizer.json").is_file()
    out["tokenizer.json"] = tj
    out["_hf_fast"] = fast
    return out


def test_hello_world_ids(gpt2_vocab_path):
    tok = load_bpe_vocab(gpt2_vocab_path)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eot == 50256
    assert tok.decode([15496, 995]) == "Hello world"


def test_every_vocabulary_format_gives_the_same_encoder(vocab_formats, shakespeare_path):
    toks = {k: load_bpe_vocab(v) for k, v in vocab_formats.items() if not k.startswith("_")}
    ref = toks.pop("tiktoken")
    assert set(toks) == {"openai", "hf-pair", "tokenizer.json"}
    text = shakespeare_path.read_text(encoding="utf-8")[:200_000]
    for name, tok in toks.items():
        assert tok.enc._mergeable_ranks == ref.enc._mergeable_ranks, name
        assert tok.encode("Hello world") == [15496, 995], name
        for t in TRICKY:
            assert tok.encode(t) == ref.encode(t), (name, t)
        assert tok.encode(text) == ref.encode(text), name
    # single files of a pair and tokenizer.json by name are accepted too
    assert load_bpe_vocab(vocab_formats["openai"] / "encoder.json").encode("Hello world") == [15496, 995]
    assert load_bpe_vocab(vocab_formats["tokenizer.json"] / "tokenizer.json").encode("a b") == ref.encode("a b")


def test_encoder_matches_transformers_gpt2_tokenizer(vocab_formats, shakespeare_path):
    """An independent BPE implementation (HF tokenizers) over the same files gives the same ids."""
    fast = vocab_formats["_hf_fast"]
    tok = load_bpe_vocab(vocab_formats["tiktoken"])
    text = shakespeare_path.read_text(encoding="utf-8")[:100_000]
    for t in TRICKY[:-3] + [text]:  # HF would turn the literal special-token text into 50256
        assert tok.encode(t) == fast.encode(t), t[:40]


def test_roundtrip_all_of_shakespeare_and_tricky_unicode(gpt2_vocab_path, shakespeare_path):
    tok = load_bpe_vocab(gpt2_vocab_path)
    text = shakespeare_path.read_text(encoding="utf-8")
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert max(ids) < 50256  # encode_ordinary: no special tokens
    for t in TRICKY:
        assert tok.decode(tok.encode(t)) == t
    assert tok.encode("<|endoftext|>") != [50256]
    assert tok.decode([50256]) == "<|endoftext|>"


def test_lookup_order_env_then_data(tmp_path, monkeypatch, gpt2_vocab_path, vocab_formats):
    monkeypatch.delenv("GPTKIT_GPT2_VOCAB", raising=False)
    monkeypatch.setenv("GPTKIT_DATA", str(gpt2_vocab_path.parent))
    assert gpt2_tokenizer().encode("Hello world") == [15496, 995]
    # $GPTKIT_GPT2_VOCAB comes before $GPTKIT_DATA: a broken one must be the one that fails
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not base64 at all\n")
    monkeypatch.setenv("GPTKIT_GPT2_VOCAB", str(bad))
    with pytest.raises(GptkitError, match="bad.tiktoken"):
        gpt2_tokenizer()
    # --vocab comes first
    assert gpt2_tokenizer(vocab_formats["hf-pair"]).encode("Hello world") == [15496, 995]
    # the model directory's files are used when nothing else is configured
    monkeypatch.delenv("GPTKIT_GPT2_VOCAB")
    monkeypatch.setenv("GPTKIT_DATA", str(tmp_path / "nowhere"))
    assert gpt2_tokenizer(model_dir=vocab_formats["tokenizer.json"]).encode("Hello world") == [15496, 995]


def test_bad_vocabulary_files_are_one_line_errors(tmp_path, vocab_formats):
    (tmp_path / "empty").mkdir()
    with pytest.raises(GptkitError, match="no GPT-2 vocabulary"):
        load_bpe_vocab(tmp_path / "empty")
    with pytest.raises(GptkitError, match="not found"):
        load_bpe_vocab(tmp_path / "missing.tiktoken")
    short = tmp_path / "short.tiktoken"
    short.write_text(base64.b64encode(b"a").decode() + " 0\n")
    with pytest.raises(GptkitError, match="1 tokens"):
        load_bpe_vocab(short)
    # merges that disagree with the id table
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "vocab.json").write_text((vocab_formats["hf-pair"] / "vocab.json").read_text(encoding="utf-8"))
    lines = (vocab_formats["hf-pair"] / "merges.txt").read_text(encoding="utf-8").splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    (d / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(GptkitError, match="disagree"):
        load_bpe_vocab(d)
    (d / "vocab.json").write_text("{not json")
    with pytest.raises(GptkitError, match="JSON"):
        load_bpe_vocab(d)


def test_char_tokenizer_roundtrip_and_unknown_char():
    tok = CharTokenizer.from_text("hello world")
    assert tok.vocab_size == len(set("hello world"))
    assert tok.decode(tok.encode("hello")) == "hello"
    assert tok.chars == sorted(set("hello world"))
    with pytest.raises(GptkitError, match="'z'"):
        tok.encode("z")


def test_cli_bad_vocab_exits_2(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("some text " * 50)
    rc = main(["prepare", str(text), "--vocab", str(tmp_path / "nope.tiktoken"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: vocabulary not found") and "\n" not in err


def test_char_tokenizer_round_trips_every_character():
    from gptkit.tokenizer import CharTokenizer

    text = "To be, or not to be: that is the question.\n"
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == len(set(text)) and tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.vocab_size - 1]) == sorted(set(text))[-1]
