"""A NaN loss in the middle of a run (a test-only recipe hook: the tiny MaskGen's loss times NaN
at one step, so its gradients are NaN too). `stop` ends the run with an error naming the step
and the loss terms, detected at log time (no per-step host sync) and never saved; `skip`
finishes, counts one skipped step (across a resume), and leaves weights and optimizer state
exactly as they were."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tatitok_fast.cli import main as cli_main
from tatitok_fast.training.recipes.maskgen import MaskGenRecipe
from tatitok_fast.training.train import main
from tests.training.test_engine import argv, final_params

BAD_STEP = 3  # 1-based, as metrics.jsonl counts steps


@pytest.fixture
def nan_at_step_3(monkeypatch):
    original = MaskGenRecipe.forward_loss

    def forward_loss(self, model, batch, step):
        out = original(self, model, batch, step)
        if step + 1 == BAD_STEP:  # `step` is the 0-based count of steps done
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MaskGenRecipe, "forward_loss", forward_loss)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from tests.training.shards import write_token_shards

    return {"vq": write_token_shards(tmp_path_factory.mktemp("nan_shards"), "vq", shards=1)}


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def dcp_model(step_dir: Path) -> dict[str, torch.Tensor]:
    """The model entries of one DCP checkpoint (any step, not only the newest)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = step_dir.parent / f"{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    return torch.load(out, weights_only=True)["model"]


def test_stop_names_the_step_and_keeps_the_last_good_checkpoint(shards, tmp_path, nan_at_step_3, capsys):
    run = tmp_path / "run"
    rc = cli_main(["train", *argv(shards, "vq", run, "--training.steps", "8", "--checkpoint.interval", "2",
                                  "--metrics.log_freq", "4")])
    err = capsys.readouterr().err
    assert rc == 2
    line = next(l for l in err.splitlines() if l.startswith("error: "))
    assert "non-finite loss at step 3" in line and "before logging step 4" in line, line
    assert "non-finite terms:" in line and "loss" in line, line
    assert "Traceback" not in err
    # detected at log time (step 4), after the step-2 save and before the step-4 one
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    assert not (run / "metrics.jsonl").read_text()  # the first row (step 4) was not written
    params = final_params(run, "vq")  # the kept checkpoint loads, and holds finite weights
    assert all(torch.isfinite(v).all() for v in params.values())
    assert params["optimizer.step"].item() == 2


def test_skip_counts_the_step_and_leaves_the_weights_untouched(shards, tmp_path, nan_at_step_3):
    run = tmp_path / "run"
    common = ["--training.steps", "6", "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "0",
              "--training.nonfinite", "skip"]
    assert main(argv(shards, "vq", run, *common, "--training.stop_after", "4")) == 0
    assert main(argv(shards, "vq", run, *common)) == 0  # resumed: the count goes on
    logged = rows(run)
    assert [r["skipped_steps"] for r in logged] == [0, 0, 1, 1, 1, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged if r["step"] != BAD_STEP)
    ckpt = run / "checkpoints"
    before, after, next_one = (dcp_model(ckpt / f"step-{s}") for s in (2, 3, 4))
    for k in before:  # the skipped update changed nothing; the next one does
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(after[k], next_one[k]) for k in after)
    final = final_params(run, "vq")
    assert all(torch.isfinite(v).all() for v in final.values())
    # AdamW's own step count: 5 updates in 6 steps (the fused kernel undid the skipped one)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt / "step-6", ckpt / "step-6.pt")
    opt = torch.load(ckpt / "step-6.pt", weights_only=True)["optimizer"]["state"]
    assert {float(s["step"]) for s in opt.values()} == {5.0}
