"""Fused ops vs their reference paths, timed in the same process on the same inputs.

Cases (full size; --quick shrinks every shape for tests and CI):
    vq_nearest_code      z (8192, 64) vs codebook (8192, 64), fp32 and bf16; tokenizer-typical
                         z (64*32, 64) vs (8192, 64); z (64*32, D) vs every zoo codebook (TiTok
                         4096x12, TA-TiTok 8192x64, MaskGIT-VQGAN 1024x256), fp32.
                         Reference: full distance matrix + argmin.
    kl_sample            parameters (256, 32, 1, 32) fp32, noise drawn in-kernel / by randn.
    maskgen_unmask_step  logits (32, 128, 8192) fp32, noise in-kernel, with and without CFG.
                         Reference: draw the Gumbel noise, then the reference step.
    mask_by_order        orders (64, 32) and (64, 128).
    layernorm_modulate,  Triton vs the PyTorch twin, CUDA only (skipped with a note on CPU).
    gated_residual
Speedup = reference median / ours. On CUDA the memory-bound ops also report GB/s (bytes read
+ written, counted per case) and % of a device-to-device copy measured in the same run; vq
reports TFLOP/s (2*N*K*D). items/s counts rows of z (vq), output elements (kl), token
positions B*L (maskgen, mask_by_order) and rows B*T (adaLN).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from tatitok_fast import ops as F
from tatitok_fast.benchmarks.harness import (Measurement, Report, copy_bandwidth_gbps, load_average, measure,
                                             run_header, to_mib)
from tatitok_fast.ops import reference as R
from tatitok_fast.ops.triton import gated_residual_ref, layernorm_modulate_ref
from tatitok_fast.ops.triton._common import HAS_TRITON

SUITE = "ops"
GRAPH_CALLS = 20  # calls per CUDA graph for launch-bound cases
Fn = Callable[[], Any]


@dataclass(frozen=True)
class OpCase:
    """One benchmark case: `build(device)` makes the inputs and returns the (ours, reference)
    closures over them. `nbytes` (read + written), `flops` and `items` give the throughput
    columns; `memory_bound` picks GB/s vs peak on CUDA; `launch_bound` cases (µs-scale kernels)
    are timed on CUDA as replays of a CUDA graph of GRAPH_CALLS calls, so that the host's
    launch overhead is not what is measured (both implementations alike)."""

    op: str
    variant: str
    dtype: torch.dtype
    shapes: str
    build: Callable[[torch.device], tuple[Fn, Fn]]
    nbytes: int | None = None
    flops: int | None = None
    items: int | None = None
    memory_bound: bool = True
    launch_bound: bool = False


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------
# vq_nearest_code

def _vq_case(variant: str, n: int, k: int, d: int, dtype: torch.dtype) -> OpCase:
    def build(device: torch.device) -> tuple[Fn, Fn]:
        z = torch.randn(n, d, device=device).to(dtype)  # (N, D)
        codebook = torch.randn(k, d, device=device).to(dtype)  # (K, D)
        return lambda: F.vq_nearest_code(z, codebook), lambda: R.vq_nearest_code_ref(z, codebook)

    # read z and the codebook, write int64 index + fp32 distance per row
    nbytes = (n + k) * d * _esize(dtype) + n * 12
    return OpCase("vq_nearest_code", variant, dtype, f"z({n},{d}) codebook({k},{d})", build,
                  nbytes=nbytes, flops=2 * n * k * d, items=n, memory_bound=False)


# the zoo's codebooks (K, D): TiTok 4096x12, TA-TiTok vq8k 8192x64, MaskGIT-VQGAN 1024x256
ZOO_CODEBOOKS = {"zoo titok": (4096, 12), "zoo tatitok vq8k": (8192, 64), "zoo maskgit-vqgan": (1024, 256)}


def vq_cases(quick: bool) -> list[OpCase]:
    n_zoo = 128 if quick else 64 * 32  # rows of z: a batch of 64 images of 32 tokens
    zoo = [_vq_case(name, n_zoo, k if not quick else min(k, 1024), d, torch.float32)
           for name, (k, d) in ZOO_CODEBOOKS.items()]
    if quick:
        return [_vq_case("square", 256, 256, 64, torch.float32), _vq_case("square", 256, 256, 64, torch.bfloat16),
                _vq_case("tokenizer", 128, 1024, 64, torch.float32)] + zoo
    return [_vq_case("square", 8192, 8192, 64, torch.float32), _vq_case("square", 8192, 8192, 64, torch.bfloat16),
            _vq_case("tokenizer", 64 * 32, 8192, 64, torch.float32)] + zoo


# ---------------------------------------------------------------------------------------
# kl_sample

def kl_cases(quick: bool) -> list[OpCase]:
    b, c2, h, w = (16, 32, 1, 32) if quick else (256, 32, 1, 32)

    def build(device: torch.device) -> tuple[Fn, Fn]:
        params = torch.randn(b, c2, h, w, device=device)  # (B, 2C, H, W): mean, logvar
        return lambda: F.kl_sample(params), lambda: R.kl_sample_ref(params)

    out = b * (c2 // 2) * h * w
    # read parameters; write sample, mean, std (B, C, H, W) and kl (B, W), all fp32
    nbytes = 4 * (b * c2 * h * w + 3 * out + b * w)
    return [OpCase("kl_sample", "noise in-kernel", torch.float32, f"parameters({b},{c2},{h},{w})", build,
                   nbytes=nbytes, items=out, launch_bound=True)]


# ---------------------------------------------------------------------------------------
# maskgen_unmask_step

def _unmask_case(b: int, seq: int, k: int, cfg: bool) -> OpCase:
    mask_len, temp, conf_temp, scale = seq // 4, 1.0, 2.0, 3.0

    def build(device: torch.device) -> tuple[Fn, Fn]:
        logits = torch.randn(b, seq, k, device=device)  # (B, L, K)
        uncond = torch.randn(b, seq, k, device=device) if cfg else None
        ids = torch.randint(0, k, (b, seq), device=device)  # (B, L), half still masked
        ids[:, ::2] = k  # mask token id = K, as in MaskGen-VQ

        def ours() -> torch.Tensor:
            return F.maskgen_unmask_step(logits, ids, k, mask_len, sample_temperature=temp,
                                         confidence_temperature=conf_temp, uncond_logits=uncond,
                                         guidance_scale=scale if cfg else 0.0)

        def reference() -> torch.Tensor:
            # what the reference generate loop does per step: draw the noise, then sample
            sample_noise = R.gumbel_noise((b, seq, k), device=device)
            confidence_noise = R.gumbel_noise((b, seq), device=device)
            return R.maskgen_unmask_step_ref(
                logits, ids, k, mask_len, softmax_temperature=1.0, sample_temperature=temp,
                confidence_temperature=conf_temp, last_step=False, sample_noise=sample_noise,
                confidence_noise=confidence_noise, uncond_logits=uncond, guidance_scale=scale if cfg else 0.0)

        return ours, reference

    n_logits = 2 if cfg else 1
    nbytes = 4 * n_logits * b * seq * k + 2 * 8 * b * seq  # logits (+ uncond) read; ids read and written
    shapes = f"logits({b},{seq},{k})" + (" x2" if cfg else "")
    return OpCase("maskgen_unmask_step", "cfg" if cfg else "no cfg", torch.float32, shapes, build,
                  nbytes=nbytes, items=b * seq)


def unmask_cases(quick: bool) -> list[OpCase]:
    b, seq, k = (4, 32, 1024) if quick else (32, 128, 8192)
    return [_unmask_case(b, seq, k, cfg=False), _unmask_case(b, seq, k, cfg=True)]


# ---------------------------------------------------------------------------------------
# mask_by_order

def _mask_by_order_case(b: int, seq: int) -> OpCase:
    def build(device: torch.device) -> tuple[Fn, Fn]:
        orders = torch.argsort(torch.rand(b, seq, device=device), dim=-1)  # (B, L) permutations
        # the current mask is the previous step's mask_next (half of the positions)
        mask = R.mask_by_order_ref(orders, torch.ones(b, seq, device=device), seq // 2, False)[0]
        mask_len = seq // 4
        return (lambda: F.mask_by_order(orders, mask, mask_len),
                lambda: R.mask_by_order_ref(orders, mask, mask_len, False))

    nbytes = b * seq * (8 + 1 + 2)  # int64 orders and bool mask read; two bool masks written
    return OpCase("mask_by_order", "", torch.int64, f"orders({b},{seq})", build, nbytes=nbytes, items=b * seq,
                  launch_bound=True)


def mask_by_order_cases(quick: bool) -> list[OpCase]:
    return [_mask_by_order_case(8, 32), _mask_by_order_case(8, 128)] if quick else \
        [_mask_by_order_case(64, 32), _mask_by_order_case(64, 128)]


# ---------------------------------------------------------------------------------------
# adaLN Triton kernels (CUDA only)

def _adaln_shape(quick: bool) -> tuple[int, int, int]:
    return (4, 64, 256) if quick else (64, 256, 1024)  # (B, T, D): MM-DiT-sized activations


def layernorm_modulate_cases(quick: bool) -> list[OpCase]:
    b, t, d = _adaln_shape(quick)
    dtype = torch.bfloat16

    def build(device: torch.device) -> tuple[Fn, Fn]:
        x = torch.randn(b, t, d, device=device, dtype=dtype)
        mod = torch.randn(b, 6 * d, device=device, dtype=dtype)  # adaLN projection output
        shift, scale = mod[:, :d], mod[:, d:2 * d]  # strided chunks, as the blocks pass them
        return (lambda: F.layernorm_modulate(x, shift, scale, backend="triton"),
                lambda: layernorm_modulate_ref(x, shift, scale))

    es = _esize(dtype)
    nbytes = 2 * b * t * d * es + 2 * b * d * es  # x read, y written, shift + scale read
    return [OpCase("layernorm_modulate", "", dtype, f"x({b},{t},{d}) shift,scale({b},{d})", build,
                   nbytes=nbytes, items=b * t, launch_bound=True)]


def gated_residual_cases(quick: bool) -> list[OpCase]:
    b, t, d = _adaln_shape(quick)
    dtype = torch.bfloat16

    def build(device: torch.device) -> tuple[Fn, Fn]:
        x = torch.randn(b, t, d, device=device, dtype=dtype)
        y = torch.randn(b, t, d, device=device, dtype=dtype)
        gate = torch.randn(b, 6 * d, device=device, dtype=dtype)[:, 2 * d:3 * d]  # strided chunk
        return (lambda: F.gated_residual(x, gate, y, backend="triton"), lambda: gated_residual_ref(x, gate, y))

    es = _esize(dtype)
    nbytes = 3 * b * t * d * es + b * d * es  # x, y read, out written, gate read
    return [OpCase("gated_residual", "", dtype, f"x,y({b},{t},{d}) gate({b},{d})", build,
                   nbytes=nbytes, items=b * t, launch_bound=True)]


# ---------------------------------------------------------------------------------------
# Registry and runner

# op name -> (cases for quick/full, kind): "native" ops need a _C kernel for the device,
# "triton" ops run on CUDA only.
OPS: dict[str, tuple[Callable[[bool], list[OpCase]], str]] = {
    "vq_nearest_code": (vq_cases, "native"),
    "kl_sample": (kl_cases, "native"),
    "maskgen_unmask_step": (unmask_cases, "native"),
    "mask_by_order": (mask_by_order_cases, "native"),
    "layernorm_modulate": (layernorm_modulate_cases, "triton"),
    "gated_residual": (gated_residual_cases, "triton"),
}


def parse_ops(text: str) -> list[str]:
    """argparse type for --ops: a comma-separated list of op names (or "all")."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names or names == ["all"]:
        return list(OPS)
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown op(s) {', '.join(unknown)}; expected a comma-separated list of: {', '.join(OPS)}")
    return list(dict.fromkeys(names))


