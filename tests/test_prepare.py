"""`gptkit prepare`: llm.c-exact tiny Shakespeare, nanoGPT's char split, any text corpus streamed
into (sharded) llm.c token files, the preset text's lookup order and download, and bad input.

The shards are read back here with plain numpy, not with gptkit.data, so the file layout itself
is checked against INTERFACES.md."""

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import data_file
from gptkit import prepare as prep
from gptkit.cli import main
from gptkit.tokenizer import load_bpe_vocab

ROOT = Path(__file__).resolve().parents[1]


def read_llmc(path: Path) -> np.ndarray:
    """A shard in llm.c's GPT-2 layout (uint16) or its Llama 3 layout (uint32), read by hand."""
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert (header[0], header[1]) in ((20240520, 1), (20240801, 7)) and not header[3:].any()
    ntok, width = int(header[2]), 2 if header[0] == 20240520 else 4
    assert len(raw) == 1024 + width * ntok
    return np.frombuffer(raw[1024:], dtype=f"<u{width}").astype(np.int64)


def split_tokens(d: Path, split: str) -> np.ndarray:
    files = sorted(d.glob(f"{split}*.bin"))
    return np.concatenate([read_llmc(f) for f in files])


def write_words(path: Path, n_bytes: int, seed: int = 0) -> None:
    """Generated English-like text of about n_bytes, written in pieces (never all in memory)."""
    rng = np.random.default_rng(seed)
    words = np.array("the of and to in is was that for it with as his on be at by I had not are but from "
                     "or have an they which one you were her all she there would their we him been has when "
                     "who will more no if out so said what up its about into than them can only other new "
                     "café naïve 1914 3.5 don't we'll — “quoted” ½ \u00e9t\u00e9".split())
    punct = np.array([" ", " ", " ", " ", " ", ", ", ". ", "\n", "\n\n", "; "])
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < n_bytes:
            w = rng.choice(words, 20_000)
            p = rng.choice(punct, 20_000)
            s = "".join(np.char.add(w, p))
            f.write(s)
            written += len(s.encode("utf-8"))


# ---------------------------------------------------------------------------------------------- presets

def test_prepare_shakespeare_matches_llmc(tmp_path, shakespeare_path, gpt2_vocab_path):
    assert main(["prepare", "shakespeare", "--out", str(tmp_path / "s")]) == 0
    val, train = read_llmc(tmp_path / "s" / "val.bin"), read_llmc(tmp_path / "s" / "train.bin")
    assert (len(val), len(train)) == (32_768, 305_260)  # llm.c's published figures, 338,028 in all
    # llm.c dev/data/tinyshakespeare.py, step by step
    tok = load_bpe_vocab(gpt2_vocab_path)
    sections = shakespeare_path.read_text(encoding="utf-8").split("\n\n")
    ref = []
    for i, s in enumerate(sections):
        ref.append(50256)
        ref.extend(tok.encode(s + "\n\n" if i != len(sections) - 1 else s))
    assert np.array_equal(np.concatenate([val, train]), ref)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["eot"] == 50256
    assert (meta["train_tokens"], meta["val_tokens"]) == (305_260, 32_768)


def test_prepare_shakespeare_char_matches_nanogpt(tmp_path, shakespeare_path):
    out = prep.prepare("shakespeare-char", out=tmp_path / "c", progress=False)
    text = shakespeare_path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(text)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 65 and meta["chars"] == chars
    assert np.array_equal(read_llmc(out / "train.bin"), [stoi[c] for c in text[: int(n * 0.9)]])
    assert np.array_equal(read_llmc(out / "val.bin"), [stoi[c] for c in text[int(n * 0.9):]])
    assert meta["val_tokens"] == 111_540


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture
def http_root(tmp_path):
    """A static HTTP server on 127.0.0.1 serving tmp_path/www: (root dir, base URL, hit log)."""
    www = tmp_path / "www"
    www.mkdir()
    hits = []

    class H(_Handler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(www), **k)

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    t.start()
    yield www, f"http://127.0.0.1:{srv.server_address[1]}", hits
    srv.shutdown()
    srv.server_close()


