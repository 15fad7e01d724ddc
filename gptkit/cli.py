"""`gptkit <subcommand>`: a thin argparse layer. Each subcommand parses its options and calls one
library function; user errors (GptkitError) become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
from pathlib import Path

# modules, not their functions: a runner looks its library function up when it runs (tests patch them)
from gptkit import (__version__, bench, chat, config, convert, data, evaluate, inference, plot, prepare, runs, serve,
                    sft, tasks, tokenizer_train, train, validate)
from gptkit.errors import GptkitError


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so bad options get the one-line error too."""

    def error(self, message):
        raise GptkitError(message, self.prog, f"see `{self.prog} --help`")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps epilogs as written and adds "(default: X)" to options that have a default worth showing."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if (action.option_strings and "default" not in h and d not in (None, False, [], argparse.SUPPRESS)
                and action.nargs != 0):
            h += " (default: %(default)s)"
        return h


# Each subcommand registers itself here: name -> (add_arguments(parser), run(args) -> int | None).
COMMANDS: dict[str, tuple] = {}


def command(name: str, help: str):
    def deco(fn):
        COMMANDS[name] = (fn, help)
        return fn
    return deco


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gptkit", description="Train, fine-tune, validate and sample GPT-2 models.")
    p.add_argument("--version", action="version", version=f"gptkit {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="<subcommand>", parser_class=_Parser)
    for name, (fn, help) in COMMANDS.items():
        sp = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        run = fn(sp)
        for action in sp._actions:  # options without a help text still show their default
            if action.help is None and action.option_strings and action.default not in (None, False, []):
                action.help = "default: %(default)s"
        sp.set_defaults(_run=run)
    return p


def entry() -> None:
    """The `gptkit` command (and `python -m gptkit`): `main`, then the process exit. A training run
    exits without Python's interpreter teardown, which takes ~0.8 s once torch.optim has loaded
    torch._dynamo, all of it inside `time gptkit train` and so inside the run's budget: by then every
    file is closed and every logger finished. Under coverage (CI measures subprocesses) the normal
    exit runs, so the coverage data is written."""
    argv = sys.argv[1:]
    rc = main(argv)
    if argv[:1] == ["train"] and "coverage" not in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        # key=value overrides may sit anywhere, also after options (`train --out R lr=1e-3`):
        # argparse leaves those it could not place as extras
        args, extras = parser.parse_known_args(argv)
        if extras:
            if hasattr(args, "overrides") and all(re.match(r"^[A-Za-z_][\w-]*=", x) for x in extras):
                args.overrides = list(args.overrides or []) + extras
            else:
                raise GptkitError(f"unrecognized arguments: {' '.join(extras)}", f"gptkit {args.cmd or ''}".strip(),
                                  f"see `gptkit {args.cmd + ' ' if args.cmd else ''}--help`")
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2 if not argv else 0
        rc = args._run(args)
        return int(rc or 0)
    except GptkitError as e:
        runtime = sys.modules.get("gptkit.runtime")  # not imported yet: not a torchrun job's trainer
        if runtime is None or runtime.is_main_process():  # under torchrun the error is said once
            print(e.line(), file=sys.stderr)
        return 2
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------
# Subcommands. Each function adds its options to `p` and returns the function that runs it.


@command("prepare", "tokenize a preset or text into llm.c token shards + meta.json; `prepare chat` for SFT data")
def _prepare(p):
    p.add_argument("source", metavar="PRESET_OR_PATH",
                   help="shakespeare-char, shakespeare, a text file or a folder of .txt files; "
                        "or `chat FILE.jsonl --model M` (instruction-tuning data, see gptkit/sft.py)")
    p.add_argument("chat_file", nargs="?", metavar="FILE.jsonl", help="with `chat`: one conversation per line")
    p.add_argument("--model", help="with `chat`: the model whose tokenizer and chat template render the data")
    p.add_argument("--block-size", type=int, help="with `chat`: tokens per row (default: the model's context)")
    p.add_argument("--tokenizer", choices=["char", "gpt2"], help="default: char for shakespeare-char, else gpt2")
    p.add_argument("--input", help="text file to use instead of finding/downloading the preset's text")
    p.add_argument("--out", help="output directory (default: data/<name>)")
    p.add_argument("--shard-size", type=int, default=100_000_000, help="tokens per shard (default 1e8)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of tokens for val (default 0.1)")
    p.add_argument("--vocab", help="GPT-2 vocabulary file or directory")

    def run(a):
        if a.source == "chat":
            if not a.chat_file or not a.model or not a.out:
                raise GptkitError("`prepare chat` needs FILE.jsonl, --model and --out", "prepare chat",
                                  "gptkit prepare chat FILE.jsonl --model M --out DIR")
            out = sft.prepare_chat(a.chat_file, a.model, a.out, a.block_size, a.val_fraction, a.vocab)
            m = data.read_meta(out)
            print(f"wrote {out}: {m['train_rows']:,} train and {m['val_rows']:,} val conversations of "
                  f"{m['row_tokens']} tokens, {m['assistant_tokens']:,} assistant tokens")
            return
        if a.chat_file:
            raise GptkitError(f"unexpected argument {a.chat_file!r}", "prepare", "only `prepare chat` takes a FILE")
        out = prepare.prepare(a.source, a.tokenizer, a.input, a.out, a.shard_size, a.val_fraction, a.vocab)
        m = data.read_meta(out)
        print(f"wrote {out}: {m['train_tokens']:,} train and {m['val_tokens']:,} val tokens "
              f"({m['tokenizer']}, vocab {m['vocab_size']})")
    return run


@command("train", "train or fine-tune a GPT-2 model (default: char-level tiny Shakespeare on CPU)")
def _train(p):
    p.epilog = config.config_help()
    p.add_argument("--config", help="TOML file of training keys (a [model] table for architecture keys)")
    p.add_argument("--model", help="architecture: a preset (gpt2, gpt2-medium, ..., shakespeare-char) or a model path")
    p.add_argument("--init", help="weights: scratch, gpt2, gpt2-medium, gpt2-large, gpt2-xl or a model path")
    p.add_argument("--data", help="prepared data directory (default: prepare the dataset preset)")
    p.add_argument("--out", help="run directory (default: a new runs/<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any training or model key (listed below)")

    def run(a):
        ov = config.parse_overrides(a.overrides)
        for k in ("model", "init", "data", "out", "threads"):
            v = getattr(a, k)
            if v is not None:
                if k in ov:
                    raise GptkitError(f"--{k} and {k}= both given", f"--{k}", "give it once")
                ov[k] = str(v)
        changes = None
        if a.resume:  # the run's own settings, with the keys that may change mid-run changed
            cfg, model_ov, changes = runs.resume_run_config(a.out, a.config, ov)
        else:
            cfg, model_ov = config.resolve_config(a.config, ov)
        res = train.train(cfg, model_ov, resume=a.resume, changes=changes)
        if res.stopped_by:  # the shell's code for a process ended by that signal
            return 128 + int(getattr(signal, res.stopped_by))
        return 0
    return run


@command("sample", "generate text from a model, printing it as it comes")
def _sample(p):
    p.add_argument("--model", required=True, help="run/checkpoint/HF directory, llm.c .bin or pretrained name")
    p.add_argument("--prompt", default="", help="text to continue (default: start of text)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="sample i uses seed + i")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--vocab", help="GPT-2 vocabulary file or directory")
    p.add_argument("--device", default="auto")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (not printed); repeatable")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (CTRL)")
    p.add_argument("--num-beams", type=int, default=1, help="> 1 = beam search (deterministic)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score / length**penalty")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"],
                   help="weight precision for inference (weight-only)")
    p.add_argument("--truncate", action="store_true", help="cut a too-long prompt to its last tokens (warns)")
    p.add_argument("--speculative", choices=["ngram"], default=None,
                   help="speculative decoding by prompt lookup (same output, fewer model passes on repeats)")
    p.add_argument("--draft-model", help="speculative decoding with this smaller model (same tokenizer)")
    p.add_argument("--draft-k", type=int, default=4, help="tokens drafted per step (speculative decoding)")

    def run(a):
        inference.run_sample(a.model, a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed, a.num_samples,
                   a.vocab, a.device, stop=a.stop, repetition_penalty=a.repetition_penalty, num_beams=a.num_beams,
                   length_penalty=a.length_penalty, dtype=a.dtype, truncate=a.truncate,
                   speculative=a.speculative, draft_model=a.draft_model, draft_k=a.draft_k)
    return run


