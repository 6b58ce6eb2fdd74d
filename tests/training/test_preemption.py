"""Preemption as SLURM / Kubernetes do it: SIGTERM sent to a running `python -m
tatitok_fast.training.train` process. It finishes its step, saves a complete checkpoint at
that step, says so and exits 0; the next launch resumes from it, and the result is bitwise the
result of a run that was never interrupted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tatitok_fast.training.checkpoint import COMPLETE
from tatitok_fast.training.train import main
from tests.training.shards import write_token_shards
from tests.training.test_engine import argv, final_params, losses

ROOT = Path(__file__).resolve().parents[2]
# a schedule far longer than the test runs, so the signal always lands in mid-training
COMMON = ["--training.steps", "400", "--checkpoint.interval", "1000", "--data.shuffle_buffer", "16",
          "--data.shuffle_initial", "8", "--optimizer.lr", "3e-3", "--lr_scheduler.warmup_steps", "2"]


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def test_sigterm_saves_a_checkpoint_and_resumes_exactly(tmp_path):
    shards = {"vq": write_token_shards(tmp_path / "shards", "vq")}
    run, ref = tmp_path / "run", tmp_path / "ref"
    cmd = [sys.executable, "-m", "tatitok_fast.training.train", *argv(shards, "vq", run, *COMMON)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while len(logged_steps(run)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    stopped = logged_steps(run)[-1]
    assert 2 <= stopped < 400
    assert f"preempted (SIGTERM) after step {stopped} of 400" in err, err
    assert "Traceback" not in err, err
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == [f"step-{stopped}"], ckpts  # complete (renamed from .partial after its manifest)
    manifest = (run / "checkpoints" / f"step-{stopped}" / COMPLETE).read_text()
    assert "rank-0.pt" in manifest and ".distcp" in manifest
    assert not (run / "export").exists()  # not the end of training: no export

    # the next launch resumes from it; two more steps == the same steps uninterrupted
    more = ["--training.stop_after", str(stopped + 2)]
    assert main(argv(shards, "vq", run, *COMMON, *more)) == 0
    assert main(argv(shards, "vq", ref, *COMMON, *more)) == 0
    assert logged_steps(run) == list(range(1, stopped + 3))
    assert losses(run) == losses(ref)
    a, b = final_params(run, "vq"), final_params(ref, "vq")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
