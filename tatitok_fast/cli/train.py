"""`tatitok-fast train --config RECIPE.toml [--section.key value ...]`: the training engine in
this process (for several GPUs or nodes use torchrun: see training/README.md)."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a tokenizer or a generator from a TOML recipe",
                              description=__doc__)
    p.add_argument("--config", default=None, help="a TOML recipe (training/recipes/*.toml)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default")
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    p.set_defaults(func=_train, pass_through=True)  # every other --section.key value goes to the engine


def _train(args: argparse.Namespace) -> int:
    from tatitok_fast.training.train import main

    argv = (["--config", args.config] if args.config else []) + (["--help-config"] if args.help_config else [])
    return main(argv + list(args.extra))
