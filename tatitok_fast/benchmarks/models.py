"""Shared pieces of the model benchmarks (tokenizer.py, generate.py).

Every case is timed in up to five variants on the same weights and inputs:

    official  fp32 eager        the official code (bytedance/1d-tokenizer) as its README runs it
    official  autocast <dtype>  the same under torch.autocast(device, <fast dtype>)
    ours      fp32              tatitok_fast in fp32 (fused ops, SDPA)
    ours      fast              tatitok_fast cast to --fast-dtype (default bf16)
    reference reference_mode    ours in fp32 on the PyTorch twins of every kernel (an extra)
    ours      compiled          the fast path through tatitok_fast.compile (with --compile); its
                                first calls (the compile) are timed apart: `compile s`

Speed-ups are against the official rows of the same precision: fp32 vs official fp32 eager,
fast vs official autocast. The `vs official best` column (harness.fill_vs_official_best)
divides every row by the FASTER of the official rows on this machine (autocast bf16 is ~7x
slower than fp32 on a CPU without bf16 units), the honest headline figure. Without an official checkout (--official) they fall back to the
reference_mode row and every row says which baseline it was divided by.

A suite builds its cases with `ModelCase`s (which run the agreement checks of official.py
first); `case_rows` times them for the CLI and benchmarks/test_*.py times the very same
closures with pytest-benchmark.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm import tqdm

from tatitok_fast import presets
from tatitok_fast.benchmarks.harness import (Measurement, Report, count_flops, gemm_peak_tflops, load_average,
                                             measure_interleaved, run_header, to_mib)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# variant key -> (impl, label); the label is the `variant` column (dtype filled in for autocast/fast)
VARIANTS = {
    "official_fp32": ("official", "fp32 eager"),
    "official_autocast": ("official", "autocast {dtype}"),
    "fp32": ("tatitok_fast", "fp32"),
    "fast": ("tatitok_fast", "fast {dtype}"),
    "reference_mode": ("reference", "reference_mode fp32 (extra)"),
    "compiled": ("tatitok_fast", "compiled {dtype}"),
}
DEFAULT_VARIANTS = [v for v in VARIANTS if v != "compiled"]  # compiled rows: --compile
# which row each variant's speed-up is divided by, in order of preference
BASELINES = {"fp32": ("official_fp32", "reference_mode"), "fast": ("official_autocast", "reference_mode"),
             "compiled": ("official_autocast", "reference_mode")}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the tokenizer and generate suites."""
    parser.add_argument("--official", metavar="PATH", default=None,
                        help="checkout of bytedance/1d-tokenizer: time the official code on the same weights and "
                             "inputs (fp32 eager and autocast) and compute speed-ups against it")
    parser.add_argument("--fast-dtype", choices=sorted(DTYPES), default="bf16",
                        help="dtype of our fast path and of the official autocast rows (default bf16)")
    parser.add_argument("--variants", type=parse_variants, default=list(DEFAULT_VARIANTS), metavar="V[,V...]",
                        help=f"variants to time (default all but compiled): {', '.join(VARIANTS)}")
    parser.add_argument("--compile", action="store_true",
                        help="add the compiled rows (tatitok_fast.compile of the fast path; compile time reported "
                             "apart from the steady-state time)")
    parser.add_argument("--compile-cache", metavar="DIR", default=None,
                        help="with --compile: inductor's cache directory (default: $TORCHINDUCTOR_CACHE_DIR)")
    parser.add_argument("--min-run-time", type=float, default=None, metavar="S",
                        help="seconds of timed calls per row (default 2, 0.05 with --quick)")
    parser.add_argument("--rounds", type=positive_int, default=None, metavar="N",
                        help="exactly N interleaved timing rounds on CPU (default: from --min-run-time, >= 3)")


def parse_variants(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; expected a "
                                         f"comma-separated list of: {', '.join(VARIANTS)}")
    return [v for v in VARIANTS if v in names]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def check_model_args(args: argparse.Namespace) -> None:
    """Argument checks shared by the model suites, before anything is built."""
    if args.min_run_time is not None and not args.min_run_time > 0:
        raise ValueError(f"--min-run-time: expected seconds > 0, got {args.min_run_time}")
    if getattr(args, "compile", False) and "compiled" not in args.variants:
        args.variants = [v for v in VARIANTS if v in args.variants or v == "compiled"]
    if any(v.startswith("official") for v in args.variants) and args.official is None:
        args.variants = [v for v in args.variants if not v.startswith("official")]
    if args.official is not None:
        from tatitok_fast.benchmarks.official import check_checkout

        check_checkout(args.official)


