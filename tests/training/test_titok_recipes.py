"""The TiTok recipes end to end through `tatitok-fast train` on procedural 64x64 images:
stage 1 (targets = the frozen MaskGIT-VQGAN's codes, here a random stand-in) learns the codes,
stage 2 from its export reconstructs better than where it started (stage 1's weights + the
pixel decoder), single-stage VQ trains; exports load with our class and the official one;
resume is exact; the stage-1 targets equal the official PretrainedTokenizer's codes; bad
starts fail with one clear error before any step."""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import pytest
import torch

from tatitok_fast.training.train import main
from tests.training.test_engine import final_params, losses

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
QUIET = ["--metrics.progress", "false", "--metrics.enable_tensorboard", "false", "--data.num_workers", "0"]


def decreased(values: list[float]) -> bool:
    k = max(1, len(values) // 4)
    return sum(values[-k:]) / k < 0.8 * sum(values[:k]) / k


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tatitok_fast.demo.shapes import write_shards

    return [str(p) for p in write_shards(tmp_path_factory.mktemp("images"), 64, seed=0, shard_size=32)]


def train(recipe: str, images, run: Path, steps: int, batch: int, *extra: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["--config", str(RECIPES / f"{recipe}.toml"), "--data.shards", ",".join(images),
                     "--job.dump_folder", str(run), "--training.steps", str(steps),
                     "--training.local_batch_size", str(batch), "--metrics.log_freq", "1",
                     "--checkpoint.interval", str(steps), "--samples.interval", str(steps), *QUIET, *extra])


def logged(run: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def batch_of(images, n=8) -> torch.Tensor:
    from tatitok_fast.evaluation.data import image_batches

    return next(image_batches(images, 64, n, max_images=n)).images


S1_STEPS = 24


@pytest.fixture(scope="module")
def stage1(images, tmp_path_factory):
    run = tmp_path_factory.mktemp("titok_stage1")
    assert train("titok_tiny_stage1", images, run, S1_STEPS, 8, "--lr_scheduler.warmup_steps", "3") == 0
    return run


def test_stage1_learns_the_vqgan_codes(stage1):
    from tatitok_fast import TiTok

    loss, acc = logged(stage1, "loss"), logged(stage1, "code_accuracy")
    assert decreased(loss), loss
    assert sum(acc[-4:]) / 4 > sum(acc[:4]) / 4 + 0.05, acc
    model = TiTok.from_pretrained(stage1 / "export" / f"step-{S1_STEPS}")
    assert not model.finetune_decoder and model.decoder.is_legacy
    assert model(torch.rand(2, 3, 64, 64))[0].shape == (2, 1024, 4, 4)
    assert (stage1 / "samples" / f"reconstructions-step-{S1_STEPS}.png").is_file()


S2_STEPS = 6


@pytest.fixture(scope="module")
def stage2(stage1, images, tmp_path_factory):
    run = tmp_path_factory.mktemp("titok_stage2")
    export = stage1 / "export" / f"step-{S1_STEPS}"
    assert train("titok_tiny_stage2", images, run, S2_STEPS, 2, "--model.init_from", str(export),
                 "--lr_scheduler.warmup_steps", "1", "--loss.discriminator_start", "3") == 0
    return run


@pytest.mark.slow  # 32 s with its stage-2 run; stage 2's start runs in CI
def test_stage2_reconstructs_better_than_stage1(stage1, stage2, images):
    """Stage 2 starts from stage 1's export (the same encoder and tokens) plus the pixel decoder;
    after a few steps its reconstructions are closer to the images, the frozen parts unchanged."""
    from tatitok_fast import TiTok
    from tatitok_fast.training.config import load_config
    from tatitok_fast.training.recipes.titok import TiTokRecipe

    s1 = stage1 / "export" / f"step-{S1_STEPS}"
    cfg = load_config(RECIPES / "titok_tiny_stage2.toml", ["--model.init_from", str(s1), "--data.shards", images[0]])
    start = TiTokRecipe(cfg, torch.device("cpu")).build_model().eval()
    trained = TiTok.from_pretrained(stage2 / "export" / f"step-{S2_STEPS}").eval()
    stage1_model = TiTok.from_pretrained(s1)
    for name, p in stage1_model.state_dict().items():
        if name.startswith(("encoder.", "quantize.", "latent_tokens")):
            assert torch.equal(trained.state_dict()[name], p), name  # frozen in stage 2
            assert torch.equal(start.state_dict()[name], p), name
    x = batch_of(images)
    with torch.no_grad():
        assert torch.equal(start.encode(x)[1]["min_encoding_indices"], trained.encode(x)[1]["min_encoding_indices"])
        mse = {k: torch.mean((m(x)[0].clamp(0, 1) - x) ** 2).item() for k, m in (("start", start), ("trained", trained))}
    assert mse["trained"] < 0.5 * mse["start"], mse
    assert decreased(logged(stage2, "loss")), logged(stage2, "loss")
    assert logged(stage2, "disc/discriminator_loss"), "the discriminator trained from step 3"
    assert (stage2 / "samples" / f"reconstructions-step-{S2_STEPS}.png").is_file()


def test_single_stage_vq_trains(images, tmp_path):
    from tatitok_fast import TiTok

    run = tmp_path / "vq"
    assert train("titok_vq_tiny", images, run, 20, 8, "--lr_scheduler.warmup_steps", "3") == 0
    assert decreased(logged(run, "loss")), logged(run, "loss")
    trained = TiTok.from_pretrained(run / "export" / "step-20").eval()
    untrained = TiTok(trained.config).eval()
    x = batch_of(images)
    with torch.no_grad():
        err = {k: torch.mean((m(x)[0].clamp(0, 1) - x) ** 2).item() for k, m in (("t", trained), ("u", untrained))}
    assert err["t"] < 0.5 * err["u"], err


@pytest.mark.parametrize("recipe", ["titok_tiny_stage1", pytest.param("titok_vq_tiny", marks=pytest.mark.slow)])
def test_export_loads_in_the_official_class(recipe, images, tmp_path):
    """The official TiTok has no 'tiny' ViT: the same recipes with small (official) ViTs, 1 step."""
    from safetensors.torch import load_file

    from tatitok_fast import TiTok
    from tests.models.official_losses import import_official

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        official = import_official("modeling.titok", deps=("omegaconf", "einops", "huggingface_hub"))
    run = tmp_path / "run"
    small = json.dumps({"model.vq_model.vit_enc_model_size": "small", "model.vq_model.vit_dec_model_size": "small"})
    assert train(recipe, images, run, 1, 2, "--model.overrides", small) == 0
    export = run / "export" / "step-1"
    ours = TiTok.from_pretrained(export).eval()
    ref = official.TiTok(json.loads((export / "config.json").read_text())).eval()
    ref.load_state_dict(load_file(str(export / "model.safetensors")), strict=True)
    x = batch_of(images, 2)
    with torch.no_grad():
        a, b = ours(x)[0], ref(x)[0]
    assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_stage1_resume_is_exact(images, tmp_path):
    """2 steps, stop, 2 more == 4 uninterrupted (bitwise, fp32 CPU), EMA and targets included."""
    full, split = tmp_path / "full", tmp_path / "split"
    common = ["--checkpoint.interval", "2", "--data.shuffle_buffer", "16", "--data.shuffle_initial", "8",
              "--lr_scheduler.warmup_steps", "1"]
    assert train("titok_tiny_stage1", images, full, 4, 4, *common) == 0
    assert train("titok_tiny_stage1", images, split, 4, 4, *common, "--training.stop_after", "2") == 0
    assert train("titok_tiny_stage1", images, split, 4, 4, *common) == 0
    assert losses(split) == losses(full)
    a, b = final_params(full, "vq"), final_params(split, "vq")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stage1_targets_are_the_official_vqgan_codes(images, tmp_path):
    """Same random full-size weights in both: the recipe's targets == PretrainedTokenizer.encode."""
    from tatitok_fast import MaskGITVQGAN
    from tatitok_fast.training.config import load_config
    from tatitok_fast.training.recipes.titok import TiTokRecipe
    from tests.models.official_losses import import_official

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        official = import_official("modeling.titok", deps=("omegaconf", "einops", "huggingface_hub"))
    torch.manual_seed(0)
    sd = MaskGITVQGAN().state_dict()
    g = torch.Generator().manual_seed(1)
    for v in sd.values():
        v.add_(0.05 * torch.randn(v.shape, generator=g))
    sd["quantize.embedding.weight"].normal_(generator=g)
    weights = tmp_path / "maskgit-vqgan-imagenet-f16-256.bin"
    torch.save(sd, weights)
    cfg = load_config(RECIPES / "titok_tiny_stage1.toml", ["--data.shards", images[0], "--loss.vqgan_weights",
                                                           str(weights)])
    recipe = TiTokRecipe(cfg, torch.device("cpu"))
    recipe.build_model()
    recipe.build_frozen()
    x = batch_of(images, 4)
    codes = recipe.batch_transform({"image": x.clone()})["codes"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = official.PretrainedTokenizer(str(weights)).encode(x)
    assert codes.shape == (4, 16) and torch.equal(codes, ref.reshape(4, -1))
    assert codes.unique().numel() > 4


# ---------------------------------------------------------------------------------------
# Bad starts: one `error: ...` line, exit 2, before any step

def cli_train(capsys, recipe, images, run, *extra) -> str:
    from tatitok_fast.cli import main as cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli(["train", "--config", str(RECIPES / f"{recipe}.toml"), "--data.shards", ",".join(images),
                  "--job.dump_folder", str(run), *QUIET, *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and not (run / "metrics.jsonl").exists()
    return err


def test_stage2_without_stage1_checkpoint(capsys, images, tmp_path):
    err = cli_train(capsys, "titok_tiny_stage2", images, tmp_path / "run")
    assert "error: model.init_from: stage 2" in err and "stage-1" in err


def test_stage2_from_a_checkpoint_of_another_config(capsys, images, tmp_path):
    from tatitok_fast import TiTok
    from tatitok_fast.training.recipes.titok import TINY

    config = TINY["tiny_titok_stage1"]()
    config["model"]["vq_model"]["num_latent_tokens"] = 8
    TiTok(config).save_pretrained(tmp_path / "other")
    err = cli_train(capsys, "titok_tiny_stage2", images, tmp_path / "run", "--model.init_from",
                    str(tmp_path / "other"))
    assert "another TiTok config" in err and "num_latent_tokens = 8 there, 16 here" in err


def test_missing_vqgan_weights_offline(capsys, images, tmp_path, monkeypatch):
    for var in ("TATITOK_MASKGIT_VQGAN",):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    err = cli_train(capsys, "titok_tiny_stage1", images, tmp_path / "run", "--loss.vqgan_weights", "pretrained")
    assert "maskgit-vqgan-imagenet-f16-256.bin" in err and "fun-research/TiTok" in err


def test_stage2_starting_weights(images, tmp_path):
    """From a stage-1 export + a VQGAN file: stage-1 weights and the VQGAN's decoder / codebook
    as pixel_*; from a complete two-stage TiTok (an official checkpoint's layout, or our stage-2
    export): every weight, strictly (fine-tuning)."""
    from tatitok_fast import MaskGITVQGAN, TiTok
    from tatitok_fast.training.config import load_config
    from tatitok_fast.training.recipes.titok import TINY, TiTokRecipe

    def start(init_from, *extra):
        cfg = load_config(RECIPES / "titok_tiny_stage2.toml", ["--model.init_from", str(init_from),
                                                               "--data.shards", images[0], *extra])
        return TiTokRecipe(cfg, torch.device("cpu")).build_model().state_dict()

    torch.manual_seed(3)
    stage1 = TiTok(TINY["tiny_titok_stage1"]())
    stage1.save_pretrained(tmp_path / "stage1")
    vqgan = MaskGITVQGAN().state_dict()
    torch.save(vqgan, tmp_path / "maskgit-vqgan-imagenet-f16-256.bin")
    got = start(tmp_path / "stage1", "--loss.vqgan_weights", str(tmp_path))
    for k, v in stage1.state_dict().items():
        assert torch.equal(got[k], v), k
    for k, v in vqgan.items():
        if k.startswith(("decoder.", "quantize.")):
            assert torch.equal(got["pixel_" + k], v), k

    two_stage = TiTok(TINY["tiny_titok_stage2"]())
    two_stage.save_pretrained(tmp_path / "two_stage")
    got = start(tmp_path / "two_stage")
    for k, v in two_stage.state_dict().items():
        assert torch.equal(got[k], v), k