def skip_reason(op: str, device: str) -> str | None:
    """Why `op` is not benchmarked on `device`, or None when it is."""
    kind = OPS[op][1]
    if kind == "triton" and device != "cuda":
        return f"{op} skipped on {device}: Triton kernel, benchmarked on CUDA only"
    if kind == "triton" and not HAS_TRITON:
        return f"{op} skipped on {device}: triton is not installed"
    if kind == "native" and not F.has_kernel(op, device):
        return f"{op} skipped on {device}: tatitok_fast._C has no {device} kernel in this build"
    return None


def _rows(case: OpCase, device: str, quick: bool, copy_gbps: float | None) -> list[Measurement]:
    """Measure ours and the reference on the same inputs; fill speedup and throughput."""
    ours, reference = case.build(torch.device(device))
    min_run_time = 0.02 if quick else 1.0
    rows = []
    for impl, fn in (("tatitok_fast", ours), ("reference", reference)):
        t = measure(fn, device=device, min_run_time=min_run_time,
                    cuda_graph=GRAPH_CALLS if case.launch_bound and device == "cuda" else 0)
        sec = t.median_ms * 1e-3
        gbps = case.nbytes / sec / 1e9 if case.nbytes and device == "cuda" and case.memory_bound else None
        rows.append(Measurement(
            suite=SUITE, case=case.op, impl=impl, device=device, dtype=str(case.dtype).removeprefix("torch."),
            shapes=case.shapes, median_ms=t.median_ms, iqr_ms=t.iqr_ms, peak_extra_mb=to_mib(t.peak_extra_bytes),
            variant=case.variant, gbps=gbps,
            pct_of_peak=100 * gbps / copy_gbps if gbps is not None and copy_gbps else None,
            tflops=case.flops / sec / 1e12 if case.flops else None,
            items_per_s=case.items / sec if case.items else None, timer=t.timer))
    rows[0].speedup = rows[1].median_ms / rows[0].median_ms
    rows[0].baseline = "reference"
    return rows


