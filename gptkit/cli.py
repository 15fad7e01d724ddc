"""`gptkit <subcommand>`: a thin argparse layer. Each subcommand parses its options and calls one
library function; user errors (GptkitError) become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys

from gptkit import __version__
from gptkit.errors import GptkitError


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so bad options get the one-line error too."""

    def error(self, message):
        raise GptkitError(message, self.prog, f"see `{self.prog} --help`")


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
        sp = sub.add_parser(name, help=help, description=help)
        run = fn(sp)
        sp.set_defaults(_run=run)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2 if not argv else 0
        rc = args._run(args)
        return int(rc or 0)
    except GptkitError as e:
        print(e.line(), file=sys.stderr)
        return 2
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------
# Subcommands. Each function adds its options to `p` and returns the function that runs it.
# Library imports happen inside the runner so `gptkit --help` stays fast.