@command("chat", "chat with a model in the terminal, through its chat template")
def _chat(p):
    p.add_argument("--model", required=True, help="run/checkpoint/HF directory, GGUF file or pretrained name")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template (or tokenizer_config.json) instead of the model's own")
    p.add_argument("--system", default=None, help="a system message at the start of the conversation")
    p.add_argument("--max-new-tokens", type=int, default=512, help="per reply")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="reply i uses seed + i")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (CTRL)")
    p.add_argument("--vocab", help="tokenizer.json or GPT-2 vocabulary file or directory")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"],
                   help="weight precision for inference (weight-only)")

    def run(a):
        chat.run_chat(a.model, a.vocab, a.chat_template, a.system, a.max_new_tokens, a.temperature, a.top_k, a.top_p,
                      a.seed, a.repetition_penalty, a.device, a.dtype)
    return run


@command("eval", "loss, perplexity and bits per byte over a val split, or a multiple-choice task (HellaSwag)")
def _eval(p):
    p.add_argument("--model", required=True, help="run/checkpoint/HF directory, llm.c .bin or pretrained name")
    p.add_argument("--data", help="prepared data directory: loss, perplexity and bits per byte over its split")
    p.add_argument("--task", choices=["hellaswag", "mc"],
                   help="multiple-choice task: hellaswag (llm.c's scoring) or mc (a jsonl of context/choices/label)")
    p.add_argument("--data-file", help="the task's jsonl (default for hellaswag: found or downloaded)")
    p.add_argument("--limit", type=int, help="score only the first N items")
    p.add_argument("--json", action="store_true", help="print one JSON object {task, n, acc, acc_norm}")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=None, help="window length (default: the model's context)")
    p.add_argument("--vocab", help="GPT-2 vocabulary file or directory")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")

    def run(a):
        if (a.data is None) == (a.task is None):
            raise GptkitError("give either --data DIR or --task NAME", "gptkit eval",
                              "--data for loss/perplexity/bits per byte, --task hellaswag|mc for a benchmark")
        if a.task:
            res = tasks.run_task(a.model, a.task, a.data_file, a.limit, a.device, a.dtype, a.vocab)
            if res.truncated:
                print(f"note: {res.truncated:,} of {res.n:,} contexts were cut from the left to fit the model's "
                      "context", file=sys.stderr)
            print(json.dumps(res.to_json()) if a.json else res.summary())
            return
        if a.data_file or a.limit is not None or a.json:
            raise GptkitError("--data-file, --limit and --json go with --task", "gptkit eval", "add --task NAME")
        loss, n = evaluate.evaluate_model(a.model, a.data, a.split, a.batch_size, a.block_size, a.device, a.dtype)
        model_dir = Path(a.model) if Path(a.model).is_dir() else None
        try:
            bpb = evaluate.split_bits_per_byte(a.data, a.split, loss, n, a.vocab, model_dir)
        except GptkitError as e:  # e.g. no GPT-2 vocabulary offline: the loss still stands
            print(f"note: no bits per byte: {e.what} ({e.where}): {e.hint}", file=sys.stderr)
            bpb = None
        line = f"{a.split} loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.3f} over {n:,} tokens"
        if bpb is not None:
            line += f", {bpb[0]:.4f} bits per byte ({bpb[1]:,} bytes)"
        print(line)
    return run


