"""Where the time of a model benchmark goes: torch.profiler over one call of chosen variants.

Builds exactly the callables `tatitok-fast bench tokenizer|generate` times (same options,
same agreement checks), runs each selected variant once to warm up, profiles one more call
and prints the self time per category (matmul, attention, conv, casts/copies, GELU,
LayerNorm, ...) and the top ops:

    python benchmarks/profile_models.py tokenizer --preset tatitok_bl32_vae --batch 4 \\
        --official ../shared/peer/1d-tokenizer --variants official_autocast,fast --cases encode+decode
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections import defaultdict

import torch

from tatitok_fast.cli.bench import SUITES, add_common_arguments, apply_threads, resolve_devices

# aten op name (substring) -> category; first match wins, unmatched ops are "other"
CATEGORIES = [
    ("attention", ("scaled_dot_product", "flash_attention", "_softmax", "baddbmm", "bmm")),
    ("matmul", ("addmm", "aten::mm", "linear", "matmul", "aten::dot", "aten::addmv")),
    ("conv", ("conv",)),
    ("casts/copies", ("copy_", "_to_copy", "aten::to", "contiguous", "clone", "aten::cat", "aten::repeat",
                      "aten::expand", "aten::permute", "aten::transpose", "aten::reshape", "aten::view")),
    ("GELU", ("gelu",)),
    ("LayerNorm", ("layer_norm",)),
    ("elementwise", ("aten::add", "aten::mul", "aten::sub", "aten::div", "aten::where", "aten::exp", "aten::log",
                     "aten::clamp", "aten::silu", "aten::neg", "aten::pow", "aten::cos", "aten::sin", "aten::rsub")),
    ("sampling/VQ (fused ops, sort, argmax)", ("tatitok_fast::", "sort", "argmax", "argmin", "gather", "scatter",
                                               "uniform_", "topk", "embedding", "index")),
]


def category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other"


def profile(fn, row_limit: int) -> str:
    fn()  # warm up (lazy init, allocator)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    per_cat: dict[str, float] = defaultdict(float)
    for e in events:
        per_cat[category(e.key)] += e.self_cpu_time_total
    lines = [f"  total self CPU time {total / 1e3:.1f} ms"]
    lines += [f"  {cat:<40} {t / 1e3:10.1f} ms  {100 * t / total:5.1f}%"
              for cat, t in sorted(per_cat.items(), key=lambda kv: -kv[1])]
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=row_limit))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="suite", required=True)
    for name in ("tokenizer", "generate"):
        p = sub.add_parser(name)
        add_common_arguments(p)
        importlib.import_module(SUITES[name]).add_arguments(p)
        p.add_argument("--row-limit", type=int, default=15, help="top ops listed per variant")
    args = parser.parse_args(argv)
    suite = importlib.import_module(SUITES[args.suite])
    apply_threads(args, parser)
    try:
        suite.check_args(args)
    except ValueError as e:
        parser.error(str(e))
    for device in resolve_devices(args.device, parser):
        notes: list[str] = []
        for case in suite.cases(args, device, notes):
            for v in case.variants:
                print(f"== {case.suite} {case.case} | {v.impl} {v.label()} | {device} | {case.shapes}", flush=True)
                print(profile(v.fn, args.row_limit), flush=True)
        for n in notes:
            print(f"note: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
