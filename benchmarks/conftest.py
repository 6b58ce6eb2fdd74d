"""pytest-benchmark front end of the benchmark suites.

The tests here time exactly the callables `tatitok-fast bench ops|tokenizer|generate` times:
the cases come from the same suite modules (tatitok_fast/benchmarks/), built with the same
options, after the same agreement checks against the official code. Only the timer differs
(pytest-benchmark's rounds instead of the harness's interleaved rounds), which buys its
storage and comparison:

    pytest benchmarks/ --benchmark-only --quick                        # tiny shapes, all suites
    pytest benchmarks/test_tokenizer.py --benchmark-only --official ../shared/peer/1d-tokenizer \\
        --tokenizer-args="--preset tatitok_bl128_vq --batch 4" --benchmark-autosave
    pytest benchmarks/ --benchmark-only ... --benchmark-compare      # against the last saved run

Benchmarks of one case form one group (compare the variants' columns within it); every
result carries impl, variant, dtype, shapes, device, commit and the baseline the CLI divides
by in `extra_info`. `python -m pytest` (testpaths = tests) never collects this directory.
"""
from __future__ import annotations

import argparse
import importlib
import shlex

import pytest
import torch

from tatitok_fast.benchmarks.harness import commit_id, host_timer_fn
from tatitok_fast.cli.bench import SUITES, add_common_arguments

SUITE_ARGS = {"ops": "--ops-args", "tokenizer": "--tokenizer-args", "generate": "--generate-args"}


def pytest_addoption(parser):
    group = parser.getgroup("tatitok_fast", "tatitok_fast benchmark suites")
    group.addoption("--quick", action="store_true", help="small shapes (what the CLI's --quick runs)")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None,
                    help="where to run (default: cuda when available, else cpu)")
    group.addoption("--official", metavar="PATH", default=None,
                    help="checkout of bytedance/1d-tokenizer: also time the official code (model suites)")
    for suite, opt in SUITE_ARGS.items():
        group.addoption(opt, metavar="ARGS", default="",
                        help=f"more options of `tatitok-fast bench {suite}`, as one string")


def _device(config) -> str:
    device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: CUDA is not available on this machine")
    return device


def suite_args(config, suite: str) -> argparse.Namespace:
    """The suite's options as the CLI parses them: --<suite>-args, plus --quick/--official."""
    cache = config.stash.setdefault(_ARGS_KEY, {})
    if suite in cache:
        return cache[suite]
    module = importlib.import_module(SUITES[suite])
    parser = argparse.ArgumentParser(prog=f"{SUITE_ARGS[suite]}", add_help=False, exit_on_error=False)
    add_common_arguments(parser)
    module.add_arguments(parser)
    argv = shlex.split(config.getoption(SUITE_ARGS[suite])) + ["--no-progress"]
    if config.getoption("--quick"):
        argv.append("--quick")
    if config.getoption("--official") and suite != "ops":
        argv += ["--official", config.getoption("--official")]
    try:
        args = parser.parse_args(argv)
        if hasattr(module, "check_args"):
            module.check_args(args)
    except (argparse.ArgumentError, ValueError, SystemExit) as e:
        raise pytest.UsageError(f"{SUITE_ARGS[suite]}: {e}") from None
    args.device = _device(config)
    cache[suite] = args
    return args


_ARGS_KEY = pytest.StashKey[dict]()
_CASES_KEY = pytest.StashKey[dict]()


def pytest_generate_tests(metafunc):
    """Parametrize over exactly the rows the CLI would time with the same options."""
    suite = getattr(metafunc.module, "SUITE", None)
    if suite is None:
        return
    args = suite_args(metafunc.config, suite)
    module = importlib.import_module(SUITES[suite])
    if "model_row" in metafunc.fixturenames:
        rows = [(c, v) for c in module.case_names(args) for v in args.variants]
        metafunc.parametrize("model_row", rows, ids=[f"{c}-{v}" for c, v in rows])
    if "op_row" in metafunc.fixturenames:
        rows = [(op, i, impl) for op in args.ops for i, _ in enumerate(module.OPS[op][0](args.quick))
                for impl in ("tatitok_fast", "reference")]
        ids = []
        for op, i, impl in rows:
            c = module.OPS[op][0](args.quick)[i]
            ids.append(f"{op}-{c.variant or 'default'}-{str(c.dtype).removeprefix('torch.')}-{c.shapes}-{impl}"
                       .replace(" ", ""))
        metafunc.parametrize("op_row", rows, ids=ids)


def _model_cases(config, suite: str) -> dict:
    """{case name: ModelCase}, built (and checked against the official code) once per session;
    a failure is kept and raised again for every row of the suite."""
    cache = config.stash.setdefault(_CASES_KEY, {})
    if suite not in cache:
        args = suite_args(config, suite)
        module = importlib.import_module(SUITES[suite])
        notes: list[str] = []
        try:
            cache[suite] = ({c.case: c for c in module.cases(args, args.device, notes)}, notes)
        except Exception as e:  # noqa: BLE001 - re-raised for every row
            cache[suite] = e
    if isinstance(cache[suite], Exception):
        raise cache[suite]
    return cache[suite]


@pytest.fixture
def run_model_row(benchmark, request):
    """run(suite, (case, variant)): time one row of a model suite with pytest-benchmark."""

    def run(suite: str, row: tuple[str, str]) -> None:
        case_name, key = row
        cases, notes = _model_cases(request.config, suite)
        args = suite_args(request.config, suite)
        case = cases[case_name]
        variant = next((v for v in case.variants if v.key == key), None)
        if variant is None:
            pytest.skip(f"{suite} {case_name}: no {key} row on {args.device}" + (f" ({'; '.join(notes)})" if notes
                                                                                 else ""))
        base = case.baseline_of(key)
        benchmark.group = f"{suite} {case_name} | {case.shapes} | {args.device}"
        benchmark.extra_info.update(impl=variant.impl, variant=variant.label(), dtype=str(variant.dtype),
                                    shapes=case.shapes, device=args.device, commit=commit_id(),
                                    items_per_call=case.items,
                                    baseline="" if base is None else f"{base.impl} {base.label()}")
        benchmark(host_timer_fn(variant.fn, args.device))

    return run


@pytest.fixture
def run_op_row(benchmark, request):
    """run((op, case index, impl)): time one op case, ours or the reference twin."""
    from tatitok_fast.benchmarks import ops

    def run(row: tuple[str, int, str]) -> None:
        op, i, impl = row
        args = suite_args(request.config, "ops")
        reason = ops.skip_reason(op, args.device)
        if reason:
            pytest.skip(reason)
        built = request.config.stash.setdefault(_CASES_KEY, {}).setdefault("ops", {})
        case = ops.OPS[op][0](args.quick)[i]
        if (op, i) not in built:
            torch.manual_seed(0)
            built[(op, i)] = case.build(torch.device(args.device))
        fn = built[(op, i)][0 if impl == "tatitok_fast" else 1]
        benchmark.group = f"ops {op} {case.variant} | {case.shapes} | {args.device}"
        benchmark.extra_info.update(impl=impl, dtype=str(case.dtype), shapes=case.shapes, device=args.device,
                                    commit=commit_id(), baseline="reference" if impl == "tatitok_fast" else "")
        benchmark(host_timer_fn(fn, args.device))

    return run