@command("convert", "convert a model between gptkit, Hugging Face and llm.c formats")
def _convert(p):
    p.add_argument("src", metavar="SRC", help="anything loadable: run/checkpoint/HF/TF directory, llm.c .bin, gpt2...")
    p.add_argument("dst", metavar="DST", help="output directory")
    p.add_argument("--to", required=True, choices=["gptkit", "hf", "llmc", "llmc-bf16", "peft", "gguf"],
                   help="gptkit checkpoint, Hugging Face directory, llm.c model.bin (fp32 v3 / bf16 v5) "
                        "+ tokenizer.bin, a LoRA run's adapters for PEFT (hf: merged), or a llama.cpp .gguf file "
                        "(DST is the file)")
    p.add_argument("--vocab", help="GPT-2 vocabulary file or directory (for llm.c's tokenizer.bin)")
    p.add_argument("--force", action="store_true", help="replace a DST that is not empty (its files are removed)")
    p.add_argument("--dtype", default="f32", help="--to gguf: weight type f32 | f16 | q8_0 (default f32)")

    def run(a):
        res = convert.convert(a.src, a.dst, a.to, a.vocab, force=a.force, dtype=a.dtype)
        for note in res.notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"wrote {res.dst} ({a.to}): {', '.join(f.name for f in res.files)}")
    return run