@dataclass
class Variant:
    """One timed implementation of a case: `fn()` runs it on inputs captured in its closure."""

    key: str  # a VARIANTS key
    dtype: torch.dtype
    fn: Callable[[], Any]

    @property
    def impl(self) -> str:
        return VARIANTS[self.key][0]

    def label(self) -> str:
        return VARIANTS[self.key][1].format(dtype=dtype_name(self.dtype))


@dataclass
class ModelCase:
    """A case (encode, decode, generate, ...) and its variants, built and checked."""

    suite: str
    case: str
    shapes: str
    items: int  # images per call
    variants: list[Variant] = field(default_factory=list)

    def add(self, key: str, dtype: torch.dtype, fn: Callable[[], Any]) -> None:
        if key not in VARIANTS:
            raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {key!r}")
        self.variants.append(Variant(key, dtype, fn))

    def baseline_of(self, key: str) -> Variant | None:
        present = {v.key: v for v in self.variants}
        for b in BASELINES.get(key, ()):
            if b in present:
                return present[b]
        return None


def make_case(suite: str, case: str, shapes: str, items: int, variants: dict[str, tuple[torch.dtype, dict]],
              keys: list[str]) -> ModelCase:
    """A ModelCase with the variants of `keys` that `variants` (key -> (dtype, {case: fn}))
    has, in VARIANTS order, each fn run under torch.no_grad()."""
    out = ModelCase(suite, case, shapes, items)
    for key in VARIANTS:
        if key in keys and key in variants:
            dtype, fns = variants[key]
            out.add(key, dtype, torch.no_grad()(fns[case]))
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fast_dtype(args) -> torch.dtype:
    return DTYPES[args.fast_dtype]


