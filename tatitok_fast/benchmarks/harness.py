"""The one benchmark harness: timing, peak extra memory, provenance and result rendering.

Every suite (ops, tokenizer, generate) builds its timed callables once; the CLI
(`tatitok-fast bench SUITE`) times them with `measure`, records one `Measurement` per
(case, implementation) and prints a `Report` (text table, markdown / JSON on request), and
benchmarks/test_*.py hands the same callables to pytest-benchmark (`host_timer_fn`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

# tatitok_fast: ours; reference: ours on the PyTorch twins (reference_mode) or an op's twin;
# official: the official implementation (bytedance/1d-tokenizer)
IMPLS = ("tatitok_fast", "reference", "official")
_MIB = float(1 << 20)


# ---------------------------------------------------------------------------------------
# Result rows

@dataclass
class Measurement:
    """One timed (case, implementation) pair. Times in milliseconds, memory in MiB.

    `speedup` is the baseline row's median / this median, `baseline` names that row
    ("official fp32 eager", "reference", ...); `vs_official_best` is the median of the
    fastest official row of the same (suite, case, device, shapes) / this median, and
    `official_best` names that row's variant (filled by `fill_vs_official_best`);
    the throughput fields are filled where the suite knows the work done: `gbps` (bytes
    read + written per second), `pct_of_peak` (gbps as % of a device-to-device copy measured
    in the same run), `tflops`, `pct_of_gemm_peak` (tflops as % of a large square matmul in
    the row's dtype, timed in the same run), `items_per_s` (the suite says what an item is).
    """

    suite: str
    case: str
    impl: str
    device: str
    dtype: str
    shapes: str
    median_ms: float
    iqr_ms: float
    peak_extra_mb: float | None
    variant: str = ""
    speedup: float | None = None
    baseline: str = ""
    gbps: float | None = None
    pct_of_peak: float | None = None
    tflops: float | None = None
    items_per_s: float | None = None
    timer: str = ""
    vs_official_best: float | None = None
    official_best: str = ""
    compile_s: float | None = None  # compiled rows: seconds of the first call (compile + one run)
    pct_of_gemm_peak: float | None = None  # tflops as % of a large square matmul in the row's dtype, same run

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {self.impl!r}")


@dataclass
class Timing:
    """What `measure` returns: median and interquartile range of one call (ms), the number
    of calls timed, the peak extra memory of one call (bytes; None when not measured) and
    how it was timed (`timer`: "" for the default timer of the device, "cuda graph xN" for
    graph replays, with the reason when a requested graph could not be captured)."""

    median_ms: float
    iqr_ms: float
    runs: int
    peak_extra_bytes: int | None
    timer: str = ""


# ---------------------------------------------------------------------------------------
# Timing

def _time_cpu(fn: Callable[[], Any], min_run_time: float) -> tuple[float, float, int]:
    """torch.utils.benchmark's blocked_autorange with torch's current intra-op thread count:
    blocks of calls until `min_run_time` seconds; median and IQR over the blocks' per-call
    times."""
    import torch.utils.benchmark as tbench  # imported when timing: it pulls in cpp_extension, which warns

    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3, m.iqr * 1e3, m.number_per_run * len(m.times)


def _time_cuda(fn: Callable[[], Any], device: torch.device, min_run_time: float,
               flush_l2: bool) -> tuple[float, float, int]:
    """CUDA events around every call, after a warmup of ~min_run_time/4. Each call gets its
    own event pair, so the median and IQR are over calls; with `flush_l2` a 256 MiB buffer
    is zeroed before every call (outside the events) so that inputs come from HBM, not L2."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if flush_l2 else None
    fn()
    torch.cuda.synchronize(device)
    # estimate one call's time to pick the warmup and timed iteration counts
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    est_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(250 * min_run_time / est_ms))):
        fn()
    n = min(10_000, max(10, int(1e3 * min_run_time / est_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        if flush is not None:
            flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0], n


def _time_cuda_graph(fn: Callable[[], Any], device: torch.device, min_run_time: float,
                     calls: int) -> tuple[float, float, int]:
    """`calls` calls of fn captured in one CUDA graph; CUDA events around each replay, per-call
    time = replay time / calls. For µs-scale kernels, where eager timing measures the host's
    launch overhead rather than the kernel (and the sampling loops run as graphs anyway).
    Inputs stay in L2 between calls (no flush inside a graph). Raises RuntimeError when fn
    cannot be captured (a host sync, a CPU tensor, an uncapturable RNG). Call it with
    `device` current (measure holds the guard): events and replays use the current stream."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):  # warm up off the default stream: lazy init, Triton compile, allocator
        for _ in range(3):
            fn()
    current.wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    # captured on `side` (made on `device`; the caller holds the device guard): torch.cuda.graph's
    # default capture stream is made once, on whichever device was current at the first capture
    with torch.cuda.graph(graph, stream=side):
        for _ in range(calls):
            fn()  # each result is dropped at once: its block is reused by the next call in the graph pool
    current.wait_stream(side)
    graph.replay()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    est_ms = max(start.elapsed_time(end) / 3, 1e-3)
    n = min(2_000, max(10, int(1e3 * min_run_time / est_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize(device)
    times = sorted(s.elapsed_time(e) / calls for s, e in zip(starts, ends))
    q = statistics.quantiles(times, n=4)
    del graph
    return statistics.median(times), q[2] - q[0], n * calls


# ---------------------------------------------------------------------------------------
# Peak extra memory

@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: kineto prints start/stop lines there that are
    not Python output (so redirecting sys.stderr would not catch them)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak_extra_cpu(fn: Callable[[], Any]) -> int:
    """Peak of (bytes allocated - bytes freed) during one call, from the profiler's memory
    events: torch.profiler with profile_memory=True records one event per allocation (+n)
    and free (-n) made through c10's CPU allocator, on any thread; the running sum in time
    order, maximised, is the peak extra memory. The call's result is kept alive until the
    profiler stops, so returned tensors count. Memory taken outside c10's allocator (raw
    malloc in a kernel) is not seen; the native kernels allocate through at::empty."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep kineto's own logging quiet
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        out = fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    del out
    # The kineto events are where every allocation shows up (EventList folds allocations
    # made inside an op into that op's row).
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def _peak_extra_cuda(fn: Callable[[], Any], device: torch.device) -> int:
    """max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before the
    call (the caching allocator's own counters; the result is kept alive until read)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return max(0, peak)


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device | str) -> int:
    """Bytes one call of `fn` allocates beyond what existed before it, at its peak
    (temporaries and returned tensors). See _peak_extra_cpu / _peak_extra_cuda for how."""
    device = torch.device(device)
    if device.type == "cuda":
        return _peak_extra_cuda(fn, device)
    if device.type == "cpu":
        return _peak_extra_cpu(fn)
    raise ValueError(f"device: expected a cpu or cuda device, got {device}")


def measure(fn: Callable[[], Any], *, device: torch.device | str, min_run_time: float = 1.0,
            memory: bool = True, flush_l2: bool = True, cuda_graph: int = 0) -> Timing:
    """Time `fn()` (no arguments; inputs captured in its closure) and measure its peak extra
    memory.

    CPU: torch.utils.benchmark.Timer.blocked_autorange, threads = torch.get_num_threads(),
    for at least min_run_time and about 5 calls (capped at 10 * min_run_time).
    CUDA: per-call CUDA events after a warmup, synchronised before reading; L2 flushed
    between calls when `flush_l2`. One untimed call comes first either way (lazy init).

    Args:
        device: where fn's tensors live ("cpu", "cuda", "cuda:1", ...).
        min_run_time: seconds spent in timed calls (roughly, on CUDA).
        memory: also measure the peak extra memory of one call (profiler on CPU, the
            caching allocator's peak counter on CUDA).
        cuda_graph: on CUDA, capture this many calls in one CUDA graph and time its replays
            (per call = replay / cuda_graph); 0 = per-call events. Ignored on CPU. When fn
            cannot be captured, falls back to per-call events and says why in Timing.timer.
    """
    device = torch.device(device)
    if not min_run_time > 0:
        raise ValueError(f"min_run_time: expected > 0 seconds, got {min_run_time}")
    if isinstance(cuda_graph, bool) or not isinstance(cuda_graph, int) or cuda_graph < 0:
        raise ValueError(f"cuda_graph: expected a number of calls >= 0, got {cuda_graph!r}")
    timer = ""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device: {device} requested but CUDA is not available")
        median = None
        # `device` current while timing: events, graph capture and replay use the current
        # device's stream and RNG, which must be fn's ("cuda:1" while cuda:0 is current)
        with torch.cuda.device(device):
            if cuda_graph:
                try:
                    median, iqr, runs = _time_cuda_graph(fn, device, min_run_time, cuda_graph)
                    timer = f"cuda graph x{cuda_graph}"
                except RuntimeError as e:  # not capturable: time it eagerly, and say so
                    torch.cuda.synchronize(device)
                    timer = f"events (graph capture failed: {str(e).splitlines()[0][:80]})"
            if median is None:
                median, iqr, runs = _time_cuda(fn, device, min_run_time, flush_l2)
    elif device.type == "cpu":
        t0 = time.perf_counter()
        fn()
        # slow calls: run long enough for ~5 of them, so that the median and IQR mean something
        median, iqr, runs = _time_cpu(fn, min(max(min_run_time, 5 * (time.perf_counter() - t0)), 10 * min_run_time))
    else:
        raise ValueError(f"device: expected a cpu or cuda device, got {device}")
    peak = peak_extra_bytes(fn, device) if memory else None
    return Timing(median_ms=median, iqr_ms=iqr, runs=runs, peak_extra_bytes=peak, timer=timer)


def measure_interleaved(fns: Sequence[Callable[[], Any]], *, device: torch.device | str, min_run_time: float = 1.0,
                        memory: bool = True, max_rounds: int = 20, rounds: int | None = None) -> list[Timing]:
    """Time several implementations of the same work against each other.

    CPU: one warm-up call each, then rounds that call every fn in turn (fn0, fn1, ..., fn0,
    fn1, ...), so that load from other processes on a shared machine hits all of them alike
    rather than whichever was timed last; median and IQR over the rounds. A round calls each
    fn enough times to last ~10 ms; rounds: enough for the slowest fn to run `min_run_time`
    seconds, at least 3 and at most `max_rounds` (or exactly `rounds`: 1 for calls of minutes;
    the IQR is then 0). CUDA: `measure` per fn (the GPU is not shared), in the same order.
    """
    device = torch.device(device)
    if not min_run_time > 0:
        raise ValueError(f"min_run_time: expected > 0 seconds, got {min_run_time}")
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
        raise ValueError(f"rounds: expected an integer >= 1 or None, got {rounds!r}")
    if device.type == "cuda":
        return [measure(fn, device=device, min_run_time=min_run_time, memory=memory) for fn in fns]
    if device.type != "cpu":
        raise ValueError(f"device: expected a cpu or cuda device, got {device}")
    est = []
    for fn in fns:
        t0 = time.perf_counter()
        fn()
        est.append(max(time.perf_counter() - t0, 1e-6))
    number = [max(1, math.ceil(0.01 / e)) for e in est]
    if rounds is None:
        rounds = min(max_rounds, max(3, math.ceil(min_run_time / max(n * e for n, e in zip(number, est)))))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(number[i]):
                fn()
            times[i].append((time.perf_counter() - t0) / number[i] * 1e3)
    out = []
    for fn, ts, n in zip(fns, times, number):
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        peak = peak_extra_bytes(fn, device) if memory else None
        out.append(Timing(median_ms=statistics.median(ts), iqr_ms=q[2] - q[0], runs=len(ts) * n,
                          peak_extra_bytes=peak, timer=f"interleaved x{len(ts)}"))
    return out


def host_timer_fn(fn: Callable[[], Any], device: torch.device | str) -> Callable[[], Any]:
    """`fn` for pytest-benchmark's host timer: on CUDA each call ends with a synchronize, so
    the time is the GPU's, not the launch's."""
    device = torch.device(device)
    if device.type != "cuda":
        return fn

    def synced():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return synced


def copy_bandwidth_gbps(device: torch.device | str, nbytes: int = 1 << 30, min_run_time: float = 0.5) -> float:
    """A practical peak memory bandwidth (GB/s): a device-to-device copy of `nbytes`,
    counting bytes read + written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device=device, min_run_time=min_run_time, memory=False, flush_l2=False)
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def gemm_peak_tflops(device: torch.device | str, dtype: torch.dtype, min_run_time: float = 0.5,
                     n: int | None = None) -> float:
    """A practical compute peak (TFLOP/s): a large square matmul in `dtype` (n = 8192 on CUDA,
    4096 fp32 / 1024 low precision on CPU, where bf16 without matrix units is slow; on 2 AVX2
    cores fp32 reached 73, 80 and 111 GFLOP/s at n = 1024, 2048, 4096), 2 n^3 FLOPs per call,
    timed with torch's thread count; the best of three timings. n: another size (a --quick
    smoke run takes a small one: the 4096 fp32 peak alone costs ~20 s on 2 CPU cores)."""
    cuda = torch.device(device).type == "cuda"
    if n is None:
        n = 8192 if cuda else (4096 if dtype == torch.float32 else 1024)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    # the best of three medians: a peak, so a busy moment of a shared machine should not lower it
    ms = min(measure(lambda: a @ b, device=device, min_run_time=min_run_time, memory=False,
                     flush_l2=False).median_ms for _ in range(3))
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` by torch's FlopCounterMode (matmuls, convolutions and
    attention; elementwise work is not counted), under no_grad."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def to_mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / _MIB


# ---------------------------------------------------------------------------------------
# Provenance

def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("tatitok_fast")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return "unknown"


def commit_id(path: str | Path | None = None) -> str:
    """`git rev-parse --short HEAD` of the checkout holding `path` (default: this package),
    with "-dirty" when the work tree differs from HEAD: modified tracked files or new files
    git does not ignore (new sources change what runs, so they count too); the package
    version when not inside a git checkout or git is missing."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read-only: never refresh the index
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return package_version()
    return head + ("-dirty" if status.strip() else "") if head else package_version()


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# the flags that decide which kernels and GEMMs a CPU runs (AVX2 vs AVX-512, bf16 units, AMX)
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> str:
    """The CPU's SIMD flags that matter here ("avx2 fma avx512f avx512_bf16 ..."), from
    /proc/cpuinfo; torch's detected CPU capability when that is unreadable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in _CPU_FLAGS if f in have) or "none of " + " ".join(_CPU_FLAGS)
    except OSError:
        pass
    return f"torch capability {torch.backends.cpu.get_cpu_capability()}"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical cores)"


def load_average() -> float | None:
    """1-minute load average (None where the OS has none). Other work on the machine skews
    CPU timings; suites record it at the start and end of a run so a loaded run shows."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def run_header(devices: list[str]) -> dict[str, Any]:
    """Provenance written above every table and into every JSON file."""
    return {
        "commit": commit_id(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device_names": {d: device_name(d) for d in devices},
        **({"cpu_flags": cpu_flags()} if any(torch.device(d).type == "cpu" for d in devices) else {}),
        "cpu_threads": torch.get_num_threads(),
        "load_avg_1m": load_average(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------
# Best against best

def fill_vs_official_best(rows: Sequence[Measurement]) -> None:
    """Set every row's `vs_official_best` to (the fastest official row's median) / (its own
    median), the official rows compared being those of the same (suite, case, device,
    shapes): whichever of the official code's modes (fp32 eager, autocast bf16, ...) was
    faster on this machine is the baseline, so no ratio is taken against a mode that no
    informed user would run. `official_best` names that row's variant. Rows of a case with
    no official row get None / "". Recomputed from scratch each call (idempotent)."""
    best: dict[tuple, Measurement] = {}
    for r in rows:
        key = (r.suite, r.case, r.device, r.shapes)
        if r.impl == "official" and r.median_ms > 0 and (key not in best or r.median_ms < best[key].median_ms):
            best[key] = r
    for r in rows:
        b = best.get((r.suite, r.case, r.device, r.shapes))
        r.vs_official_best = b.median_ms / r.median_ms if b is not None and r.median_ms > 0 else None
        r.official_best = (b.variant or b.dtype) if b is not None else ""


# ---------------------------------------------------------------------------------------
# Rendering

# (title, Measurement attribute, format); None values render as "-"
_COLUMNS: list[tuple[str, str, str]] = [
    ("case", "case", "{}"),
    ("variant", "variant", "{}"),
    ("impl", "impl", "{}"),
    ("device", "device", "{}"),
    ("dtype", "dtype", "{}"),
    ("shapes", "shapes", "{}"),
    ("median ms", "median_ms", "{:.4g}"),
    ("IQR ms", "iqr_ms", "{:.2g}"),
    ("peak extra MiB", "peak_extra_mb", "{:.4g}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("vs", "baseline", "{}"),
    ("vs official best", "vs_official_best", "{:.2f}x"),
    ("official best", "official_best", "{}"),
    ("GB/s", "gbps", "{:.1f}"),
    ("% peak", "pct_of_peak", "{:.0f}%"),
    ("TFLOP/s", "tflops", "{:.3g}"),
    ("% GEMM peak", "pct_of_gemm_peak", "{:.0f}%"),
    ("items/s", "items_per_s", "{:.3g}"),
    ("timer", "timer", "{}"),
    ("compile s", "compile_s", "{:.1f}"),
]


@dataclass
class Report:
    """A suite's results: provenance header, rows, and notes (skipped cases and why)."""

    header: dict[str, Any]
    rows: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def _columns(self) -> list[tuple[str, str, str]]:
        # throughput columns only when some row has them
        keep = {"gbps", "pct_of_peak", "tflops", "items_per_s", "timer", "vs_official_best", "official_best",
                "compile_s", "pct_of_gemm_peak"}
        return [c for c in _COLUMNS if c[1] not in keep or any(getattr(r, c[1]) not in (None, "") for r in self.rows)]

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        fill_vs_official_best(self.rows)
        cols = self._columns()
        cells = [[("-" if getattr(r, a) in (None, "") else f.format(getattr(r, a))) for _, a, f in cols]
                 for r in self.rows]
        return [t for t, _, _ in cols], cells

    def _header_lines(self) -> list[str]:
        h = self.header
        names = "; ".join(f"{d}: {n}" for d, n in h.get("device_names", {}).items())
        return [f"commit {h.get('commit')} | torch {h.get('torch')} | {names}"
                + (f" | cpu flags: {h['cpu_flags']}" if h.get("cpu_flags") else "")
                + f" | CPU threads {h.get('cpu_threads')} | load {h.get('load_avg_1m')}"
                + (f" -> {h['load_avg_1m_end']}" if "load_avg_1m_end" in h else "") + f" | {h.get('date')}"
                + (f" | official: {h['official']}" if h.get("official") else "")]

    def text(self) -> str:
        """Fixed-width table, provenance line above, notes below."""
        titles, cells = self._cells()
        widths = [max([len(t)] + [len(row[i]) for row in cells]) for i, t in enumerate(titles)]
        line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
        out = self._header_lines() + [line(titles), line(["-" * w for w in widths])] + [line(r) for r in cells]
        if not self.rows:
            out.append("(no case ran on the chosen devices)")
        return "\n".join(out + [f"note: {n}" for n in self.notes])

    def markdown(self) -> str:
        """GitHub markdown table with the provenance line and notes."""
        titles, cells = self._cells()
        out = [f"_{self._header_lines()[0]}_", "", "| " + " | ".join(titles) + " |",
               "|" + "|".join("---" for _ in titles) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in cells]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        """{"header": {...}, "rows": [one dict per Measurement, with the commit], "notes": [...]}"""
        commit = self.header.get("commit")
        fill_vs_official_best(self.rows)
        return {"header": dict(self.header),
                "rows": [{**dataclasses.asdict(r), "commit": commit} for r in self.rows],
                "notes": list(self.notes)}

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def write_markdown(self, path: str | Path) -> None:
        Path(path).write_text(self.markdown() + "\n")
