"""FP8 through the trainer (tiny MaskGen-VQ on token shards, CPU, torchao emulated): the run
says how many projections it converted, logs fp8/layers in its first metrics row (the count
computed here from the module tree and fp8.py's documented rules), its losses differ from the
same run without FP8 (the Float8 casts really ran) within a tolerance, and a run where nothing
would convert stops with `error: ...` before training."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tatitok_fast.training.train import main
from tests.training.shards import write_token_shards
from tests.training.test_fp8 import expected_fp8_layers

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_token_shards(tmp_path_factory.mktemp("shards"), "vq")


def argv(shards, run: Path, *extra: str) -> list[str]:
    return ["--config", str(RECIPES / "maskgen_vq_tiny.toml"), "--data.shards", ",".join(shards),
            "--job.dump_folder", str(run), "--data.num_workers", "0", "--training.local_batch_size", "6",
            "--metrics.log_freq", "1", "--metrics.progress", "false", "--metrics.enable_tensorboard", "false",
            "--training.steps", "3", "--checkpoint.enable", "false", *extra]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_torchao_run_reports_its_layers_and_runs_float8(shards, tmp_path, capfd):
    from tatitok_fast.training.config import load_config
    from tatitok_fast.training.spec import recipe_class

    cfg = load_config(RECIPES / "maskgen_vq_tiny.toml", ["--data.shards", ",".join(shards)])
    model = recipe_class(cfg.job.recipe)(cfg, torch.device("cpu")).build_model()
    expected = len(expected_fp8_layers(model, cfg.fp8.min_features))
    total = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert expected > 0

    ref, f8 = tmp_path / "fp32", tmp_path / "fp8"
    assert main(argv(shards, ref)) == 0
    capfd.readouterr()
    assert main(argv(shards, f8, "--fp8.backend", "torchao", "--fp8.emulate", "true")) == 0
    err = capfd.readouterr().err
    assert f"fp8: {expected} of {total} projections converted (torchao, tensorwise, emulated)" in err

    got, want = rows(f8), rows(ref)
    assert got[0]["fp8/layers"] == expected
    assert all("fp8/layers" not in r for r in got[1:]) and all("fp8/layers" not in r for r in want)
    a = torch.tensor([r["loss"] for r in want])
    b = torch.tensor([r["loss"] for r in got])
    assert torch.isfinite(b).all()
    assert not torch.equal(a, b), "FP8 losses equal the fp32 ones: no Float8 matmul ran"
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.02)


def test_nothing_to_convert_is_a_clear_error(shards, tmp_path):
    run = tmp_path / "none"
    proc = subprocess.run([sys.executable, "-m", "tatitok_fast.training.train",
                           *argv(shards, run, "--fp8.backend", "torchao", "--fp8.min_features", "100000")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert "error: fp8.backend = 'torchao': none of the model's" in proc.stderr
    assert "fp8.min_features = 100000" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run / "metrics.jsonl").exists()


def test_bench_train_rows_name_the_fp8_layer_count():
    import argparse

    from tatitok_fast.benchmarks import train as bench_train

    args = argparse.Namespace(recipe="maskgen_vq_tiny", batch=None, backends="bf16,torchao", official=None, quick=True)
    report = bench_train.run(args, ["cpu"])
    step = bench_train.Step(bench_train._recipe_path("maskgen_vq_tiny", True), "cpu", 4, True, loss=False)
    model = step.model
    expected = len(expected_fp8_layers(model, step.cfg.fp8.min_features))
    total = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    by_dtype = {r.dtype: r for r in report.rows}
    assert by_dtype["bf16"].variant == "bf16"
    assert by_dtype["torchao"].variant == f"{expected} of {total} layers FP8 (tensorwise, emulated)"
    assert f"{expected} of {total}" in report.text()
