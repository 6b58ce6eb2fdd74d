"""`tatitok-fast` command line: `tatitok-fast <command> ...`.

Each command is a module of this package exposing `register(subparsers)`, which adds its
parser and sets `func(args) -> int` as the default. Adding a command is one entry in
SUBCOMMANDS.
"""
from __future__ import annotations

import argparse
import importlib
from typing import Sequence

# modules of tatitok_fast.cli, in the order `--help` lists them
SUBCOMMANDS: list[str] = [
    "reconstruct",
    "tokenize_images",
    "train",
    "generate",
    "eval",
    "bench",
    "demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tatitok-fast", description="Fast TA-TiTok tokenizers and MaskGen generators.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default sys.argv[1:]) and run the chosen command; returns the exit
    status. Bad arguments raise SystemExit(2) with argparse's message."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "pass_through", False):  # only `train` takes free --section.key options
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return int(args.func(args) or 0)
