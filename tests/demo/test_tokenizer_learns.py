"""The demo's tokenizer recipe leaves the mean image within a few dozen steps.

Guards against the stall of issue 23: a tiny TA-TiTok trained from scratch on the demo's shapes
sat at the training set's mean image (13.6 dB) for thousands of steps, with the same output for
every input (its tokens carried nothing). A short run of training/recipes/demo_tokenizer.toml,
through the same engine the demo uses, must give reconstructions that differ across images and
beat the mean image by a clear margin (1 dB) on fresh renders.
"""
import numpy as np
import torch

from tatitok_fast import TATiTok
from tatitok_fast.demo import report, run, shapes
from tatitok_fast.images import load_images
from tatitok_fast.text import CLIPTextEncoder

STEPS = 100


def _renders(num: int, seed: int, pairs=shapes.TRAIN_PAIRS) -> tuple[torch.Tensor, list[str]]:
    samples = list(shapes.iter_samples(num, seed, pairs=pairs))
    return load_images([im for im, _ in samples], 64), [t["caption"] for _, t in samples]


@torch.no_grad()
def _reconstruct(tokenizer, text_encoder, x, captions) -> torch.Tensor:
    return tokenizer.detokenize(tokenizer.tokenize(x), captions, text_encoder=text_encoder)


def test_demo_tokenizer_recipe_moves_off_the_mean_image(tmp_path):
    plan = run.Plan(train_images=512, eval_images=32, samples_per_prompt=1, tokenizer_steps=STEPS, generator_steps=1,
                    tokenizer_batch=32, shard_size=256)
    shards = shapes.write_shards(tmp_path / "data", plan.train_images, seed=0, shard_size=plan.shard_size)
    export = run._train_tokenizer(plan, shards, tmp_path / "run", seed=0, progress=False)
    trained = TATiTok.from_pretrained(export).eval()
    untrained = TATiTok(trained.config).eval()  # the recipe's model at step 0
    text_encoder = CLIPTextEncoder.from_spec(run.TEXT_ENCODER)

    x, captions = _renders(32, seed=7, pairs=shapes.ALL_PAIRS)  # fresh renders, held-out pairs included
    train_x, _ = _renders(plan.train_images, seed=0)
    mean_image = train_x.mean(0, keepdim=True).expand_as(x)
    spread = {name: _reconstruct(tok, text_encoder, x, captions).std(0).mean().item()
              for name, tok in (("trained", trained), ("untrained", untrained))}
    psnr = report.psnr(x, _reconstruct(trained, text_encoder, x, captions))
    mean_psnr = report.psnr(x, mean_image)

    # the stall gave a spread of 0.001 and PSNR within 0.3 dB of the mean image
    assert spread["trained"] > 0.03 and spread["trained"] > 10 * spread["untrained"], spread
    assert psnr > mean_psnr + 1.0, (psnr, mean_psnr)
    assert np.isfinite(psnr)
