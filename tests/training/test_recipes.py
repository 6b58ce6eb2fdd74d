"""The recipes end to end on a small procedural image set, through the same commands users
run: train a tiny TA-TiTok (VQ, KL), `tatitok-fast tokenize` with its export, train a tiny
MaskGen on those token shards; losses go down, exports load with from_pretrained, the trained
tokenizer reconstructs better than the untrained one, the generator generates."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from tatitok_fast.training.train import main

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
STEPS = 40
TOKENIZER_SHAPE = {  # the tiny recipes' tokenizer, for the matching generator config
    "vq": {"model.vq_model.codebook_size": 256, "model.vq_model.token_size": 16},
    "vae": {"model.vq_model.token_size": 8},
}


def logged(run: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines() if key in line]


def decreased(values: list[float]) -> bool:
    k = max(1, len(values) // 4)
    return sum(values[-k:]) / k < 0.8 * sum(values[:k]) / k


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tatitok_fast.demo.shapes import write_shards

    root = tmp_path_factory.mktemp("images")
    return [str(p) for p in write_shards(root, 96, seed=0, shard_size=48)]


@pytest.fixture(scope="module", params=["vq", pytest.param("vae", marks=pytest.mark.slow)])  # vae: 13 s more
def tokenizer_run(request, images, tmp_path_factory):
    mode = request.param
    run = tmp_path_factory.mktemp(f"tatitok_{mode}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["--config", str(RECIPES / f"tatitok_{mode}_tiny.toml"), "--data.shards", ",".join(images),
                   "--job.dump_folder", str(run), "--training.steps", str(STEPS), "--training.local_batch_size", "8",
                   "--lr_scheduler.warmup_steps", "5", "--metrics.log_freq", "2", "--metrics.progress", "false",
                   "--data.num_workers", "0", "--checkpoint.interval", str(STEPS), "--samples.interval", str(STEPS),
                   "--loss.discriminator_start", "1000"])
    assert rc == 0
    return mode, run


def test_tokenizer_trains_and_reconstructs_better(tokenizer_run, images):
    from tatitok_fast import TATiTok
    from tatitok_fast.evaluation.data import image_batches
    from tatitok_fast.evaluation.reconstruction import evaluate_reconstruction
    from tatitok_fast.text import CLIPTextEncoder

    mode, run = tokenizer_run
    assert decreased(logged(run)), logged(run)
    trained = TATiTok.from_pretrained(run / "export" / f"step-{STEPS}")
    untrained = TATiTok(trained.config)
    text = CLIPTextEncoder.from_spec(trained.config["model"]["text_encoder"])
    psnr = {name: evaluate_reconstruction(m, image_batches(images, 64, 16, max_images=32), text,
                                          all_reduce=False)["psnr"] for name, m in (("trained", trained),
                                                                                   ("untrained", untrained))}
    assert psnr["trained"] > psnr["untrained"] + 3.0, psnr
    assert (run / "samples" / f"reconstructions-step-{STEPS}.png").is_file()
    assert any((run / "tb").iterdir())


def test_generator_trains_on_tokenized_shards(tokenizer_run, images, tmp_path):
    from tatitok_fast.cli import main as cli
    from tatitok_fast.models.generators.maskgen import load_generator

    mode, run = tokenizer_run
    tokenizer = run / "export" / f"step-{STEPS}"
    shards = tmp_path / "tokens"
    assert cli(["tokenize", *images, "--tokenizer", str(tokenizer), "-o", str(shards), "--no-progress",
                "--batch-size", "32"]) == 0
    gen_run = tmp_path / "gen"
    overrides = {"model.vq_model.num_latent_tokens": 16, **TOKENIZER_SHAPE[mode]}
    recipe = "maskgen_vq_tiny" if mode == "vq" else "maskgen_kl_tiny"
    assert main(["--config", str(RECIPES / f"{recipe}.toml"), "--data.shards", str(shards / "tokens-{000000..000000}.tar"),
                 "--job.dump_folder", str(gen_run), "--training.steps", str(STEPS), "--training.local_batch_size", "16",
                 "--lr_scheduler.warmup_steps", "5", "--metrics.log_freq", "2", "--metrics.progress", "false",
                 "--data.num_workers", "0", "--checkpoint.interval", str(STEPS), "--model.overrides",
                 json.dumps(overrides), "--model.tokenizer", str(tokenizer), "--samples.interval", str(STEPS),
                 "--samples.prompts", "a red circle,a blue square", "--samples.steps", "4"]) == 0
    assert decreased(logged(gen_run)), logged(gen_run)
    assert (gen_run / "samples" / f"generated-step-{STEPS}.png").is_file()
    out = tmp_path / "images"
    assert cli(["generate", "a green triangle", "--generator", str(gen_run / "export" / f"step-{STEPS}"),
                "--tokenizer", str(tokenizer), "-o", str(out), "--steps", "4", "--no-progress"]) == 0
    assert (out / "grid.png").is_file()
    assert type(load_generator(gen_run / "export" / f"step-{STEPS}")).__name__ == ("MaskGen_VQ" if mode == "vq"
                                                                                    else "MaskGen_KL")