@command("validate", "check a model against an llm.c debug state, as llm.c's test_gpt2 does")
def _validate(p):
    p.add_argument("--model", required=True, help="run/checkpoint/HF directory, llm.c .bin or pretrained name")
    p.add_argument("--debug-state", help="llm.c debug state file (e.g. gpt2_124M_debug_state.bin)")
    p.add_argument("--steps", type=int, default=10, help="AdamW steps on the state's batch (default 10)")
    p.add_argument("--write-state", metavar="FILE", help="instead, write MODEL's debug state on the first batch of "
                   "--data (llm.c's train_gpt2.py), for llm.c's test_gpt2 or `gptkit validate --debug-state FILE`")
    p.add_argument("--data", help="with --write-state: a prepared data directory")
    p.add_argument("--split", default="val", help="with --write-state: the split read (default val, as llm.c)")
    p.add_argument("-B", "--batch-size", type=int, default=4, help="with --write-state: B (default 4, llm.c's)")
    p.add_argument("-T", "--block-size", type=int, default=64, help="with --write-state: T (default 64, llm.c's)")

    def run(a):
        if a.write_state:
            if not a.data:
                raise GptkitError("--write-state needs --data DIR", "--data", "give a prepared data directory")
            validate.write_state_from_data(a.model, a.data, a.write_state, a.batch_size, a.block_size, a.split)
            return 0
        if not a.debug_state:
            raise GptkitError("give --debug-state STATE (or --write-state FILE --data DIR)", "--debug-state",
                              "see `gptkit validate --help`")
        return 0 if validate.validate(a.model, a.debug_state, a.steps).ok else 1
    return run


@command("serve", "serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions), "
                  "batching requests")
