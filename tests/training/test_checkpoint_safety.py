"""What resume reads from a run folder, and what it does when a checkpoint cannot be used:
- a rank file or DCP metadata that would run code when unpickled is refused, and nothing runs;
- an intact checkpoint that does not fit the run stops it (no silent restart from step 0),
  unless checkpoint.allow_restart, which starts over and sets the old step aside;
- Transformer Engine's `_extra_state` (empty on a fresh module, a serialized blob after FP8
  DelayedScaling steps: TransformerEngine issue #1860) round-trips through DCP;
- a healthy single-process run with checkpoints and a resume prints no warning at all."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tatitok_fast.cli import main as cli_main
from tatitok_fast.training.checkpoint import COMPLETE, CheckpointManager
from tatitok_fast.training.parallel import World
from tatitok_fast.training.train import main
from tests.training.shards import write_token_shards
from tests.training.test_engine import argv


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return {"vq": write_token_shards(tmp_path_factory.mktemp("safety_shards"), "vq", shards=1)}


@pytest.fixture(scope="module")
def saved_run(shards, tmp_path_factory):
    """A finished 2-step run with its checkpoint at step 2 (copied per test)."""
    run = tmp_path_factory.mktemp("saved") / "run"
    assert main(argv(shards, "vq", run, "--training.steps", "2", "--checkpoint.interval", "2")) == 0
    return run


def copy_run(saved_run: Path, tmp_path: Path) -> Path:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    return run


class Payload:
    """Unpickling this writes a file: what a hostile run folder could do with pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def rewrite_manifest(step_dir: Path) -> None:
    """Sizes in COMPLETE as they are now: the folder is intact, only its content is hostile."""
    files = sorted(f for f in step_dir.iterdir() if f.is_file() and f.name != COMPLETE)
    (step_dir / COMPLETE).write_text("".join(f"{f.name} {f.stat().st_size}\n" for f in files))


@pytest.mark.parametrize("target", ["rank-0.pt", ".metadata"])
def test_a_pickle_that_would_run_code_is_refused(shards, saved_run, tmp_path, capsys, target):
    run = copy_run(saved_run, tmp_path)
    step = run / "checkpoints" / "step-2"
    marker = tmp_path / "code-ran"
    if target == "rank-0.pt":
        torch.save({"rng": Payload(marker), "data": {}}, step / target)
    else:
        import pickle

        (step / target).write_bytes(pickle.dumps(Payload(marker)))
    rewrite_manifest(step)
    rc = cli_main(["train", *argv(shards, "vq", run, "--training.steps", "4", "--checkpoint.interval", "2")])
    err = capsys.readouterr().err
    assert rc == 2
    line = next(l for l in err.splitlines() if l.startswith("error: "))
    assert target in line and "refused" in line, line
    assert not marker.exists()  # nothing ran
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]  # nothing trained or saved
    # the file really was hostile: a plain unpickling runs it
    if target == "rank-0.pt":
        torch.load(step / target, weights_only=False)
    else:
        import pickle

        pickle.loads((step / target).read_bytes())
    assert marker.read_text() == "ran"


def test_a_checkpoint_that_does_not_fit_stops_the_run(shards, saved_run, tmp_path, capsys):
    run = copy_run(saved_run, tmp_path)
    wider = ["--model.overrides", '{"model.maskgen.decoder_embed_dim": 128, "model.maskgen.decoder_num_heads": 4}']
    common = ["--training.steps", "2", "--checkpoint.interval", "2", *wider]
    assert cli_main(["train", *argv(shards, "vq", run, *common)]) == 2
    line = next(l for l in capsys.readouterr().err.splitlines() if l.startswith("error: "))
    assert "step-2" in line and "does not fit" in line and "of other shapes" in line, line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    before = (run / "metrics.jsonl").read_text()
    # allowed to start over: from step 0, the unusable step kept aside under another name
    assert main(argv(shards, "vq", run, *common, "--checkpoint.allow_restart", "true")) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-2.unloadable"]
    new_rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text()[len(before):].splitlines()]
    assert [r["step"] for r in new_rows] == [1, 2]


