"""Shared pieces of the model benchmarks (tokenizer.py, generate.py): images/s of the fast
path next to the plain eager fp32 path (the PyTorch twin of every kernel, textbook attention,
no CUDA graph) on the same weights and inputs; random weights unless a checkpoint is given.
The fast path is the model cast to --fast-dtype (default bf16 on CUDA, fp32 on CPU)."""
from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from tatitok_fast import presets
from tatitok_fast.benchmarks.harness import Measurement, Report, load_average, measure, run_header, to_mib

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fast_dtype_for(args, device: str) -> torch.dtype:
    if args.fast_dtype:
        return DTYPES[args.fast_dtype]
    return torch.bfloat16 if device == "cuda" else torch.float32


def build_model(cls, name_or_path: str | None, config: dict, device: str):
    """The model on `device` in fp32: from a checkpoint, else randomly initialised there."""
    if name_or_path and name_or_path not in presets.TOKENIZERS and name_or_path not in presets.GENERATORS:
        return cls.from_pretrained(name_or_path, device=device).eval()
    torch.manual_seed(0)
    with torch.device(device):
        return cls(config).eval().requires_grad_(False)


def pair_rows(suite, case, device, shapes, batch, fast_fn, eager_fn, fast_dtype, quick) -> list[Measurement]:
    rows = []
    for impl, fn, dtype in (("tatitok_fast", fast_fn, fast_dtype), ("reference", eager_fn, torch.float32)):
        t = measure(fn, device=device, min_run_time=0.05 if quick else 2.0, memory=quick or device == "cuda")
        rows.append(Measurement(suite=suite, case=case, impl=impl, device=device,
                                dtype=str(dtype).removeprefix("torch."), shapes=shapes, median_ms=t.median_ms,
                                iqr_ms=t.iqr_ms, peak_extra_mb=to_mib(t.peak_extra_bytes),
                                variant="fast" if impl == "tatitok_fast" else "eager fp32",
                                items_per_s=batch / (t.median_ms * 1e-3)))
    rows[0].speedup = rows[1].median_ms / rows[0].median_ms
    return rows


def model_report(kind: str, rows_fn, args, devices) -> Report:
    """Rows of `rows_fn(args, device)` for every device, with the run header and notes."""
    report = Report(header=run_header(list(devices)))
    for device in tqdm(devices, desc=f"bench {kind}", unit="device", disable=not args.progress, file=sys.stderr):
        report.rows += rows_fn(args, device)
    report.notes.append("reference = the same model in fp32 with the PyTorch twin of every kernel, textbook "
                        "attention, no CUDA graph; items/s are images per second; random weights unless a "
                        "checkpoint is given")
    report.header["load_avg_1m_end"] = load_average()
    return report