def test_preset_text_downloads_into_cache_then_reuses_it(tmp_path, monkeypatch, http_root, shakespeare_path):
    www, url, hits = http_root
    (www / "input.txt").write_bytes(shakespeare_path.read_bytes())
    monkeypatch.setenv("GPTKIT_DATA", str(tmp_path / "no-data-here"))
    monkeypatch.setenv("GPTKIT_SHAKESPEARE_URL", f"{url}/input.txt")
    cache = Path(os.environ["GPTKIT_CACHE"])
    assert main(["prepare", "shakespeare-char", "--out", str(tmp_path / "a")]) == 0
    assert hits == ["/input.txt"]
    assert (cache / "tinyshakespeare.txt").read_bytes() == shakespeare_path.read_bytes()
    assert not list(cache.glob("*.part"))
    # second time: from the cache, no request
    assert main(["prepare", "shakespeare-char", "--out", str(tmp_path / "b")]) == 0
    assert hits == ["/input.txt"]
    assert (tmp_path / "a" / "val.bin").read_bytes() == (tmp_path / "b" / "val.bin").read_bytes()


def test_preset_text_lookup_order(tmp_path, monkeypatch, http_root):
    www, url, hits = http_root
    monkeypatch.setenv("GPTKIT_SHAKESPEARE_URL", f"{url}/input.txt")
    data, cache = tmp_path / "data", Path(os.environ["GPTKIT_CACHE"])
    data.mkdir()
    cache.mkdir(parents=True)
    (data / "tinyshakespeare.txt").write_text("from data " * 100)
    (cache / "tinyshakespeare.txt").write_text("from cache " * 100)
    inp = tmp_path / "in.txt"
    inp.write_text("from input " * 100)
    monkeypatch.setenv("GPTKIT_DATA", str(data))
    assert prep.shakespeare_text_path(inp) == inp
    assert prep.shakespeare_text_path() == data / "tinyshakespeare.txt"
    monkeypatch.setenv("GPTKIT_DATA", str(tmp_path / "none"))
    assert prep.shakespeare_text_path() == cache / "tinyshakespeare.txt"
    assert hits == []