def run_ops(ops: Sequence[str], devices: Sequence[str], quick: bool = False, progress: bool = True) -> Report:
    """Benchmark `ops` on each of `devices` ("cpu", "cuda"); rows in (device, op, case) order."""
    for op in ops:
        if op not in OPS:
            raise ValueError(f"ops: unknown op {op!r}; expected some of {list(OPS)}")
    report = Report(header=run_header(list(devices)))
    plan: list[tuple[str, OpCase]] = []
    for device in devices:
        for op in ops:
            reason = skip_reason(op, device)
            if reason:
                report.notes.append(reason)
            else:
                plan += [(device, c) for c in OPS[op][0](quick)]
    copy_gbps: dict[str, float] = {}
    if any(d == "cuda" for d, _ in plan):
        copy_gbps["cuda"] = copy_bandwidth_gbps("cuda", nbytes=(64 << 20) if quick else (1 << 30),
                                                min_run_time=0.05 if quick else 0.5)
        report.header["cuda_copy_gbps"] = round(copy_gbps["cuda"], 1)
        report.notes.append(f"% peak is relative to a device-to-device copy measured in this run: "
                            f"{copy_gbps['cuda']:.0f} GB/s")
    for device, case in tqdm(plan, desc="bench ops", unit="case", disable=not progress, file=sys.stderr):
        torch.manual_seed(0)
        report.rows += _rows(case, device, quick, copy_gbps.get(device))
    report.header["load_avg_1m_end"] = load_average()
    return report


# ---------------------------------------------------------------------------------------
# Suite interface used by `tatitok-fast bench ops`, and the scripts in benchmarks/ops/

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this suite beyond the common ones (--device, --quick, --json, --markdown)."""
    parser.add_argument("--ops", type=parse_ops, default=list(OPS), metavar="OP[,OP...]",
                        help=f"ops to benchmark (default all): {', '.join(OPS)}")


def run(args: argparse.Namespace, devices: list[str]) -> Report:
    return run_ops(args.ops, devices, quick=args.quick, progress=args.progress)


def script_main(ops: Sequence[str], argv: Sequence[str] | None = None) -> int:
    """Entry of benchmarks/ops/bench_<op>.py: these ops only, same flags as the CLI."""
    from tatitok_fast.cli.bench import add_common_arguments, apply_threads, emit, resolve_devices

    parser = argparse.ArgumentParser(description=f"Benchmark {', '.join(ops)} against the reference path.")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_threads(args, parser)
    report = run_ops(list(ops), resolve_devices(args.device, parser), quick=args.quick, progress=args.progress)
    emit(report, args)
    return 0