def _serve(p):
    p.add_argument("--model", required=True, help="run/checkpoint/HF directory, llm.c .bin or pretrained name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/*, /metrics and /stats "
                   "(default: $GPTKIT_API_KEY, which stays out of `ps`)")
    p.add_argument("--model-name", help="the model's id in the API (default: the model path's base name)")
    p.add_argument("--max-batch", type=int, default=32, help="completions generated at once (default 32)")
    p.add_argument("--queue-size", type=int, default=256, help="requests that may wait; more get 503 (default 256)")
    p.add_argument("--max-cohorts", type=int, default=4, help=argparse.SUPPRESS)  # ignored: one batch that requests join
    p.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="gather requests arriving this close together into one batch (default 2)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens accepted (default 4096)")
    p.add_argument("--max-rows-per-request", type=int, help="rows (prompts x n) of one request that run at once; "
                   "more prompts wait for them, n above it is refused (default: half of --max-batch)")
    p.add_argument("--request-token-budget", type=int, default=32768,
                   help="n x max_tokens one prompt may ask for (default 32768)")
    p.add_argument("--preempt-after", type=int, default=32, help="a row that generated this many tokens may be "
                   "parked for a waiting request that was served less, and resumed later (default 32; 0: never)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prefill a longer prompt this many tokens per "
                   "step, so running requests keep streaming meanwhile (default 256; 0: whole prompts at once)")
    p.add_argument("--batch-invariant", action="store_true", help="run every row on its own, so its tokens never "
                   "depend on the other requests in the batch (slower; no preemption)")
    p.add_argument("--shutdown-grace", type=float, default=5.0,
                   help="on SIGTERM/SIGINT, seconds running requests may finish in (default 5)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds to send request headers (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds to send a request body (default 30)")
    p.add_argument("--idle-timeout", type=float, default=5.0, help="idle keep-alive connections close after this "
                   "(default 5 s)")
    p.add_argument("--allowed-hosts", help="comma-separated Host header names the server answers to, '*' for any "
                   "(default: the --host address and localhost; any for 0.0.0.0 or ::)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow this web origin to call the API from a browser (repeatable; default: none)")
    p.add_argument("--debug-step-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: slow steps
    p.add_argument("--vocab", help="GPT-2 vocabulary file or directory")
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template (e.g. chat_template.jinja) for "
                   "/v1/chat/completions, replacing the model's own (GPT-2 has none)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"],
                   help="weight precision for inference")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch (default: PyTorch's choice)")

    def run(a):
        hosts = tuple(h for h in a.allowed_hosts.split(",") if h.strip()) if a.allowed_hosts else None
        cfg = serve.ServeConfig(max_batch=a.max_batch, queue_size=a.queue_size, max_cohorts=a.max_cohorts,
                                batch_wait_s=a.batch_wait_ms / 1000, max_tokens_limit=a.max_tokens_limit,
                                max_rows_per_request=a.max_rows_per_request, request_token_budget=a.request_token_budget,
                                preempt_after=a.preempt_after, prefill_chunk=a.prefill_chunk,
                                batch_invariant=a.batch_invariant,
                                shutdown_grace_s=a.shutdown_grace, header_timeout_s=a.header_timeout,
                                body_timeout_s=a.body_timeout, idle_timeout_s=a.idle_timeout, allowed_hosts=hosts,
                                cors_origins=tuple(a.cors_origin),
                                step_delay_s=a.debug_step_delay_ms / 1000)
        key = a.api_key if a.api_key is not None else os.environ.get("GPTKIT_API_KEY")
        serve.serve(a.model, a.host, a.port, key, a.model_name, cfg, a.vocab, a.device, a.dtype, a.threads,
                    a.chat_template)
    return run


@command("tokenizer", "train a byte-level BPE tokenizer on your own text")
def _tokenizer(p):
    sub = p.add_subparsers(dest="action", metavar="<action>", parser_class=_Parser)
    t = sub.add_parser("train", help="train a byte-level BPE (tokenizers' trainer) and write DIR/tokenizer.json",
                       description="Train a byte-level BPE with <|endoftext|> as its special token, streaming "
                                   "over the text; then print bytes per token against GPT-2's BPE.")
    t.add_argument("sources", nargs="+", metavar="TEXT_OR_DIR", help="text files or folders of .txt files")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary, specials included")
    t.add_argument("--out", required=True, help="directory for tokenizer.json + tokenizer_config.json")
    t.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge (default 2)")

    def run(a):
        if getattr(a, "action", None) != "train":
            raise GptkitError("missing action", "tokenizer", "use `gptkit tokenizer train TEXT... --vocab-size N "
                                                             "--out DIR`")
        r = tokenizer_train.train_tokenizer(a.sources, a.vocab_size, a.out, a.min_frequency)
        print(f"wrote {r.out}: {', '.join(f.name for f in r.files)} (vocab {r.vocab_size:,})")
        if r.vocab_size < a.vocab_size:
            print(f"note: the text allows only {r.vocab_size:,} tokens (no pair left to merge "
                  f"{a.min_frequency}+ times)", file=sys.stderr)
        line = f"bytes per token on the corpus ({r.bytes:,} bytes): {r.bytes_per_token:.3f} ({r.tokens:,} tokens)"
        if r.gpt2_tokens is not None:
            line += f"; GPT-2 BPE {r.gpt2_bytes_per_token:.3f} ({r.gpt2_tokens:,} tokens)"
        else:
            line += "; GPT-2 BPE not measured (its vocabulary is not at hand: set GPTKIT_DATA)"
        print(line)
        print(f"use it: gptkit prepare TEXT --vocab {r.out / 'tokenizer.json'}")
    return run


@command("plot", "draw a run's loss curves (train/val vs steps and tokens, LR) as a PNG")
def _plot(p):
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory holding metrics.jsonl")
    p.add_argument("--out", help="PNG file to write (default: RUN_DIR/loss.png)")

    def run(a):
        print(f"wrote {plot.plot_run(a.run_dir, a.out)}")
    return run


@command("bench", "benchmarks: training steps (train) and generation (generate)")
def _bench(p):
    sub = p.add_subparsers(dest="target", metavar="<target>", parser_class=_Parser)
    for name, (add_arguments, run, help) in bench.TARGETS.items():
        sp = sub.add_parser(name, help=help, description=help)
        add_arguments(sp)
        sp.set_defaults(_bench_run=run)

    def run(a):
        if not getattr(a, "_bench_run", None):
            raise GptkitError("missing benchmark target", "bench", f"use one of: {', '.join(bench.TARGETS)}")
        return a._bench_run(a)
    return run
