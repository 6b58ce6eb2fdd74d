"""A run checkpointed on 2 gloo ranks (FSDP2) resumes on 1 and on 3 ranks: DCP reshards model and
optimizer, every new rank reads the old ranks' data positions, and the global stream (split =
sample) goes on where it stopped: the global sample count is kept, and on 1 rank with the same
global batch the losses are those of a run that never changed its world size."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tatitok_fast.training.train import main
from tests.training.dist_worker import launch
from tests.training.shards import write_token_shards
from tests.training.test_engine import DIST_COMMON, argv, losses


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return {"vq": write_token_shards(tmp_path_factory.mktemp("ws_shards"), "vq")}


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # three launches and four runs: 42 s (the FSDP resume runs in CI, test_engine)
def test_two_ranks_resume_on_one_and_on_three(shards, tmp_path):
    ref, two = tmp_path / "ref", tmp_path / "two"
    # reference: one process, global batch 8, 4 steps, never interrupted
    assert main(argv(shards, "vq", ref, *DIST_COMMON, "--checkpoint.enable", "false")) == 0
    # 2 ranks x 4 samples (global 8) under FSDP2 for 2 steps, checkpointed
    launch(2, argv(shards, "vq", two, *DIST_COMMON, "--training.local_batch_size", "4", "--parallelism.mode", "fsdp",
                   "--checkpoint.interval", "2", "--training.stop_after", "2"))
    assert [r["data/samples"] for r in rows(two)] == [8, 16]
    three = tmp_path / "three"
    shutil.copytree(two, three)

    # on 1 rank x 8: the same global batches, so the same losses as the reference
    assert main(argv(shards, "vq", two, *DIST_COMMON, "--checkpoint.interval", "2")) == 0
    assert [r["data/samples"] for r in rows(two)] == [8, 16, 24, 32]
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(ref)), rtol=1e-4, atol=1e-5)

    # on 3 ranks x 4 (global 12): training goes on; 16 + 2 x 12 samples; finite, close losses
    launch(3, argv(shards, "vq", three, *DIST_COMMON, "--training.local_batch_size", "4",
                   "--parallelism.mode", "fsdp", "--checkpoint.interval", "2"))
    got = rows(three)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["data/samples"] for r in got] == [8, 16, 28, 40]
    resumed = torch.tensor([r["loss"] for r in got[2:]])
    assert torch.isfinite(resumed).all()
    torch.testing.assert_close(resumed, torch.tensor(losses(ref)[2:]), rtol=0.05, atol=0.0)
    assert (three / "checkpoints" / "step-4" / "rank-2.pt").is_file()  # saved on the new world size


@pytest.mark.slow  # 23 s; one rank's refusal is test_checkpoint_safety's, in CI
def test_a_rank_file_refused_on_one_rank_stops_every_rank(shards, tmp_path):
    """Only rank 1's file is hostile: both ranks stop with the error (none waits in dcp.load)."""
    from tests.training.test_checkpoint_safety import Payload, rewrite_manifest

    run = tmp_path / "run"
    common = argv(shards, "vq", run, *DIST_COMMON, "--training.local_batch_size", "4", "--parallelism.mode", "ddp",
                  "--checkpoint.interval", "1")
    launch(2, common + ["--training.stop_after", "1"])
    step = run / "checkpoints" / "step-1"
    marker = tmp_path / "code-ran"
    torch.save({"rng": Payload(marker)}, step / "rank-1.pt")
    rewrite_manifest(step)
    with pytest.raises(Exception, match="rank-1.pt: refused|another rank refused its rank file"):
        launch(2, common)
    assert not marker.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]
