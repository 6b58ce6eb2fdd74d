"""The tiny recipes on 2 gloo ranks, under DDP and under FSDP2, give the losses of one
process on the same global batch (data.split = sample: each rank keeps every other sample of
the one stream). TA-TiTok VQ (clustering VQ), TA-TiTok KL (per-sample posterior noise) and
MaskGen KL (per-sample posterior noise, orders and DiffLoss draws, one masking rate per step)
here; MaskGen VQ: tests/training/test_engine.py (test_ddp_two_ranks_match_one_process,
test_fsdp_two_ranks_match_one_process_across_a_resume)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from tatitok_fast.training.train import main
from tests.training.dist_worker import launch
from tests.training.test_effects import images, shards, tatitok_argv  # noqa: F401  (fixtures)
from tests.training.test_engine import DIST_COMMON, argv

STEPS = ["--training.steps", "3", "--lr_scheduler.warmup_steps", "0", "--checkpoint.enable", "false"]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def recipe_argv(name: str, data: dict, run: Path, batch: int) -> list[str]:
    if name.startswith("tatitok"):
        return tatitok_argv(name.split("_")[1], data["images"], run, *STEPS, "--optimizer.lr", "3e-3",
                            "--training.local_batch_size", str(batch))
    return argv(data["shards"], {"vq": "vq", "kl": "vae"}[name.split("_")[1]], run, *DIST_COMMON, *STEPS, "--training.local_batch_size",
                str(batch))


@pytest.fixture(scope="module")
def data(images, shards):  # noqa: F811
    return {"images": images, "shards": shards}


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """Reference losses per recipe: 1 process x 8 samples, made on first use."""
    done = {}

    def get(name: str) -> list[float]:
        if name not in done:
            run = tmp_path_factory.mktemp(f"one_{name}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert main(recipe_argv(name, data, run, 8)) == 0
            done[name] = losses(run)
        return done[name]

    return get


@pytest.mark.parametrize("name, mode", [  # one DDP and one FSDP case in CI, the rest in the slow tier (13 s each)
    ("tatitok_vq", "ddp"), ("maskgen_kl", "fsdp"),
    *[pytest.param(n, m, marks=pytest.mark.slow) for n, m in (("tatitok_vq", "fsdp"), ("tatitok_vae", "ddp"),
                                                              ("tatitok_vae", "fsdp"), ("maskgen_kl", "ddp"))]])
def test_two_ranks_match_one_process(data, one_process, tmp_path, name, mode):
    run = tmp_path / mode
    launch(2, recipe_argv(name, data, run, 4) + ["--parallelism.mode", mode])
    ref, got = torch.tensor(one_process(name)), torch.tensor(losses(run))
    assert len(got) == len(ref) == 3
    assert len(set(ref.tolist())) == 3  # the steps change the model
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-6)
