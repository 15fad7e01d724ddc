"""`gptkit convert SRC DST --to gptkit|hf|llmc|llmc-bf16|peft|gguf`: any loadable model into any format.

SRC is anything gptkit.loading recognises. The targets:
- gptkit: a run directory DST holding one checkpoint (model.safetensors + state.json), which
  carries the config and, for a char model, its vocabulary;
- hf: a directory transformers loads (config.json + model.safetensors), plus the model's tokenizer
  as Hugging Face files, so AutoTokenizer and pipeline("text-generation") work on it;
- llmc / llmc-bf16: a directory with llm.c's model.bin (v3 fp32 / v5 bf16) and tokenizer.bin
  (GPT-2's BPE for a 50257-token model, the char vocab for a char model);
- peft: a LoRA run's adapters for `peft.PeftModel.from_pretrained(base, DST)` (gptkit/formats/peft.py).
  From a LoRA run every other target writes the merged model.
- gguf: a llama.cpp .gguf file DST (`--dtype f32|f16|q8_0`) with the model's tokenizer (formats/gguf.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptkit import lora
from gptkit.checkpoint import find_checkpoint, read_state, save_checkpoint
from gptkit.config import GPT2_EOT, GPT2_VOCAB_SIZE
from gptkit.errors import GptkitError, make_dir
from gptkit.formats import gguf, llmc
from gptkit.formats.hf import save_hf
from gptkit.formats.peft import write_peft
from gptkit.hf_tokenizer import gpt2_hf_files
from gptkit.loading import load_checkpoint_model, load_model
from gptkit.tokenizer import gpt2_tokenizer, save_tokenizer, tokenizer_for

TARGETS = ("gptkit", "hf", "llmc", "llmc-bf16", "peft", "gguf")
HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "encoder.json", "vocab.bpe")


@dataclass
class ConvertResult:
    dst: Path
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def llmc_tokenizer_for(loaded, vocab: str | Path | None = None):
    """The tokenizer.bin content for a loaded model, or None where it has no tokenizer of its own."""
    if loaded.chars:
        return llmc.char_tokenizer(loaded.chars)
    if loaded.model.config.vocab_size != GPT2_VOCAB_SIZE:
        return None
    tok = gpt2_tokenizer(vocab, loaded.tokenizer_dir)
    return llmc.LlmcTokenizer([tok.token_bytes(i) for i in range(GPT2_VOCAB_SIZE)], tok.eot, 2)


def hf_tokenizer_files(loaded, dst: Path, vocab: str | Path | None, notes: list[str]) -> list[Path]:
    """The model's tokenizer as Hugging Face files in dst (tokenizer.save_tokenizer): GPT-2's
    vocab.json + merges.txt + tokenizer.json + tokenizer_config.json, a char model's
    tokenizer.json mapping each character, or the model's own tokenizer.json (+ chat template)."""
    try:
        tok = tokenizer_for(loaded, vocab)
    except GptkitError as e:  # no tokenizer gptkit can read: copy the source's files as they are
        tdir, files = loaded.tokenizer_dir, []
        if tdir is not None and Path(tdir).is_dir() and Path(tdir).resolve() != dst.resolve():
            for name in HF_TOKENIZER_FILES:
                if (Path(tdir) / name).is_file():
                    shutil.copyfile(Path(tdir) / name, dst / name)
                    files.append(dst / name)
        if not files:
            notes.append(f"no tokenizer files: {e.what}")
        return files
    files = save_tokenizer(tok, dst, max_length=loaded.model.config.block_size)
    gen = dst / "generation_config.json"
    if tok.stop_ids and not gen.exists():  # transformers' generate() then stops where gptkit's does
        ids = tok.stop_ids
        cfg = {"eos_token_id": ids[0] if len(ids) == 1 else ids}
        if tok.bos is not None:
            cfg["bos_token_id"] = tok.bos
        gen.write_text(json.dumps(cfg, indent=2) + "\n")
        files.append(gen)
    return files


def _carry_hf_tokenizer(loaded, dst: Path, vocab) -> list[Path]:
    """A gptkit run converted from a model with a tokenizer.json of its own carries it (GPT-2 BPE
    and char models need none: 50257 ids mean GPT-2's, and the checkpoint holds the chars)."""
    try:
        tok = tokenizer_for(loaded, vocab)
    except GptkitError:
        return []
    return save_tokenizer(tok, dst, loaded.model.config.block_size) if tok.kind == "hf" else []


def export_peft(src: str | Path, dst: Path) -> list[Path]:
    """A LoRA run's (or checkpoint's) adapters in PEFT's format."""
    ckpt = find_checkpoint(src) if Path(src).is_dir() else None
    info = read_state(ckpt).get("lora") if ckpt is not None else None
    if info is None:
        raise GptkitError("not a LoRA run: there are no adapters to export", src,
                          "give a run trained with lora_rank > 0; other models export with --to hf")
    loaded = load_checkpoint_model(ckpt, merge=False)
    return write_peft(loaded.model, lora.adapter_tensors(loaded.model), lora.LoraSpec.from_dict(info), info["base"],
                      dst)