class FP8MetaLinear(nn.Linear):
    """Transformer Engine's extra-state contract (te module base: get/set_extra_state): an empty
    uint8 tensor before any FP8 step; after DelayedScaling steps, a uint8 tensor holding the
    serialized scaling state, whose length depends on the amax history."""

    def __init__(self):
        super().__init__(4, 4)
        self.fp8_meta: dict | None = None

    def get_extra_state(self) -> torch.Tensor:
        if self.fp8_meta is None:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(json.dumps(self.fp8_meta).encode()), dtype=torch.uint8).clone()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.fp8_meta = json.loads(bytes(state.tolist())) if state.numel() else None


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(FP8MetaLinear(), nn.ReLU(), FP8MetaLinear())
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_te_extra_state_round_trips_through_dcp(tmp_path):
    world = World(0, 1, 0, torch.device("cpu"))
    model, opt = _model_and_optimizer(0)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    model[0].fp8_meta = {"amax_history": [[0.5, 1.25, 3.0]] * 7, "scale": [2.0, 4.0], "recipe": "delayed"}
    model[2].fp8_meta = {"amax_history": [[0.1]], "scale": [1.0], "recipe": "delayed"}
    CheckpointManager(tmp_path / "ckpt", world, 0).save(1, model, opt, {})

    # plain DCP into a fresh module fails: the empty placeholder is not the saved blob's size
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    plain, plain_opt = _model_and_optimizer(1)
    msd, osd = get_state_dict(plain, plain_opt)
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings(), pytest.raises(CheckpointException, match="Size mismatch.*_extra_state"):
        warnings.simplefilter("ignore")
        dcp.load({"model": msd, "optimizer": osd, "step": 0}, checkpoint_id=str(tmp_path / "ckpt" / "step-1"))

    fresh, fresh_opt = _model_and_optimizer(1)
    assert fresh[0].fp8_meta is None
    step, _ = CheckpointManager(tmp_path / "ckpt", world, 0).load_latest(fresh, fresh_opt, {})
    assert step == 1
    assert fresh[0].fp8_meta == model[0].fp8_meta and fresh[2].fp8_meta == model[2].fp8_meta
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow  # 23 s; a subprocess run with every warning shown
def test_a_healthy_run_prints_no_warning(shards, tmp_path):
    """Two launches as a user makes them (save, then resume and save), every Python warning
    shown (-W always), a data worker, TensorBoard on: stderr holds only the resume line."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    root = Path(__file__).resolve().parents[2]
    errs = []
    for stop in (2, 4):
        cmd = [sys.executable, "-W", "always", "-m", "tatitok_fast.training.train",
               *argv(shards, "vq", run, "--training.steps", "4", "--checkpoint.interval", "2",
                     "--training.stop_after", str(stop), "--data.num_workers", "1",
                     "--metrics.enable_tensorboard", "true")]
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        errs += proc.stderr.splitlines()
    assert errs == [f"resumed from {run / 'checkpoints' / 'step-2'}"]


@pytest.mark.parametrize("damaged", [".metadata", "rank-0.pt"])
def test_a_damaged_latest_step_falls_back_by_name(shards, tmp_path, damaged):
    """Same size as the manifest says, but garbage inside: corrupt, not hostile -> the previous
    step is loaded, and the warning names the damaged one."""
    run = tmp_path / "run"
    assert main(argv(shards, "vq", run, "--training.steps", "4", "--checkpoint.interval", "2",
                     "--training.stop_after", "4")) == 0
    f = run / "checkpoints" / "step-4" / damaged
    f.write_bytes(bytes(reversed(f.read_bytes())))  # same size, not a pickle any more
    with pytest.warns(RuntimeWarning, match=f"step-4 could not be loaded: it is corrupt.*{damaged}"):
        assert main(argv(shards, "vq", run, "--training.steps", "6", "--checkpoint.interval", "2")) == 0
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6]  # resumed from step 2
