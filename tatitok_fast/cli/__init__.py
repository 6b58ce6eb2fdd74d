"""`tatitok-fast` command line: `tatitok-fast <command> ...`.

Each command is a module of this package exposing `register(subparsers)`, which adds its
parser and sets `func(args) -> int` as the default. Adding a command is one entry in
SUBCOMMANDS. User errors print `error: ...` and exit 2 without a traceback (cli/errors.py);
`--debug` or TATITOK_FAST_DEBUG=1 shows it.
"""
from __future__ import annotations

import argparse
import importlib
from typing import Sequence

# modules of tatitok_fast.cli, in the order `--help` lists them
SUBCOMMANDS: list[str] = [
    "reconstruct",
    "make_shards",
    "tokenize_images",
    "train",
    "generate",
    "sample_imagenet",
    "eval",
    "bench",
    "demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tatitok-fast", description="Fast TA-TiTok tokenizers and MaskGen generators.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of user errors too (also TATITOK_FAST_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]) and run the chosen command; returns the exit
    status. Bad arguments raise SystemExit(2) with argparse's message; a user error prints
    `error: ...` and returns 2."""
    from tatitok_fast.cli.errors import debug_requested, report_errors

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "pass_through", False):  # only `train` takes free --section.key options
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return report_errors(lambda: args.func(args), args.debug or debug_requested(argv))
