"""What a run reports: a progress bar (step/total, loss, images/s, lr, ETA), metrics.jsonl (one
JSON object per logged step), TensorBoard events, throughput, MFU and peak memory; NVTX ranges
around data, forward, backward and optimizer (the `nvtx` package: no-ops without a profiler,
harmless on CPU). Only rank 0 writes."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

# dense bf16 tensor-core peak (FLOP/s) by device name fragment, for MFU
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "B200": 2250e12, "GB200": 2500e12, "RTX 4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None (CPU, unknown GPU): MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def annotate(name: str):
    """An NVTX range (nvtx package when installed, else nothing)."""
    try:
        import nvtx
    except ImportError:
        return contextlib.nullcontext()
    return nvtx.annotate(name, domain="tatitok_fast")


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg, *, is_main: bool, total_steps: int, start_step: int,
                 global_batch: int, flops_per_sample: float, device: torch.device):
        self.is_main, self.total, self.device = is_main, total_steps, device
        self.global_batch, self.flops_per_sample = global_batch, flops_per_sample
        self.peak = peak_flops(device)
        self.jsonl = self.tb = self.bar = None
        self._t0, self._step0 = time.perf_counter(), start_step
        if not is_main:
            return
        self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a")
        if cfg.metrics.enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=start_step + 1 if start_step else None)
        if cfg.metrics.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def reset_window(self, step: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0, self._step0 = time.perf_counter(), step

    def log(self, step: int, values: dict[str, float]) -> dict[str, float]:
        """Add throughput/MFU/memory to `values` (already averaged over ranks) and write them."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self._t0
        steps = max(1, step - self._step0)
        out = dict(values)
        out["step_time_s"] = dt / steps
        out["images_per_s"] = self.global_batch * steps / dt if dt > 0 else 0.0
        if self.flops_per_sample:
            achieved = self.flops_per_sample * out["images_per_s"]
            out["tflops"] = achieved / 1e12
            if self.peak:
                world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
                out["mfu"] = achieved / (self.peak * world)
        if self.device.type == "cuda":
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        else:
            import resource

            out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        if self.is_main:
            self.jsonl.write(json.dumps({"step": step, **out}) + "\n")
            self.jsonl.flush()
            if self.tb is not None:
                for k, v in out.items():
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{out.get('loss', float('nan')):.4g}", img_s=f"{out['images_per_s']:.3g}",
                                     lr=f"{out.get('lr', 0):.3g}", refresh=False)
        self.reset_window(step)
        return out

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def images(self, step: int, images: dict[str, torch.Tensor], run_dir: Path) -> None:
        """(B, 3, H, W) in [0, 1] -> TensorBoard image grids and <run>/samples/<name>-step-N.png."""
        if not self.is_main or not images:
            return
        from tatitok_fast.images import make_grid, to_pil

        out = Path(run_dir) / "samples"
        out.mkdir(exist_ok=True)
        for name, batch in images.items():
            batch = batch.detach().float().clamp(0, 1).cpu()
            make_grid(to_pil(batch), ncols=min(8, len(batch))).save(out / f"{name}-step-{step}.png")
            if self.tb is not None:
                self.tb.add_images(f"samples/{name}", batch, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