def convert(src: str | Path, dst: str | Path, to: str, vocab: str | Path | None = None,
            force: bool = False, dtype: str = "f32") -> ConvertResult:
    """Load SRC and write it to DST in format `to` (one of TARGETS). A DST that exists and is not
    empty is refused unless `force`; then the new directory replaces it whole (written beside it,
    then swapped in), so two models' files never mix. `dtype` is GGUF's weight type."""
    if to not in TARGETS:
        raise GptkitError(f"unknown target format {to!r}", "--to", f"use one of {', '.join(TARGETS)}")
    if to == "gguf":
        return export_gguf(src, Path(dst), dtype, vocab, force)
    final = Path(dst)
    if final.exists() and not final.is_dir():
        raise GptkitError("destination exists and is not a directory", final, "give a directory path")
    if final.is_dir() and any(final.iterdir()):
        if not force:
            raise GptkitError("destination directory exists and is not empty", final,
                              "give a new directory, or --force to replace it (its files are removed)")
        if Path(src).exists() and _overlaps(Path(src), final):
            raise GptkitError("--force would remove the model being converted", final, "give another DST")
    if to == "peft":
        return ConvertResult(final, export_peft(src, final))
    loaded = load_model(src)
    make_dir(final.parent, "DST")
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))  # on DST's file system
    try:
        res = _write(loaded, src, work, to, vocab)
        os.chmod(work, 0o777 & ~_umask())  # mkdtemp makes it 0700; DST gets the usual mode
        _swap_in(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    res.dst = final
    res.files = [final / f.relative_to(work) for f in res.files]
    return res


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents or a in b.parents


def _swap_in(new: Path, final: Path) -> None:
    """Put directory `new` at `final`: a rename, with a previous `final` moved aside first and removed after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(new, final)
    except OSError:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write(loaded, src, dst: Path, to: str, vocab) -> ConvertResult:
    model, config = loaded.model, loaded.model.config
    if to.startswith("llmc") and config.family != "gpt2":
        raise GptkitError(f"llm.c's model.bin holds GPT-2 only, not a {config.family} model", "--to",
                          "convert it --to hf or --to gptkit")
    res = ConvertResult(dst)

    if to == "gptkit":
        state = {"model_config": config.to_dict(), "converted_from": str(src)}
        if loaded.chars:
            state["chars"] = loaded.chars
        ckpt = save_checkpoint(dst, int(loaded.state.get("step", 0)), model, state)
        res.files += sorted(ckpt.iterdir())
        res.files += _carry_hf_tokenizer(loaded, dst, vocab)
    elif to == "hf":
        res.files += save_hf(model, dst)  # config.json + model.safetensors, or shards and their index
        res.files += hf_tokenizer_files(loaded, dst, vocab, res.notes)
    else:
        make_dir(dst, "DST")
        dtype = torch.bfloat16 if to == "llmc-bf16" else torch.float32
        llmc.write_model(dst / "model.bin", model.state_dict(), config, dtype)
        res.files.append(dst / "model.bin")
        if to == "llmc-bf16":
            res.notes.append("model.bin is version 5 (bf16): it loads in llm.c's CUDA trainer, not train_gpt2.c")
        tok = llmc_tokenizer_for(loaded, vocab)
        if tok is None:
            res.notes.append(f"no tokenizer.bin: the model has vocab_size {config.vocab_size} and no tokenizer "
                             "of its own")
        else:
            llmc.write_tokenizer(dst / "tokenizer.bin", tok)
            res.files.append(dst / "tokenizer.bin")
    return res


def export_gguf(src: str | Path, dst: Path, dtype: str, vocab: str | Path | None = None,
                force: bool = False) -> ConvertResult:
    """`--to gguf`: SRC as one .gguf file with its tokenizer's metadata (llama.cpp's gpt2 BPE)."""
    if dtype not in gguf.EXPORT_DTYPES:
        raise GptkitError(f"unsupported GGUF dtype {dtype!r}", "--dtype", f"use one of {', '.join(gguf.EXPORT_DTYPES)}")
    if dst.is_dir():
        raise GptkitError("destination is a directory", dst, "give a file path such as model.gguf")
    if dst.exists() and not force:
        raise GptkitError("destination file exists", dst, "give a new file name, or --force to replace it")
    loaded = load_model(src)
    res = ConvertResult(dst)
    meta = gguf_tokenizer_for(loaded, vocab)
    if meta is None:
        res.notes.append("no tokenizer in the GGUF file: the model has no byte-level BPE tokenizer "
                         "(a char vocabulary has no llama.cpp equivalent)")
    gguf.write_gguf(dst, loaded.model, dtype, meta, name=Path(str(src)).name)
    res.files.append(dst)
    return res


def gguf_tokenizer_for(loaded, vocab: str | Path | None = None) -> dict | None:
    """The GGUF tokenizer metadata of a loaded model's tokenizer (tokenizer_for's: `--vocab`, a GGUF
    source's own, a tokenizer.json beside the model, or GPT-2's BPE), or None for a char model."""
    tok = tokenizer_for(loaded, vocab)
    if tok.kind == "char":
        return None
    if tok.kind == "gpt2":
        spec = json.loads(gpt2_hf_files({tok.token_bytes(i): i for i in range(GPT2_EOT)}, None)[0])
        bos = eos = tok.eot
        add_bos = False
    else:
        spec, bos, eos = tok.spec, tok.bos, tok.eos if tok.eos is not None else tok.eot
        add_bos = bool(tok.config.get("add_bos_token", tok.encode("a", add_special_tokens=True)[:1] == [bos]))
    template = tok.chat_template.source if tok.chat_template is not None else None
    return gguf.tokenizer_metadata(spec, loaded.model.config.vocab_size, bos, eos, add_bos, template,
                                   tok.source if tok.kind == "hf" else "tokenizer")
