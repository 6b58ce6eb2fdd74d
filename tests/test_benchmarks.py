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


def test_measure_rejects_bad_arguments():
    with pytest.raises(ValueError, match="device"):
        measure(lambda: None, device="meta")
    with pytest.raises(ValueError, match="min_run_time"):
        measure(lambda: None, device="cpu", min_run_time=0)
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


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "tatitok_fast.cli", "bench", "ops", "--quick", "--device", "cpu",
                           "--ops", "mask_by_order", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("mask_by_order") == 4  # 2 cases x (ours, reference)


@pytest.mark.parametrize("suite, extra, cases", [
    ("tokenizer", [], {"encode", "decode"}),
    ("generate", ["--generator", "maskgen_vq_l"], {"generate", "decode"}),
    ("generate", ["--generator", "maskgen_kl_l", "--no-decode"], {"generate"}),
])
def test_bench_model_suites_quick_cpu(tmp_path, suite, extra, cases):
    out = tmp_path / "r.json"
    assert main(["bench", suite, "--quick", "--device", "cpu", "--no-progress", "--json", str(out), *extra]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["case"] for r in rows} == cases
    for case in cases:
        fast, ref = [r for r in rows if r["case"] == case]
        assert (fast["impl"], ref["impl"]) == ("tatitok_fast", "reference")
        assert fast["items_per_s"] > 0 and ref["items_per_s"] > 0 and fast["speedup"] > 0
        assert fast["speedup"] == pytest.approx(ref["median_ms"] / fast["median_ms"])
