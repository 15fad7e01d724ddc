"""`gptkit tokenizer train TEXT_OR_DIR... --vocab-size N --out DIR`: a byte-level BPE of your own.

The trainer is the `tokenizers` library's BpeTrainer (nothing hand-written), set up as GPT-2's
tokenizer is: GPT-2's pre-tokenisation regex, the 256-byte alphabet (so any text encodes and
decodes exactly), `<|endoftext|>` as the one special token. The text streams through the trainer
in chunks (prepare.iter_text), so memory stays bounded by the trainer's word counts, not by the
corpus. DIR receives tokenizer.json and tokenizer_config.json (transformers' AutoTokenizer loads
it); `gptkit prepare TEXT --vocab DIR/tokenizer.json` then tokenizes with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm

from gptkit.errors import GptkitError, make_dir
from gptkit.prepare import bpe_pieces, iter_text, text_documents
from gptkit.tokenizer import HFTokenizer, gpt2_tokenizer, save_tokenizer

SPECIALS = ("<|endoftext|>",)
N_BYTES = 256


@dataclass
class TrainResult:
    out: Path
    vocab_size: int
    files: list[Path] = field(default_factory=list)
    bytes: int = 0
    tokens: int = 0
    gpt2_tokens: int | None = None  # None when GPT-2's vocabulary is not at hand

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)

    @property
    def gpt2_bytes_per_token(self) -> float | None:
        return None if self.gpt2_tokens is None else self.bytes / max(self.gpt2_tokens, 1)


def text_files(sources: list[str | Path]) -> list[Path]:
    """Each source: a text file, or a folder whose .txt files are taken (sorted)."""
    if not sources:
        raise GptkitError("no text given", "TEXT_OR_DIR", "give text files or folders of .txt files")
    files = []
    for s in sources:
        files += text_documents(Path(s))
    return files


def iter_corpus(files: list[Path], progress=None) -> Iterator[str]:
    """The corpus as text pieces of bounded size, file after file, cut where GPT-2's pre-tokeniser
    splits anyway (prepare.bpe_pieces), so no word is cut in two."""
    for f in files:
        yield from bpe_pieces(iter_text(f, progress=progress))


MAX_VOCAB = 1 << 20  # vocabularies above uint16 are written as uint32 shards; this bounds the trainer's memory


def build_trainer_tokenizer():
    """An empty byte-level BPE laid out as GPT-2's (pre-tokeniser, decoder, post-processor)."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return tk


def train_tokenizer(sources: list[str | Path], vocab_size: int, out: str | Path, min_frequency: int = 2,
                    compare_gpt2: bool = True, progress: bool = True) -> TrainResult:
    """Train a byte-level BPE of `vocab_size` tokens (specials included) on the text of `sources`
    and write it into `out`. Then measure bytes per token on the same corpus, for it and (when
    its vocabulary is at hand) GPT-2's BPE."""
    least = N_BYTES + len(SPECIALS)
    if vocab_size < least:
        raise GptkitError(f"vocab size {vocab_size} is below the {N_BYTES} bytes + {len(SPECIALS)} special token",
                          "--vocab-size", f"give at least {least}")
    if vocab_size > MAX_VOCAB:  # the BPE trainer allocates per token up front: an absurd size aborts the process
        raise GptkitError(f"vocab size {vocab_size:,} is above {MAX_VOCAB:,}", "--vocab-size",
                          f"give at most {MAX_VOCAB} (Llama 3 has 128,256 tokens, Gemma 256,000)")
    files = text_files(sources)
    total = sum(f.stat().st_size for f in files)
    if total == 0:
        raise GptkitError("the text is empty", ", ".join(map(str, sources)), "give files with some text in them")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GptkitError("output exists and is not a directory", out, "choose another --out")

    tk = build_trainer_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    with tqdm(total=total, unit="B", unit_scale=True, desc="training", leave=False, disable=not progress,
              delay=1.0) as bar:
        tk.train_from_iterator(iter_corpus(files, bar), trainer=trainer)
    tok = HFTokenizer(tk.to_str(), {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0],
                                    "eos_token": SPECIALS[0], "unk_token": SPECIALS[0],
                                    "clean_up_tokenization_spaces": False}, str(out / "tokenizer.json"))
    make_dir(out, "--out")
    res = TrainResult(out, tok.vocab_size, save_tokenizer(tok, out))

    gpt2 = None
    if compare_gpt2:
        try:
            gpt2 = gpt2_tokenizer()
        except GptkitError:
            gpt2 = None
    res.gpt2_tokens = 0 if gpt2 is not None else None
    with tqdm(total=total, unit="B", unit_scale=True, desc="measuring", leave=False, disable=not progress,
              delay=1.0) as bar:
        for chunk in iter_corpus(files, bar):
            res.bytes += len(chunk.encode("utf-8"))
            res.tokens += len(tok.encode_ordinary(chunk))
            if gpt2 is not None:
                res.gpt2_tokens += len(gpt2.encode(chunk))
    return res