def autocast(device: str, dtype: torch.dtype):
    """torch.autocast(device, dtype): how an informed user runs the official code in low
    precision (a no-op context for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=dtype)


def build_model(cls, name_or_path: str | None, config: dict, device: str):
    """The model on `device` in fp32: from a checkpoint, else randomly initialised there."""
    if name_or_path and name_or_path not in presets.TOKENIZERS and name_or_path not in presets.GENERATORS:
        return cls.from_pretrained(name_or_path, device=device).eval()
    torch.manual_seed(0)
    with torch.device(device):
        return cls(config).eval().requires_grad_(False)


def min_run_time(args) -> float:
    if args.min_run_time is not None:
        return args.min_run_time
    return 0.05 if args.quick else 2.0


def compiled_model(model, args):
    """tatitok_fast.compile of (a copy of) `model`, for the compiled rows."""
    import copy

    from tatitok_fast.compile import compile as compile_model

    return compile_model(copy.deepcopy(model), cache_dir=getattr(args, "compile_cache", None))


def warm_compiled(case: ModelCase) -> dict[str, float]:
    """Seconds of the first call of each compiled variant (the compile, or a cache load, plus
    one run): spent before timing, so that the timed rounds are the steady state."""
    import time

    out = {}
    for v in case.variants:
        if v.key == "compiled":
            t0 = time.perf_counter()
            v.fn()
            out[v.key] = time.perf_counter() - t0
    return out


def case_rows(case: ModelCase, device: str, args) -> list[Measurement]:
    """Time every variant of `case` with the harness; speed-ups against its baseline row;
    TFLOP/s from the FLOPs of one eager call (every variant does the same work)."""
    rows: dict[str, Measurement] = {}
    compile_s = warm_compiled(case)
    flops = count_flops(next(v.fn for v in case.variants if v.key != "compiled")) if case.variants else 0
    timings = measure_interleaved([v.fn for v in case.variants], device=device, min_run_time=min_run_time(args),
                                  memory=args.quick or device == "cuda", rounds=getattr(args, "rounds", None))
    for v, t in zip(case.variants, timings):
        rows[v.key] = Measurement(suite=case.suite, case=case.case, impl=v.impl, device=device,
                                  dtype=dtype_name(v.dtype), shapes=case.shapes, median_ms=t.median_ms,
                                  iqr_ms=t.iqr_ms, peak_extra_mb=to_mib(t.peak_extra_bytes), variant=v.label(),
                                  items_per_s=case.items / (t.median_ms * 1e-3), timer=t.timer,
                                  compile_s=compile_s.get(v.key),
                                  tflops=flops / (t.median_ms * 1e-3) / 1e12 if flops else None)
    for v in case.variants:
        base = case.baseline_of(v.key)
        if base is not None:
            rows[v.key].speedup = rows[base.key].median_ms / rows[v.key].median_ms
            rows[v.key].baseline = f"{base.impl} {base.label()}"
    return list(rows.values())


QUICK_PEAK_N = 512  # --quick: the peak of a 512 matmul, a smoke figure like the rest of the run


def fill_gemm_peak(report: Report, quick: bool = False) -> None:
    """Each row's TFLOP/s as % of a large square matmul on its device, timed now, in its dtype,
    or in fp32 for bf16/fp16 rows on a CPU without units for them (there the fp32 matmul is the
    fastest this machine does that work, and what our low-precision path runs). The peaks go
    into the header, keyed "device dtype". quick: a small matmul (QUICK_PEAK_N), briefly timed."""
    from tatitok_fast.models.nn.layers import cpu_upcasts

    by_name = {dtype_name(d): d for d in DTYPES.values()}  # a row's dtype column -> dtype
    peaks: dict[tuple[str, str], float] = {}
    for r in report.rows:
        if r.tflops is None or r.dtype not in by_name:
            continue
        dtype = by_name[r.dtype]
        if r.device == "cpu" and cpu_upcasts(torch.empty(0, dtype=dtype)):  # no bf16/fp16 units here
            dtype = torch.float32
        key = (r.device, dtype_name(dtype))
        if key not in peaks:
            peaks[key] = (gemm_peak_tflops(r.device, dtype, min_run_time=0.02, n=QUICK_PEAK_N) if quick
                          else gemm_peak_tflops(r.device, dtype))
        r.pct_of_gemm_peak = 100.0 * r.tflops / peaks[key]
    if peaks:
        report.header["gemm_peak_tflops"] = {f"{d} {t}": v for (d, t), v in peaks.items()}
        report.notes.append("TFLOP/s: matmul, convolution and attention FLOPs of one eager call (torch's "
                            "FlopCounterMode) per second; % GEMM peak: of a square matmul timed in this run ("
                            + ", ".join(f"{d} {t} {v:.3g} TFLOP/s" for (d, t), v in peaks.items())
                            + "), in fp32 for bf16/fp16 rows on a CPU without bf16/fp16 units"
                            + (f" (--quick: a {QUICK_PEAK_N}x{QUICK_PEAK_N} matmul)" if quick else ""))


def model_report(kind: str, cases_fn, args, devices) -> Report:
    """Rows of every case of `cases_fn(args, device)` on every device, with the run header
    and notes."""
    check_model_args(args)
    report = Report(header=run_header(list(devices)))
    if args.official:
        from tatitok_fast.benchmarks.official import check_checkout

        report.header["official"] = str(check_checkout(args.official))
    for device in devices:
        cases = cases_fn(args, device, report.notes)
        plan = [(c, v) for c in cases for v in c.variants]
        with tqdm(total=len(plan), desc=f"bench {kind} ({device})", unit="row", disable=not args.progress,
                  file=sys.stderr) as bar:
            for case in cases:
                report.rows += case_rows(case, device, args)
                bar.update(len(case.variants))
    fill_gemm_peak(report, quick=args.quick)
    if not args.official:
        report.notes.append("no --official checkout given: speed-ups are against our reference_mode fp32 row, "
                            "not the official code")
    report.notes.append("official = bytedance/1d-tokenizer on the same weights and inputs (agreement checked "
                        "before timing); reference_mode = ours in fp32 on the PyTorch twin of every kernel; "
                        "items/s are images per second; random weights unless a checkpoint is given")
    report.header["load_avg_1m_end"] = load_average()
    return report