def test_failed_download_is_a_one_line_error_and_leaves_no_file(tmp_path, monkeypatch, http_root, capsys):
    www, url, hits = http_root
    monkeypatch.setenv("GPTKIT_DATA", str(tmp_path / "none"))
    monkeypatch.setenv("GPTKIT_SHAKESPEARE_URL", f"{url}/missing.txt")
    assert main(["prepare", "shakespeare", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: download failed") and "\n" not in err
    assert not list(Path(os.environ["GPTKIT_CACHE"]).glob("*"))


# ---------------------------------------------------------------------------------------------- any text

def test_text_file_streams_to_the_same_tokens_as_one_encode(tmp_path, monkeypatch, gpt2_vocab_path):
    src = tmp_path / "corpus.txt"
    write_words(src, 300_000)
    monkeypatch.setattr(prep, "CHUNK_BYTES", 4096)  # many chunks, each cut where BPE would cut
    monkeypatch.setattr(prep, "COPY_TOKENS", 1000)
    out = prep.prepare(str(src), out=tmp_path / "o", progress=False)
    tok = load_bpe_vocab(gpt2_vocab_path)
    ref = [50256] + tok.encode(src.read_text(encoding="utf-8"))
    got = np.concatenate([read_llmc(out / "train.bin"), read_llmc(out / "val.bin")])
    assert np.array_equal(got, ref)
    assert len(read_llmc(out / "val.bin")) == len(ref) - int(len(ref) * 0.9)
    assert not list(out.glob(".tokens*"))  # the spool is gone


def test_bpe_pieces_cut_only_where_the_pretokenizer_does(gpt2_vocab_path, shakespeare_path):
    tok = load_bpe_vocab(gpt2_vocab_path)
    text = shakespeare_path.read_text(encoding="utf-8")[:100_000] + " x\ny z 1 2\n\n a\tb  c\r\nd'e ’f"
    for size in (7, 100, 5000):
        chunks = [text[i:i + size] for i in range(0, len(text), size)]
        pieces = list(prep.bpe_pieces(chunks, min_chars=size))
        assert "".join(pieces) == text
        assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)


def test_folder_of_documents_each_preceded_by_eot(tmp_path, gpt2_vocab_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    texts = {"a.txt": "First document.\n", "sub/b.txt": "Second <|endoftext|> one, plain text.\n",
             "c.txt": "Third: ünïcödé 😀\n" * 40, "empty.txt": "", "skip.md": "not a .txt"}
    for name, t in texts.items():
        (d / name).write_text(t, encoding="utf-8")
    out = prep.prepare(str(d), out=tmp_path / "o", val_fraction=0.2, progress=False)
    tok = load_bpe_vocab(gpt2_vocab_path)
    ref = []
    for name in ("a.txt", "c.txt", "sub/b.txt"):  # sorted paths; empty files add nothing
        ref += [50256] + tok.encode(texts[name])
    assert np.array_equal(split_tokens(out, "train").tolist() + split_tokens(out, "val").tolist(), ref)
    assert json.loads((out / "meta.json").read_text())["documents"] == 4


def test_shard_size_splits_and_reprepare_replaces(tmp_path, gpt2_vocab_path):
    src = tmp_path / "t.txt"
    write_words(src, 40_000)
    assert main(["prepare", str(src), "--out", str(tmp_path / "o"), "--shard-size", "1000"]) == 0
    o = tmp_path / "o"
    train = sorted(o.glob("train_*.bin"))
    assert [p.name for p in train[:2]] == ["train_000000.bin", "train_000001.bin"]
    sizes = [len(read_llmc(p)) for p in train]
    assert all(s == 1000 for s in sizes[:-1]) and 0 < sizes[-1] <= 1000
    assert not (o / "train.bin").exists()
    sharded = np.concatenate([split_tokens(o, "train"), split_tokens(o, "val")])
    meta = json.loads((o / "meta.json").read_text())
    assert meta["train_files"] == [p.name for p in train]
    # the same data unsharded; old numbered shards are removed
    assert main(["prepare", str(src), "--out", str(o)]) == 0
    assert not list(o.glob("train_*.bin")) and (o / "train.bin").is_file()
    assert np.array_equal(np.concatenate([read_llmc(o / "train.bin"), read_llmc(o / "val.bin")]), sharded)


def test_char_tokenizer_on_any_text_and_uint32_shards(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("abcab ✓ é\n" * 30, encoding="utf-8")
    out = prep.prepare(str(src), tokenizer="char", out=tmp_path / "o", progress=False)
    meta = json.loads((out / "meta.json").read_text())
    chars = sorted(set(src.read_text(encoding="utf-8")))
    assert meta["chars"] == chars and meta["vocab_size"] == len(chars)
    got = np.concatenate([read_llmc(out / "train.bin"), read_llmc(out / "val.bin")])
    assert "".join(chars[i] for i in got) == src.read_text(encoding="utf-8")
    assert (out / "train.bin").read_bytes()[:4] == (20240520).to_bytes(4, "little")  # a small vocabulary: uint16
    # more distinct characters than uint16 ids can index: llm.c's uint32 (Llama 3) layout
    big = tmp_path / "big.txt"
    text = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c < 0xE000) * 2
    big.write_text(text, encoding="utf-8")
    assert main(["prepare", str(big), "--tokenizer", "char", "--out", str(tmp_path / "b")]) == 0
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["vocab_size"] == len(set(text)) > 65536
    got = np.concatenate([read_llmc(tmp_path / "b" / "train.bin"), read_llmc(tmp_path / "b" / "val.bin")])
    assert got.max() > 65535 and "".join(meta["chars"][i] for i in got) == text
    assert (tmp_path / "b" / "val.bin").read_bytes()[:4] == (20240801).to_bytes(4, "little")


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", b"", "empty"),
    ("blank.txt", None, "empty"),
    ("binary.txt", b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)) * 4, "binary"),
    ("latin1.txt", "caf\u00e9 na\u00efve ".encode("latin-1") * 10, "UTF-8"),
    ("missing.txt", None, "no such file"),
    ("emptydir", None, "no .txt files"),
], ids=["empty", "folder-of-empty", "binary", "latin1", "missing", "empty-folder"])
def test_bad_input_is_one_line_error(tmp_path, capsys, name, content, message):
    p = tmp_path / name
    if name == "emptydir":
        p.mkdir()
    elif content is not None:
        p.write_bytes(content)
    elif name == "blank.txt":
        (tmp_path / "blank.txt").mkdir()
        p = tmp_path / "blank.txt"
        (p / "a.txt").write_bytes(b"")
    vocab = ["--vocab", str(data_file("gpt2.tiktoken"))] if message in ("binary", "UTF-8") else []  # read with BPE
    rc = main(["prepare", str(p), "--out", str(tmp_path / "out"), *vocab])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and message in err and "\n" not in err and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.bin")) if (tmp_path / "out").exists() else True


