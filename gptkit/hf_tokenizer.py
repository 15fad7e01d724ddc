"""A Hugging Face `tokenizer.json` (+ tokenizer_config.json) through the `tokenizers` library, and
the tokenizer files gptkit writes for transformers.

HFTokenizer reads any tokenizer.json (Llama 2's SentencePiece-style BPE with byte fallback, Llama
3's tiktoken-style BPE, byte-level BPEs): no BPE is written here. Encoding and decoding follow
transformers' PreTrainedTokenizerFast (special tokens and add_bos_token from tokenizer_config.json).
gpt2_hf_files / char_hf_files build the HF files of GPT-2's BPE and of a char vocabulary with
`tokenizers`, for `convert --to hf` and runs that carry their tokenizer (tokenizer.save_tokenizer).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from gptkit.errors import GptkitError

EOT_TEXT = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (OpenAI's encoder.py): the printable
    Latin-1 bytes stand for themselves, the other 68 bytes map to chr(256), chr(257), ... in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    out, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: deep nesting
        raise GptkitError(f"not valid JSON: {e}", path, "the file is damaged; fetch it again") from None


SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(v) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class HFTokenizer:
    """A Hugging Face tokenizer.json (+ tokenizer_config.json) through the `tokenizers` library.

    encode(text) equals transformers' `AutoTokenizer.encode(text, add_special_tokens=False)`:
    special-token text in `text` (e.g. a rendered chat template's `<|im_start|>`) becomes the
    special token. encode(text, add_special_tokens=True) adds bos/eos as AutoTokenizer does
    (tokenizer_config's add_bos_token/add_eos_token when given, else tokenizer.json's own
    post-processor). encode_ordinary(text) treats special-token text as plain text (prepare).
    decode(ids) equals AutoTokenizer.decode(ids)."""

    kind = "hf"

    def __init__(self, tokenizer_json: str, config: dict | None = None, source: str = "",
                 chat_template=None, generation_eos: Iterable[int] = ()):
        self.json_text = tokenizer_json
        self.config = dict(config or {})
        self.source = source
        try:
            self.tk = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises its own exception type for bad files
            raise GptkitError(f"cannot read tokenizer.json: {e}", source or "tokenizer.json",
                              "give a tokenizer.json that transformers/tokenizers can load") from None
        self.spec = json.loads(tokenizer_json)
        self.special = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(self.config.get(k))) is not None}
        if "add_bos_token" in self.config or "add_eos_token" in self.config:
            self._set_post_processor(bool(self.config.get("add_bos_token")), bool(self.config.get("add_eos_token")))
        self.tk.encode_special_tokens = bool(self.config.get("split_special_tokens", False))
        self._plain = None  # a copy that reads special-token text as text, made on first use
        self.bos = self._id(self.special.get("bos_token"))
        self.eos = self._id(self.special.get("eos_token"))
        # the document separator / end of text: GPT-2-style <|endoftext|> if the vocab has one, else eos
        self.eot = self._id(EOT_TEXT) if self._id(EOT_TEXT) is not None else self.eos
        self.generation_eos = [int(i) for i in generation_eos]
        self.chat_template = chat_template
        self._bytes: dict[int, bytes] = {}
        self._added = {t.content for t in self.tk.get_added_tokens_decoder().values()}
        self._kinds = self._decoder_kinds()
        self._n = max(self.tk.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def _id(self, text: str | None) -> int | None:
        return None if text is None else self.tk.token_to_id(text)

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """transformers' rule: an explicit add_bos_token/add_eos_token rebuilds the post-processor."""
        bos, eos = self.special.get("bos_token"), self.special.get("eos_token")
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        specials = [(t, self.tk.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        self.tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (ids of added tokens included)."""
        return self._n

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generation: eos, generation_config's eos_token_id, and the chat template's
        end-of-turn tokens (e.g. <|im_end|>, <|eot_id|>)."""
        ids = [i for i in (self.eos, *self.generation_eos) if i is not None]
        if self.chat_template is not None:
            ids += [i for t in self.chat_template.end_of_turn_tokens() if (i := self._id(t)) is not None]
        return list(dict.fromkeys(ids))

    def token_to_id(self, text: str) -> int | None:
        return self._id(text)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_ordinary(self, text: str) -> list[int]:
        if self._plain is None:
            plain = Tokenizer.from_str(self.tk.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        text = self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.config.get("clean_up_tokenization_spaces") and self.spec.get("model", {}).get("type") != "BPE":
            # transformers' clean-up (it skips BPE models, whose spaces it would corrupt)
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def _decoder_kinds(self) -> set[str]:
        def walk(d):
            if not isinstance(d, dict):
                return
            yield d.get("type")
            for sub in d.get("decoders") or ():
                yield from walk(sub)
        return set(walk(self.spec.get("decoder")))

    def token_bytes(self, i: int) -> bytes:
        """The bytes token i stands for inside a text, so that concatenating them streams the
        continuation (byte-level BPE: GPT-2's byte alphabet; SentencePiece-style: `▁` is a space
        and <0xNN> is byte NN). Special and added tokens stand for their own text."""
        b = self._bytes.get(i)
        if b is not None:
            return b
        tok = self.tk.id_to_token(i)
        kinds = self._kinds
        if tok is None:
            b = b""
        elif tok in self._added:
            b = tok.encode("utf-8")
        elif "ByteLevel" in kinds:
            dec = _unicode_to_bytes()
            b = bytes(dec[c] for c in tok) if all(c in dec for c in tok) else tok.encode("utf-8")
        elif "ByteFallback" in kinds or "Metaspace" in kinds or "Replace" in kinds:
            if "ByteFallback" in kinds and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                b = bytes([int(tok[3:5], 16)])
            else:
                b = tok.replace("\u2581", " ").encode("utf-8")
        else:
            b = self.decode([i]).encode("utf-8")
        self._bytes[i] = b
        return b

    @property
    def prepends_space(self) -> bool:
        """Whether the tokenizer adds a `▁` before the text (SentencePiece style): then a text cut in
        pieces at " word" encodes equally when each piece drops that one space."""
        norm, pre = json.dumps(self.spec.get("normalizer")), self.spec.get("pre_tokenizer") or {}
        if '"Prepend"' in norm:
            return True
        subs = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
        return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" for p in subs)


_U2B: dict[str, int] | None = None


def _unicode_to_bytes() -> dict[str, int]:
    global _U2B
    if _U2B is None:
        _U2B = {c: b for b, c in bytes_to_unicode().items()}
    return _U2B


def read_tokenizer_config(d: Path) -> dict:
    f = d / "tokenizer_config.json"
    if not f.is_file():
        return {}
    cfg = read_json(f)
    if not isinstance(cfg, dict):
        raise GptkitError("expected a JSON object", f, "the file is damaged")
    return cfg


def generation_eos(d: Path) -> list[int]:
    f = d / "generation_config.json"
    if not f.is_file():
        return []
    v = read_json(f).get("eos_token_id") if isinstance(read_json(f), dict) else None
    return [v] if isinstance(v, int) else [i for i in v if isinstance(i, int)] if isinstance(v, list) else []


def hf_document_ids(tok: HFTokenizer, pieces):
    """The token ids of one document given as text pieces cut where the pre-tokeniser splits
    anyway (prepare.bpe_pieces), special-token text read as plain text. The document starts with
    bos where the tokenizer adds one (Llama), else with <|endoftext|> / eos (GPT-2 style).
    SentencePiece-style tokenizers (a `▁` prepended to the text) are cut only before " word",
    and the piece drops that space, for which the prepended `▁` stands."""
    adds_bos = tok.bos is not None and tok.encode("a", add_special_tokens=True)[:1] == [tok.bos]
    start = tok.bos if adds_bos else tok.eot
    if start is None:
        raise GptkitError("the tokenizer has no <|endoftext|>, eos or bos token to start documents with",
                          tok.source or "--vocab", "train one with `gptkit tokenizer train` (it has <|endoftext|>)")
    first, buf, sentencepiece = True, "", tok.prepends_space
    for piece in pieces:
        if first:
            yield [start]
            first = False
        if not sentencepiece:
            yield tok.encode_ordinary(piece)
        elif buf and piece.startswith(" "):
            yield tok.encode_ordinary(buf)
            buf = piece[1:]
        else:
            buf += piece
    if buf:
        yield tok.encode_ordinary(buf)


def gpt2_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list behind BPE ranks, in rank order: for each multi-byte token, the two parts
    that byte-pair encoding with only the lower-ranked merges leaves it in."""
    out = []
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        parts = [tok[i:i + 1] for i in range(len(tok))]
        while len(parts) > 2:
            scores = [ranks.get(parts[j] + parts[j + 1], r) for j in range(len(parts) - 1)]
            j = min(range(len(scores)), key=scores.__getitem__)
            if scores[j] >= r:
                break
            parts[j:j + 2] = [parts[j] + parts[j + 1]]
        if len(parts) != 2:
            raise GptkitError(f"token {tok!r} (rank {r}) is not the merge of two lower-ranked tokens", "vocabulary",
                              "the vocabulary is not a BPE")
        out.append((parts[0], parts[1]))
    return out


def gpt2_hf_files(ranks: dict[bytes, int], max_length: int | None) -> tuple[str, dict, dict, list[str]]:
    """GPT-2's tokenizer.json, tokenizer_config.json, vocab.json and merges.txt lines, built with
    `tokenizers` from the GPT-2 BPE ranks (as transformers' GPT2TokenizerFast would hold them)."""
    b2u = bytes_to_unicode()

    def u(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {u(b): i for b, i in ranks.items()}
    merges = [(u(a), u(b)) for a, b in gpt2_merges(ranks)]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.add_special_tokens([AddedToken(EOT_TEXT, special=True, normalized=False)])
    cfg = {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT,
           "add_prefix_space": False, "add_bos_token": False, "clean_up_tokenization_spaces": False}
    if max_length:
        cfg["model_max_length"] = max_length
    return tk.to_str(), cfg, {**vocab, EOT_TEXT: len(ranks)}, ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]


def char_hf_files(chars: list[str], max_length: int | None) -> tuple[str, dict]:
    """A tokenizer.json mapping each character to its id: a BPE with no merges splits the text
    into characters, and the Fuse decoder joins them back without spaces."""
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tk.decoder = decoders.Fuse()
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if max_length:
        cfg["model_max_length"] = max_length
    return tk.to_str(), cfg


def write_text(path: Path, text: str) -> Path:
    """Write atomically (temporary name, then rename), with the umask's permissions."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
