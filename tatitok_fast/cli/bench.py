"""`tatitok-fast bench SUITE`: run a benchmark suite, print its table, optionally write
JSON / markdown.

A suite is a module exposing `add_arguments(parser)` (its own options),
`run(args, devices) -> harness.Report` and optionally `check_args(args)` (ValueError -> a usage
error before anything is built); SUITES maps the command-line name to the module,
so adding a suite is one line.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tatitok_fast.benchmarks.harness import Report

SUITES: dict[str, str] = {
    "ops": "tatitok_fast.benchmarks.ops",
    "tokenizer": "tatitok_fast.benchmarks.tokenizer",
    "generate": "tatitok_fast.benchmarks.generate",
    "train": "tatitok_fast.benchmarks.train",
}

DEVICE_CHOICES = ("cpu", "cuda", "all")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every suite (and every benchmarks/ script) takes."""
    parser.add_argument("--device", choices=DEVICE_CHOICES, default=None,
                        help="where to run (default: cuda when available, else cpu; all = cpu and cuda)")
    parser.add_argument("--quick", action="store_true", help="small shapes, few iterations (tests, CI)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", default=None, help="also write the table as markdown")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's choice); recorded in the header")


def resolve_devices(choice: str | None, parser: argparse.ArgumentParser) -> list[str]:
    """--device value -> the device types to run on; parser.error (SystemExit 2) when CUDA is
    asked for and absent."""
    import torch

    has_cuda = torch.cuda.is_available()
    if choice is None:
        return ["cuda"] if has_cuda else ["cpu"]
    if choice in ("cuda", "all") and not has_cuda:
        parser.error(f"--device {choice}: CUDA is not available on this machine "
                     f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu")
    return ["cpu", "cuda"] if choice == "all" else [choice]


def apply_threads(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--threads N -> torch.set_num_threads(N) (usage error when N < 1)."""
    if args.threads is None:
        return
    if args.threads < 1:
        parser.error(f"--threads: expected an integer >= 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)


def emit(report: Report, args: argparse.Namespace) -> None:
    """Print the report's table; write --json / --markdown files when given."""
    print(report.text())
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.markdown:
        report.write_markdown(args.markdown)
        print(f"wrote {args.markdown}", file=sys.stderr)


def _run_suite(suite: ModuleType, parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    devices = resolve_devices(args.device, parser)
    apply_threads(args, parser)
    check = getattr(suite, "check_args", None)  # a suite's cross-argument checks, before any model is built
    if check is not None:
        try:
            check(args)
        except ValueError as e:
            parser.error(str(e))
    emit(suite.run(args, devices), args)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench` and one sub-command per suite."""
    bench = subparsers.add_parser("bench", help="benchmark fused kernels and models against the reference",
                                  description=__doc__.split("\n\n")[0])
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, module_name in SUITES.items():
        suite = importlib.import_module(module_name)
        summary = (suite.__doc__ or name).strip().splitlines()[0]
        parser = suites.add_parser(name, help=summary, description=suite.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
        add_common_arguments(parser)
        suite.add_arguments(parser)
        parser.set_defaults(func=lambda args, s=suite, p=parser: _run_suite(s, p, args))
