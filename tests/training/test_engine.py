"""The training engine on a tiny real MaskGen over real token shards: exact resume (plain,
EMA, FSDP2), a corrupt checkpoint falling back to the previous one, 1 vs 2 processes (DDP and
FSDP2 over gloo) giving the same losses, FP8 through torchao (emulated), corrupt samples
skipped and counted, export loadable by from_pretrained."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from tatitok_fast.training.train import Trainer, main
from tatitok_fast.training.config import load_config
from tests.training.dist_worker import launch
from tests.training.shards import write_token_shards

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return {"vq": write_token_shards(root / "vq", "vq"), "vae": write_token_shards(root / "vae", "vae")}


def argv(shards, mode: str, run: Path, *extra: str) -> list[str]:
    recipe = RECIPES / ("maskgen_vq_tiny.toml" if mode == "vq" else "maskgen_kl_tiny.toml")
    return ["--config", str(recipe), "--data.shards", ",".join(shards[mode]), "--job.dump_folder", str(run),
            "--data.num_workers", "0", "--training.local_batch_size", "8", "--metrics.log_freq", "1",
            "--metrics.progress", "false", "--metrics.enable_tensorboard", "false", *extra]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_params(run: Path, mode: str) -> dict[str, torch.Tensor]:
    """The parameters of the newest checkpoint, loaded by a fresh Trainer (no training)."""
    cfg = load_config(run / "config.toml",  # the run's own config: its shards must exist (checked up front)
                      ["--job.dump_folder", str(run), "--data.num_workers", "0",
                       "--metrics.progress", "false", "--metrics.enable_tensorboard", "false"])
    trainer = Trainer(cfg)
    out = {k: v.detach().clone() for k, v in trainer.inner.state_dict().items()}
    out.update({f"ema.{k}": v.clone() for k, v in trainer.ema.state_dict()["shadow"].items()})
    out["optimizer.step"] = torch.tensor(float(trainer.scheduler.last_epoch))
    trainer.close()
    return out


@pytest.mark.parametrize("mode", ["vq", "vae"])
def test_resume_is_exact(shards, tmp_path, mode):
    """K steps, stop, resume, K more == 2K uninterrupted (bitwise, fp32 CPU), EMA included."""
    full, split = tmp_path / "full", tmp_path / "split"
    common = ["--checkpoint.interval", "3", "--data.shuffle_buffer", "16", "--data.shuffle_initial", "8"]
    common = [*common, "--training.steps", "6", "--optimizer.lr", "3e-3", "--lr_scheduler.warmup_steps", "2"]
    assert main(argv(shards, mode, full, *common)) == 0
    assert main(argv(shards, mode, split, *common, "--training.stop_after", "3")) == 0
    assert main(argv(shards, mode, split, *common)) == 0
    assert losses(split) == losses(full)  # the resumed run appended steps 4..6 to metrics.jsonl
    a, b = final_params(full, mode), final_params(split, mode)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_corrupt_latest_checkpoint_falls_back(shards, tmp_path):
    run = tmp_path / "run"
    assert main(argv(shards, "vq", run, "--training.steps", "4", "--checkpoint.interval", "2")) == 0
    latest = run / "checkpoints" / "step-4"
    data = next(latest.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncated write
    cfg = load_config(RECIPES / "maskgen_vq_tiny.toml",
                      ["--job.dump_folder", str(run), "--data.shards", ",".join(shards["vq"]),
                       "--data.num_workers", "0", "--metrics.progress", "false"])
    with pytest.warns(RuntimeWarning, match="step-4.*could not be loaded"):
        trainer = Trainer(cfg)
    assert trainer.step == 2
    trainer.close()


def test_half_written_step_is_ignored(shards, tmp_path):
    run = tmp_path / "run"
    assert main(argv(shards, "vq", run, "--training.steps", "2", "--checkpoint.interval", "2")) == 0
    (run / "checkpoints" / "step-9.partial").mkdir()  # a save interrupted before its rename
    (run / "checkpoints" / "step-7").mkdir()  # no COMPLETE manifest
    cfg = load_config(RECIPES / "maskgen_vq_tiny.toml", ["--job.dump_folder", str(run), "--data.shards",
                                                          ",".join(shards["vq"]), "--data.num_workers", "0",
                                                          "--metrics.progress", "false"])
    trainer = Trainer(cfg)
    assert trainer.step == 2
    trainer.close()


# Same global batch (split = sample) at any world size; the loss is a plain mean (unmasked
# weight 1), so the mean of the ranks' losses is the global one; a large lr without warmup
# makes every step's update visible in the next loss.
DIST_COMMON = ["--training.steps", "4", "--data.split", "sample", "--data.shuffle_buffer", "0",
               "--loss.unmasked_weight", "1.0", "--optimizer.lr", "3e-3", "--lr_scheduler.warmup_steps", "0"]


@pytest.fixture(scope="module")
def one_process_run(shards, tmp_path_factory):
    """4 steps in one process with a global batch of 8: the reference for the 2-rank runs."""
    run = tmp_path_factory.mktemp("one")
    assert main(argv(shards, "vq", run, *DIST_COMMON, "--checkpoint.enable", "false")) == 0
    return losses(run)


def test_fsdp_two_ranks_match_one_process_across_a_resume(shards, tmp_path, one_process_run):
    """2 gloo ranks x 4 samples under FSDP2, stopped after 2 steps and resumed from the DCP
    checkpoint (sharded model, optimizer, EMA, RNG, data position), give the losses of 1
    process x 8 samples."""
    run = tmp_path / "fsdp"
    two = argv(shards, "vq", run, *DIST_COMMON, "--training.local_batch_size", "4", "--parallelism.mode", "fsdp",
               "--checkpoint.interval", "2")
    launch(2, two + ["--training.stop_after", "2"])
    launch(2, two)
    torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(one_process_run), rtol=2e-5, atol=1e-6)


def test_gradient_accumulation_matches_the_full_batch(shards, tmp_path, one_process_run):
    """2 micro-batches of 4 == one batch of 8 (same samples, plain-mean loss)."""
    run = tmp_path / "accum"
    assert main(argv(shards, "vq", run, *DIST_COMMON, "--training.local_batch_size", "4",
                     "--training.grad_accum_steps", "2", "--checkpoint.enable", "false")) == 0
    torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(one_process_run), rtol=2e-5, atol=1e-6)


@pytest.mark.slow  # DDP's two ranks also run in CI in test_recipes_distributed
def test_ddp_two_ranks_match_one_process(shards, tmp_path, one_process_run):
    run = tmp_path / "ddp"
    launch(2, argv(shards, "vq", run, *DIST_COMMON, "--training.local_batch_size", "4", "--parallelism.mode", "ddp",
                   "--checkpoint.enable", "false"))
    torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(one_process_run), rtol=2e-5, atol=1e-6)


def test_torchao_fp8_emulated_trains_close_to_bf16(shards, tmp_path):
    pytest.importorskip("torchao")
    common = ["--training.steps", "4", "--checkpoint.enable", "false", "--training.mixed_precision", "bf16",
              "--model.overrides", '{"model.maskgen.decoder_embed_dim": 128, "model.maskgen.decoder_num_heads": 4}']
    ref, f8 = tmp_path / "bf16", tmp_path / "fp8"
    assert main(argv(shards, "vq", ref, *common)) == 0
    assert main(argv(shards, "vq", f8, *common, "--fp8.backend", "torchao", "--fp8.emulate", "true")) == 0
    a, b = torch.tensor(losses(ref)), torch.tensor(losses(f8))
    assert torch.isfinite(b).all()
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)
    export = next((f8 / "export").iterdir())
    from tatitok_fast.models.generators.maskgen import MaskGen_VQ

    MaskGen_VQ.from_pretrained(export)  # Float8Linear weights export under the official names


def test_te_backend_runs_or_says_why(shards, tmp_path):
    try:
        import transformer_engine.pytorch  # noqa: F401
        has_te = torch.cuda.is_available()
    except (ImportError, OSError):
        has_te = False
    if not has_te:
        from tatitok_fast.training.fp8 import FP8Unavailable

        with pytest.raises(FP8Unavailable, match="Transformer Engine|CUDA"):
            main(argv(shards, "vq", tmp_path / "te", "--training.steps", "1", "--fp8.backend", "te"))
        pytest.skip("Transformer Engine is not installed here (or no GPU): the error path was checked")
    assert main(argv(shards, "vq", tmp_path / "te", "--training.steps", "2", "--fp8.backend", "te",
                     "--training.device", "cuda")) == 0


def test_corrupt_samples_are_skipped_and_counted(shards, tmp_path):
    import tarfile

    bad = tmp_path / "bad.tar"
    with tarfile.open(shards["vq"][0]) as src, tarfile.open(bad, "w") as dst:
        for i, member in enumerate(src.getmembers()):
            data = src.extractfile(member).read()
            if member.name.endswith("tokens.npy") and i % 5 == 0:
                data = data[:20]  # truncated array
            member.size = len(data)
            import io

            dst.addfile(member, io.BytesIO(data))
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar file at all" * 10)
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(argv(shards, "vq", run, "--data.shards", f"{bad},{garbage},{shards['vq'][1]}", "--training.steps",
                       "6", "--checkpoint.enable", "false", "--data.resampled", "false"))
    assert rc == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["data/bad_samples"] >= 1 and last["data/bad_shards"] >= 1


def test_export_loads_and_generates(shards, tmp_path):
    from tatitok_fast.models.generators.maskgen import MaskGen_VQ
    from tatitok_fast.text import CLIPTextEncoder

    run = tmp_path / "run"
    assert main(argv(shards, "vq", run, "--training.steps", "2", "--checkpoint.enable", "false")) == 0
    model = MaskGen_VQ.from_pretrained(run / "export" / "step-2")
    assert model.config["model"]["text_encoder"] == {"name": "tiny", "seed": 0}
    ids = model.generate(["a red thing"], text_encoder=CLIPTextEncoder.from_spec(model.config["model"]["text_encoder"]),
                         num_sample_steps=2)
    assert ids.shape == (1, 16) and int(ids.max()) < 64
