"""The benchmark harness (timing, peak extra memory, provenance, rendering) and the
`tatitok-fast bench ops` command, run for real in --quick mode on CPU."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tatitok_fast.benchmarks import harness
from tatitok_fast.benchmarks.harness import Measurement, Report, commit_id, measure, peak_extra_bytes
from tatitok_fast.benchmarks.ops import OPS, skip_reason
from tatitok_fast.cli import main
from tests.helpers import OFFICIAL, require_official

MIB = 1 << 20
QUICK = dict(device="cpu", min_run_time=0.01)


# ---------------------------------------------------------------------------------------
# harness: memory and timing

def test_peak_extra_counts_a_returned_64mib_tensor():
    t = measure(lambda: torch.ones(16 * MIB, dtype=torch.float32), **QUICK)  # 64 MiB
    assert t.peak_extra_bytes >= 64 * MIB
    assert t.peak_extra_bytes < 65 * MIB


def test_peak_extra_of_a_read_only_call_is_about_zero():
    x = torch.randn(4 * MIB)
    t = measure(lambda: x.sum(), **QUICK)
    assert t.peak_extra_bytes < 64 * 1024  # a scalar result, no temporaries of x's size


def test_peak_extra_is_the_peak_not_the_net_allocation():
    def temporary_then_small():
        big = torch.ones(8 * MIB)  # 32 MiB, freed before returning
        return big.sum()

    peak = peak_extra_bytes(temporary_then_small, "cpu")
    assert 32 * MIB <= peak < 33 * MIB


def test_timing_follows_the_work():
    t = measure(lambda: time.sleep(0.002), device="cpu", min_run_time=0.05, memory=False)
    assert t.peak_extra_bytes is None
    assert 2.0 <= t.median_ms < 20.0
    assert t.iqr_ms >= 0 and t.runs >= 2


def test_interleaved_timing_follows_the_work():
    short, long = harness.measure_interleaved([lambda: time.sleep(0.002), lambda: time.sleep(0.006)],
                                              device="cpu", min_run_time=0.05, memory=False)
    assert 2.0 <= short.median_ms < long.median_ms and 6.0 <= long.median_ms < 40.0
    assert short.timer.startswith("interleaved x") and short.runs >= 3 and short.peak_extra_bytes is None
    order = []  # calls of >= 10 ms: one per round
    harness.measure_interleaved([lambda: (order.append("a"), time.sleep(0.011)),
                                 lambda: (order.append("b"), time.sleep(0.011))], device="cpu",
                                min_run_time=1e-6, memory=False)
    assert "".join(order) == "ab" * 4  # a warm-up call of each, then 3 rounds over both in turn


def test_measure_rejects_bad_arguments():
    with pytest.raises(ValueError, match="device"):
        measure(lambda: None, device="meta")
    with pytest.raises(ValueError, match="min_run_time"):
        measure(lambda: None, device="cpu", min_run_time=0)
    with pytest.raises(ValueError, match="cuda_graph"):
        measure(lambda: None, device="cpu", cuda_graph=-1)
    assert measure(lambda: None, device="cpu", min_run_time=0.01, memory=False, cuda_graph=8).timer == ""  # CPU: ignored
    with pytest.raises(ValueError, match="impl"):
        Measurement("ops", "x", "mine", "cpu", "float32", "(1,)", 1.0, 0.0, None)


# ---------------------------------------------------------------------------------------
# harness: provenance and rendering

def test_commit_id_inside_and_outside_a_checkout(tmp_path):
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(harness.__file__).parent,
                          capture_output=True, text=True)
    if head.returncode == 0:
        assert commit_id().split("-")[0] == head.stdout.strip()
    assert commit_id(tmp_path) == harness.package_version()


def test_report_renders_text_markdown_and_json():
    rows = [Measurement("ops", "op_a", "tatitok_fast", "cpu", "float32", "x(2,3)", 1.5, 0.1, 2.0, speedup=3.0),
            Measurement("ops", "op_a", "reference", "cpu", "float32", "x(2,3)", 4.5, 0.2, 8.0)]
    report = Report(header={"commit": "abc1234", "torch": torch.__version__, "device_names": {"cpu": "a cpu"},
                            "cpu_threads": 2, "date": "today"}, rows=rows, notes=["op_b skipped"])
    text, md = report.text(), report.markdown()
    for out in (text, md):
        assert "abc1234" in out and "op_a" in out and "3.00x" in out and "op_b skipped" in out
    assert md.count("\n| ") == 3  # title row + two result rows
    data = report.to_json()
    assert [r["impl"] for r in data["rows"]] == ["tatitok_fast", "reference"]
    assert all(r["commit"] == "abc1234" for r in data["rows"])
    assert json.loads(json.dumps(data)) == data


def _model_row(case, impl, variant, dtype, ms, shapes="m B=4"):
    return Measurement("tokenizer", case, impl, "cpu", dtype, shapes, ms, 0.1, None, variant=variant)


@pytest.mark.parametrize("fp32_ms, autocast_ms", [(100.0, 700.0), (900.0, 300.0)])
def test_vs_official_best_divides_by_the_faster_official_row(fp32_ms, autocast_ms):
    # a CPU without bf16 units (autocast 7x slower than fp32) and one with them: the column
    # must take whichever official mode was faster, per case, never the other one
    rows = [_model_row("decode", "official", "fp32 eager", "float32", fp32_ms),
            _model_row("decode", "official", "autocast bfloat16", "bfloat16", autocast_ms),
            _model_row("decode", "tatitok_fast", "fp32", "float32", 80.0),
            _model_row("decode", "tatitok_fast", "fast bfloat16", "bfloat16", 50.0),
            _model_row("encode", "official", "fp32 eager", "float32", 40.0),  # another case: its own baseline
            _model_row("encode", "tatitok_fast", "fast bfloat16", "bfloat16", 20.0),
            _model_row("decode", "tatitok_fast", "fp32", "float32", 10.0, shapes="m B=8")]  # no official row
    report = Report(header={"commit": "abc1234", "device_names": {"cpu": "a cpu"}}, rows=rows)
    best_ms = min(fp32_ms, autocast_ms)
    best_name = "fp32 eager" if fp32_ms < autocast_ms else "autocast bfloat16"
    data = report.to_json()["rows"]
    assert [r["vs_official_best"] for r in data[:4]] == pytest.approx(
        [best_ms / fp32_ms, best_ms / autocast_ms, best_ms / 80.0, best_ms / 50.0])
    assert {r["official_best"] for r in data[:4]} == {best_name}
    assert data[5]["vs_official_best"] == pytest.approx(2.0) and data[5]["official_best"] == "fp32 eager"
    assert data[6]["vs_official_best"] is None and data[6]["official_best"] == ""
    md = report.markdown()
    titles = md.splitlines()[2].split(" | ")
    col = titles.index("vs official best")
    fast_line = [line for line in md.splitlines() if "fast bfloat16" in line and "m B=4" in line
                 and "decode" in line][0]
    assert fast_line.split(" | ")[col] == f"{best_ms / 50.0:.2f}x"
    assert "vs official best" in report.text()


def test_vs_official_best_column_is_absent_without_official_rows():
    rows = [_model_row("decode", "tatitok_fast", "fp32", "float32", 10.0),
            _model_row("decode", "reference", "reference_mode fp32 (extra)", "float32", 20.0)]
    report = Report(header={"commit": "abc1234"}, rows=rows)
    assert "vs official best" not in report.markdown()
    assert all(r["vs_official_best"] is None for r in report.to_json()["rows"])


# ---------------------------------------------------------------------------------------
# CLI: bench ops

def test_bench_ops_quick_cpu_writes_json_and_markdown(tmp_path, capsys):
    out_json, out_md = tmp_path / "ops.json", tmp_path / "ops.md"
    rc = main(["bench", "ops", "--quick", "--device", "cpu", "--no-progress", "--json", str(out_json),
               "--markdown", str(out_md)])
    assert rc == 0
    data = json.loads(out_json.read_text())
    header, rows = data["header"], data["rows"]
    assert header["commit"] and header["torch"] == torch.__version__
    assert header["cpu_threads"] == torch.get_num_threads() and "cpu" in header["device_names"] and header["date"]

    cpu_ops = [op for op in OPS if skip_reason(op, "cpu") is None]
    assert {"vq_nearest_code", "kl_sample", "maskgen_unmask_step", "mask_by_order"} <= set(cpu_ops)
    for op in cpu_ops:
        for impl in ("tatitok_fast", "reference"):
            assert any(r["case"] == op and r["impl"] == impl for r in rows), (op, impl)
    for r in rows:
        assert r["device"] == "cpu" and r["dtype"] and r["shapes"] and r["commit"] == header["commit"]
        assert r["median_ms"] > 0 and r["iqr_ms"] >= 0 and r["peak_extra_mb"] >= 0
    # every tatitok_fast row is followed by its reference row: speedup = their median ratio
    for ours, ref in zip(rows[::2], rows[1::2]):
        assert (ours["impl"], ref["impl"]) == ("tatitok_fast", "reference")
        assert (ours["case"], ours["variant"], ours["shapes"]) == (ref["case"], ref["variant"], ref["shapes"])
        assert ours["speedup"] == pytest.approx(ref["median_ms"] / ours["median_ms"])
    skipped = [op for op in OPS if op not in cpu_ops]
    assert all(any(op in n for n in data["notes"]) for op in skipped)

    printed = capsys.readouterr().out
    assert "vq_nearest_code" in printed and header["commit"] in printed
    assert "| vq_nearest_code |" in out_md.read_text()


def test_bench_ops_rejects_an_unknown_op(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "ops", "--quick", "--device", "cpu", "--ops", "vq_nearest_code,no_such_op"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "no_such_op" in err and all(op in err for op in OPS)


def test_bench_rejects_bad_devices_and_suites(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "ops", "--device", "tpu"])
    with pytest.raises(SystemExit):
        main(["bench", "no_such_suite"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["bench", "ops", "--quick", "--device", "cuda"])
        assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow  # `tatitok-fast bench` runs in CI in-process; 9 s
def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "tatitok_fast.cli", "bench", "ops", "--quick", "--device", "cpu",
                           "--ops", "mask_by_order", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("mask_by_order") == 4  # 2 cases x (ours, reference)


# ---------------------------------------------------------------------------------------
# Model suites against the official code (tiny models)

needs_official = pytest.mark.usefixtures("official_checkout")
QUICK_MODEL = ["--quick", "--device", "cpu", "--no-progress", "--batch", "1", "--min-run-time", "0.01"]


def _rows_by_variant(rows, case):
    return {r["variant"]: r for r in rows if r["case"] == case}


@needs_official
def test_bench_tokenizer_against_official(tmp_path):
    out = tmp_path / "r.json"
    assert main(["bench", "tokenizer", *QUICK_MODEL, "--preset", "tatitok_bl128_vq", "--cases", "decode", "--variants",
                 "official_fp32,official_autocast,fp32,fast",
                 "--official", str(OFFICIAL), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["header"]["official"] == str(OFFICIAL.resolve())
    rows = _rows_by_variant(data["rows"], "decode")
    assert list(rows) == ["fp32 eager", "autocast bfloat16", "fp32", "fast bfloat16"]
    assert [r["impl"] for r in rows.values()] == ["official", "official", "tatitok_fast", "tatitok_fast"]
    ours, fast = rows["fp32"], rows["fast bfloat16"]
    assert ours["baseline"] == "official fp32 eager" and fast["baseline"] == "official autocast bfloat16"
    assert ours["speedup"] == pytest.approx(rows["fp32 eager"]["median_ms"] / ours["median_ms"])
    assert fast["speedup"] == pytest.approx(rows["autocast bfloat16"]["median_ms"] / fast["median_ms"])


@needs_official
def test_bench_train_on_cpu_divides_by_the_faster_official_mode(tmp_path):
    # on CPU the official step runs in its configs' autocast bf16 and in fp32 (its faster mode
    # where the CPU has no bf16 units); ours runs in bf16 and fp32
    out = tmp_path / "r.json"
    assert main(["bench", "train", "--quick", "--device", "cpu", "--no-progress", "--recipe", "maskgen_vq_tiny",
                 "--backends", "bf16,fp32", "--official", str(OFFICIAL), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["impl"], r["dtype"]) for r in rows] == [("tatitok_fast", "bf16"), ("tatitok_fast", "fp32"),
                                                       ("official", "autocast bf16"), ("official", "fp32")]
    best = min(rows[2:], key=lambda r: r["median_ms"])
    for r in rows[:2]:
        assert r["official_best"] == best["dtype"]
        assert r["vs_official_best"] == pytest.approx(best["median_ms"] / r["median_ms"])
        assert r["speedup"] == pytest.approx(rows[2]["median_ms"] / r["median_ms"])  # vs the configs' precision
    assert rows[2]["speedup"] is None and rows[3]["speedup"] is None


@needs_official
def test_bench_train_names_what_the_official_code_cannot_build(tmp_path):
    # the demo's tokenizer (micro ViTs, grid-anchored latents, canvas init): our rows, and a note
    # naming each non-official option instead of the official code's KeyError
    out = tmp_path / "r.json"
    assert main(["bench", "train", "--quick", "--device", "cpu", "--no-progress", "--recipe",
                 "training/recipes/demo_tokenizer.toml", "--backends", "fp32", "--official", str(OFFICIAL),
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["impl"], r["dtype"]) for r in report["rows"]] == [("tatitok_fast", "fp32")]
    note = next(n for n in report["notes"] if "official" in n and "cannot build" in n)
    for option in ("vit_enc_model_size = 'micro'", "grid_anchored_latents = True", "decoder_init_canvas = 1.0"):
        assert option in note, note
    from tatitok_fast.benchmarks.official_training import check_official_config
    check_official_config({"model": {"vq_model": {"vit_enc_model_size": "base", "vit_dec_model_size": "large"}}})

def test_bench_train_rows_each_step_with_their_own_loss_module():
    # the recipe object is shared by the rows: each step must put its own loss module back
    # (the CPU bf16 row computes the perceptual nets in bf16, as the official loss does there)
    from tatitok_fast.benchmarks.train import Step, _recipe_path

    case = Step(_recipe_path("tatitok_bl32_vq", True), "cpu", 1, True)
    steps = {backend: case.ours(backend) for backend in ("bf16", "fp32")}
    for backend in ("bf16", "fp32", "bf16"):
        assert torch.isfinite(steps[backend]())
        assert case.recipe.loss_module.cfg.perceptual_precision == backend

@pytest.mark.parametrize("generator", ["maskgen_vq_l", "maskgen_kl_l"])
def test_bench_generate_quick_without_official(tmp_path, generator):
    out = tmp_path / "r.json"
    assert main(["bench", "generate", *QUICK_MODEL, "--generator", generator, "--steps", "2", "--no-decode",
                 "--variants", "fast,reference_mode", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    fast, ref = data["rows"]
    assert (fast["impl"], ref["impl"]) == ("tatitok_fast", "reference") and fast["case"] == "generate"
    assert fast["baseline"] == "reference reference_mode fp32 (extra)"
    assert fast["speedup"] == pytest.approx(ref["median_ms"] / fast["median_ms"])
    assert any("not the official code" in n for n in data["notes"])
    # the same counted FLOPs per call for both rows, as % of the matmul peak timed in the run
    flops = [r["tflops"] * 1e12 * r["median_ms"] * 1e-3 for r in (fast, ref)]
    assert flops[0] > 0 and flops[0] == pytest.approx(flops[1])
    peaks = data["header"]["gemm_peak_tflops"]  # bf16 rows: the fp32 peak where the CPU lacks bf16 units
    assert any("--quick: a 512x512 matmul" in n for n in data["notes"])  # a smoke run's peak, said so
    from tatitok_fast.models.nn.layers import cpu_upcasts

    for r in (fast, ref):
        dtype = "float32" if cpu_upcasts(torch.empty(0, dtype=getattr(torch, r["dtype"]))) else r["dtype"]
        assert r["pct_of_gemm_peak"] == pytest.approx(100 * r["tflops"] / peaks[f"cpu {dtype}"])


def test_count_flops_and_gemm_peak():
    lin, x = torch.nn.Linear(64, 32), torch.randn(8, 64)
    assert harness.count_flops(lambda: lin(x)) == 2 * 8 * 64 * 32
    conv, img = torch.nn.Conv2d(3, 16, 3, padding=1), torch.randn(2, 3, 8, 8)
    assert harness.count_flops(lambda: conv(img)) == 2 * (2 * 16 * 8 * 8) * (3 * 3 * 3)
    assert harness.count_flops(lambda: x.relu()) == 0  # elementwise work is not counted
    assert 0 < harness.gemm_peak_tflops("cpu", torch.float32, min_run_time=0.05, n=512) < 100


@pytest.mark.slow  # compiles two tokenizers: 35 s
def test_bench_tokenizer_compile_adds_compiled_rows_with_compile_time(tmp_path):
    out = tmp_path / "r.json"
    assert main(["bench", "tokenizer", *QUICK_MODEL, "--cases", "decode", "--variants", "fast", "--compile",
                 "--compile-cache", str(tmp_path / "cache"), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = _rows_by_variant(data["rows"], "decode")
    assert list(rows) == ["fast bfloat16", "compiled bfloat16"]
    fast, compiled = rows["fast bfloat16"], rows["compiled bfloat16"]
    assert fast["compile_s"] is None
    # the first call (the compile) is timed apart and is not in the steady-state median
    assert compiled["compile_s"] * 1e3 > compiled["median_ms"] > 0
    assert any((tmp_path / "cache").rglob("*"))
    assert "cpu_flags" in data["header"]


def test_bench_model_suites_reject_bad_options(capsys):
    for argv in (["bench", "tokenizer", "--quick", "--device", "cpu", "--variants", "fast,turbo"],
                 ["bench", "tokenizer", "--quick", "--device", "cpu", "--cases", "encode,resize"],
                 ["bench", "tokenizer", "--quick", "--device", "cpu", "--official", "/no/such/dir"],
                 ["bench", "generate", "--quick", "--device", "cpu", "--batch", "0"],
                 ["bench", "generate", "--quick", "--device", "cpu", "--min-run-time", "-1"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "turbo" in err and "resize" in err and "--official: /no/such/dir" in err and "--batch" in err
    assert "--min-run-time" in err


# ---------------------------------------------------------------------------------------
# Agreement checks: they pass on the same weights and fail loudly on different ones

@pytest.fixture
def official_checkout():
    """The official checkout; skips, or fails under CI=true, without it (helpers.require_official)."""
    return require_official()


@pytest.fixture(scope="module")
def official_lib():
    require_official()
    from tatitok_fast.benchmarks.official import import_official

    return import_official(OFFICIAL)


def test_vq_generate_agreement_and_a_mismatch(official_lib):
    from tatitok_fast import MaskGen_VQ
    from tatitok_fast.benchmarks.generate import check_vq_generate
    from tatitok_fast.benchmarks.official import AgreementError, official_model
    from tests.helpers import tiny_generator_config, tiny_text_encoder

    torch.manual_seed(0)
    ours = MaskGen_VQ(tiny_generator_config("vq")).eval()
    official = official_model(official_lib.MaskGen_VQ, ours)
    assert official.lm_head.weight is official.embeddings.weight  # tied again after the load
    te, mg = tiny_text_encoder(), ours.config["model"]["maskgen"]
    check_vq_generate(ours, official, te, ["a cat", "a dog"], 4, mg)  # same ids with the same seed
    with torch.no_grad():
        official.embeddings.weight.mul_(-1.0)  # another model: its ids must differ
    with pytest.raises(AgreementError, match="token ids differ from the official ids"):
        check_vq_generate(ours, official, te, ["a cat", "a dog"], 4, mg)


def test_tokenizer_decode_agreement_and_a_mismatch(official_lib):
    from tatitok_fast import TATiTok
    from tatitok_fast.benchmarks.official import AgreementError, official_model
    from tatitok_fast.benchmarks.tokenizer import check_decode_agreement
    from tests.helpers import tiny_tokenizer_config

    torch.manual_seed(0)
    ours = TATiTok(tiny_tokenizer_config("vae")).eval()
    official = official_model(official_lib.TATiTok, ours)
    fast = TATiTok(tiny_tokenizer_config("vae")).eval().to(torch.bfloat16)
    fast.load_state_dict(ours.state_dict())
    tokens, guidance = torch.randn(1, 4, 1, 16), torch.randn(1, 77, 64)
    check_decode_agreement(ours, fast, official, tokens, guidance, "cpu", torch.bfloat16)
    with torch.no_grad():
        official.decoder.conv_out.bias.add_(0.5)
    with pytest.raises(AgreementError, match=r"decode_tokens \(fp32\): relative error"):
        check_decode_agreement(ours, fast, official, tokens, guidance, "cpu", torch.float32)


def test_kl_decoder_agreement(official_lib):
    from tatitok_fast import MaskGen_KL
    from tatitok_fast.benchmarks.generate import check_kl_decoder
    from tatitok_fast.benchmarks.official import official_model
    from tests.helpers import tiny_generator_config, tiny_text_encoder

    torch.manual_seed(0)
    ours = MaskGen_KL(tiny_generator_config("vae")).eval()
    with torch.no_grad():  # the zero-initialised projections would make the check trivial
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    check_kl_decoder(ours, official_model(official_lib.MaskGen_KL, ours), tiny_text_encoder(), ["a", "b"])


def test_official_checkout_is_validated(tmp_path):
    from tatitok_fast.benchmarks.official import check_checkout

    with pytest.raises(ValueError, match="--official: .* is not a directory"):
        check_checkout(tmp_path / "missing")
    with pytest.raises(ValueError, match="missing modeling/tatitok.py"):
        check_checkout(tmp_path)


# ---------------------------------------------------------------------------------------
# pytest-benchmark front end (benchmarks/): same cases, not collected by plain `pytest`

REPO = Path(__file__).resolve().parents[1]


def test_plain_pytest_collects_tests_only():
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert cfg["testpaths"] == ["tests"]
    assert (REPO / "benchmarks" / "conftest.py").is_file() and not (REPO / "tests" / "benchmarks").exists()


@pytest.mark.slow  # a nested pytest-benchmark session: 22 s
def test_benchmark_modules_run_through_pytest_benchmark(tmp_path):
    """The pytest-benchmark suites collect every CLI row and run a quick one (benchmark
    disabled: each benchmarked function runs once)."""
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO), "--quick",
            "--bench-device", "cpu", "-W", "ignore::FutureWarning"]
    collect = subprocess.run(base + ["--collect-only", "benchmarks/"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert collect.returncode == 0, collect.stdout + collect.stderr
    ids = collect.stdout
    for row in ("test_tokenizer[encode-fp32]", "test_tokenizer[encode+decode-fast]", "test_generate[generate-fast]",
                "test_generate[decode-reference_mode]", "test_op[mask_by_order-default-int64-orders(8,32)-reference]"):
        assert row in ids, row
    saved = tmp_path / "bench.json"
    quick_timer = ["--benchmark-min-rounds=1", "--benchmark-max-time=0.000001", "--benchmark-warmup=off"]
    run = subprocess.run(base + quick_timer + ["--benchmark-json", str(saved), "benchmarks/test_generate.py",
                                               "--generate-args=--generator maskgen_vq_l --batch 1 --steps 2 "
                                               "--no-decode --variants fp32,fast"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout
    benches = json.loads(saved.read_text())["benchmarks"]
    assert [b["extra_info"]["variant"] for b in benches] == ["fp32", "fast bfloat16"]
    fast = benches[1]
    assert fast["extra_info"]["impl"] == "tatitok_fast" and fast["extra_info"]["dtype"] == "torch.bfloat16"
    assert fast["extra_info"]["baseline"] == ""  # neither official nor reference_mode rows: no baseline
    assert fast["group"].startswith("generate generate | tiny B=1 steps=2") and fast["stats"]["min"] > 0