def test_utf8_error_reports_byte_offset_across_chunks(tmp_path, monkeypatch):
    p = tmp_path / "t.txt"
    p.write_bytes("é".encode() * 3000 + b"\xff" + b"tail")
    monkeypatch.setattr(prep, "CHUNK_BYTES", 1001)  # odd: cuts through a 2-byte character
    with pytest.raises(prep.GptkitError, match=r"byte 6000\)"):
        list(prep.iter_text(p, chunk_bytes=1001))


def test_bad_options_are_one_line_errors(tmp_path, capsys, gpt2_vocab_path):
    src = tmp_path / "t.txt"
    src.write_text("hello world " * 100)
    for args in (["--shard-size", "0"], ["--val-fraction", "1.5"], ["--tokenizer", "bpe"]):
        assert main(["prepare", str(src), "--out", str(tmp_path / "o"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi")
    assert main(["prepare", str(tiny), "--out", str(tmp_path / "o"), "--vocab", str(gpt2_vocab_path)]) == 2
    assert "too short" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- memory

_RSS_SCRIPT = """
import resource, sys
from gptkit.prepare import prepare
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
prepare(sys.argv[1], out=sys.argv[2], progress=False)  # warm up: imports, tokenizer, thread pool
base = peak()
prepare(sys.argv[3], out=sys.argv[4], shard_size=50_000_000, progress=False)
print(base, peak())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
@pytest.mark.parametrize("mb", [pytest.param(4, id="4MB"), pytest.param(400, id="400MB", marks=pytest.mark.slow)])
def test_large_text_streams_in_bounded_memory(tmp_path, gpt2_vocab_path, mb):
    """Peak RSS does not grow with the corpus: preparing a big text after a tiny one in the same
    process raises the peak by a few chunks' worth, not by the corpus.
    (Held in memory, 4 MB of text is ~1M tokens: ~40 MB as Python ints; 400 MB would be GBs.)"""
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    write_words(small, 20_000)
    write_words(big, mb * 1_000_000, seed=1)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(small), str(tmp_path / "o1"), str(big),
                        str(tmp_path / "o2")], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr
    base, peak = map(float, r.stdout.split()[-2:])
    print(f"peak RSS: {base:.0f} MiB after 20 kB of text, {peak:.0f} MiB after {mb} MB more")
    assert peak - base < 40, (base, peak)
    meta = json.loads((tmp_path / "o2" / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] > mb * 150_000
