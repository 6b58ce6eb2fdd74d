"""Each configurable effect of the training engine happens, asserted on the effect itself
(not on a finished run): the export holds the EMA (one process and DDP), the clustering-VQ
codebook refresh reaches the FSDP2 shards, the discriminator steps from discriminator_start on
and LeCAM's buffers follow it, activation checkpointing recomputes every block, per-block
compile runs the blocks as compiled frames. FP8 (layers converted, numbers changed):
tests/training/test_fp8.py::test_torchao_converts_the_expected_layers_and_changes_the_numbers."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from tatitok_fast.training.config import load_config
from tatitok_fast.training.train import Trainer, main
from tests.training.dist_worker import launch
from tests.training.shards import write_token_shards
from tests.training.test_engine import argv, final_params

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
QUIET = ["--metrics.log_freq", "1", "--metrics.progress", "false", "--metrics.enable_tensorboard", "false",
         "--data.num_workers", "0", "--samples.interval", "0"]
# the tiny TA-TiTok recipe at 32 x 32 (4 patches): a CPU step in about a second
TATITOK_32 = {"dataset.preprocessing.crop_size": 32, "model.vq_model.vit_enc_model_size": "tiny",
              "model.vq_model.vit_dec_model_size": "tiny", "model.vq_model.token_size": 16}


def config_of(args: list[str]):
    """The JobConfig an argv (--config first) describes."""
    return load_config(args[1], args[2:])


def tatitok_argv(mode: str, images: list[str], run: Path, *extra: str) -> list[str]:
    overrides = dict(TATITOK_32, **({"model.vq_model.codebook_size": 256, "model.vq_model.clustering_vq": True}
                                    if mode == "vq" else {"model.vq_model.token_size": 8}))
    return ["--config", str(RECIPES / f"tatitok_{mode}_tiny.toml"), "--data.shards", ",".join(images),
            "--job.dump_folder", str(run), "--model.overrides", json.dumps(overrides), "--data.split", "sample",
            "--data.shuffle_buffer", "0", "--loss.discriminator_start", "1000", *QUIET, *extra]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    return {"vq": write_token_shards(root / "vq", "vq"), "vae": write_token_shards(root / "vae", "vae")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tatitok_fast.demo.shapes import write_shards

    return [str(p) for p in write_shards(tmp_path_factory.mktemp("images"), 32, seed=0, shard_size=16)]


def exported(run: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "export" / f"step-{step}" / "model.safetensors")


# ---- EMA: the export holds the averaged weights ----

@pytest.mark.parametrize("world", [1, 2])
def test_export_holds_the_ema_weights(shards, tmp_path, world):
    """3 steps at a large lr (the EMA, 2/11 of the way after its first copy, is far from the
    live weights): every exported parameter is its EMA shadow, and not the live weight."""
    run = tmp_path / "run"
    args = argv(shards, "vq", run, "--training.steps", "3", "--optimizer.lr", "3e-3", "--lr_scheduler.warmup_steps",
                "0", "--data.split", "sample", "--training.local_batch_size", str(8 // world))
    if world == 1:
        assert main(args) == 0
    else:
        launch(2, args + ["--parallelism.mode", "ddp"])
    state, export = final_params(run, "vq"), exported(run, 3)
    names = [k[len("ema."):] for k in state if k.startswith("ema.")]
    assert names and all(n in export for n in names)
    to_ema = max((export[n] - state[f"ema.{n}"]).abs().max().item() for n in names)
    to_live = max((export[n] - state[n]).abs().max().item() for n in names)
    assert to_ema == 0.0, (to_ema, to_live)
    assert to_live > 1e-4, (to_ema, to_live)


# ---- clustering VQ under FSDP2 ----

def test_fsdp_clustering_refresh_reaches_the_shards(images, tmp_path):
    """One step at lr 1e-12 (the codebook moves by the refresh only): the codebook 2 FSDP2
    ranks x 4 images export equals the one of 1 process x the same 8 images, and it moved."""
    from tatitok_fast.training.recipes.tatitok import TATiTokRecipe

    common = ["--training.steps", "1", "--optimizer.lr", "1e-12", "--lr_scheduler.warmup_steps", "0",
              "--checkpoint.enable", "false"]
    one, two = tmp_path / "one", tmp_path / "two"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(tatitok_argv("vq", images, one, *common, "--training.local_batch_size", "8")) == 0
    launch(2, tatitok_argv("vq", images, two, *common, "--training.local_batch_size", "4",
                           "--parallelism.mode", "fsdp"))
    key = "quantize.embedding.weight"
    cfg = config_of(tatitok_argv("vq", images, tmp_path / "init"))
    init = TATiTokRecipe(cfg, torch.device("cpu")).build_model().state_dict()[key]
    a, b = exported(one, 1)[key], exported(two, 1)[key]
    moved = (a - init).abs().max().item()
    assert moved > 0.05, moved  # init: uniform in +-1/256; the refresh pulls unused codes onto features
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# ---- the discriminator and LeCAM ----

def test_discriminator_steps_from_its_start_and_lecam_follows(images, tmp_path):
    cfg = config_of(tatitok_argv("vq", images, tmp_path / "run", "--loss.discriminator_start", "1",
                                 "--training.local_batch_size", "2", "--checkpoint.enable", "false"))
    trainer = Trainer(cfg)
    aux = trainer.aux
    disc = {k: v.detach().clone() for k, v in aux.named_parameters()}
    lecam = {k: v.clone() for k, v in aux.named_buffers() if "logits_mean" in k}
    assert len(lecam) == 2 and all(float(v.abs().max()) == 0 for v in lecam.values())
    it = iter(trainer.loader)

    def step():
        logged = trainer.train_step(it)
        trainer.step += 1
        return logged

    logged = step()  # step 0 < discriminator_start: no discriminator step
    assert "aux_loss" not in logged
    assert all(torch.equal(v, disc[k]) for k, v in aux.named_parameters())
    logged = step()
    assert "aux_loss" in logged and "disc/lecam_loss" in logged
    changed = [k for k, v in aux.named_parameters() if not torch.equal(v, disc[k])]
    assert len(changed) == len(disc), sorted(set(disc) - set(changed))
    d = cfg.loss.lecam_ema_decay  # the buffers: (1 - d) x the batch-mean logits after the first step
    for k, v in aux.named_buffers():
        if k in lecam:
            assert float(v.abs().max()) > 0, k
            assert float(v.abs().max()) < 10 * (1 - d), k
    trainer.close()


# ---- activation checkpointing and per-block compile ----

def _maskgen_trainer(shards, run: Path, *extra: str) -> Trainer:
    return Trainer(config_of(argv(shards, "vq", run, "--checkpoint.enable", "false", "--training.local_batch_size",
                                  "4", *extra)))


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_activation_checkpointing_recomputes_every_block(shards, tmp_path, checkpointing):
    """The blocks' sub-modules run once per step without checkpointing and twice with it
    (the recompute in backward), and the gradients are the same."""
    trainer = _maskgen_trainer(shards, tmp_path / "run", "--parallelism.activation_checkpoint", checkpointing)
    blocks = trainer.recipe.blocks(trainer.inner)
    calls = [0] * len(blocks)
    for i, block in enumerate(blocks):
        first = next(iter(block.children()))
        first.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    trainer.train_step(iter(trainer.loader))
    assert calls == [2 if checkpointing == "full" else 1] * len(blocks), calls
    trainer.close()


@pytest.mark.slow  # a compiled training step: 55 s on 2 cores
def test_compile_runs_every_block_compiled(shards, tmp_path):
    """parallelism.compile: one step runs each block's forward as a compiled frame (dynamo's
    frame counters), the rest of the model eagerly."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trainer = _maskgen_trainer(shards, tmp_path / "run", "--parallelism.compile", "true")
    blocks = trainer.recipe.blocks(trainer.inner)
    trainer.train_step(iter(trainer.loader))
    frames, graphs = counters["frames"]["ok"], counters["stats"]["unique_graphs"]
    assert frames >= 1 and graphs >= 1, dict(counters)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    trainer.close()
    torch._dynamo.reset()
