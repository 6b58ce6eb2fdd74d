"""The demo's tokenizer recipe leaves the mean image within a hundred steps.

Guards against the stall of issue 23: a tiny TA-TiTok trained from scratch on the demo's shapes
sat at the training set's mean image (13.6 dB) for thousands of steps, with the same output for
every input (its tokens carried nothing). A short run of training/recipes/demo_tokenizer.toml,
through the same engine and evaluation the demo uses, must give reconstructions that differ
across images, beat the mean image by a clear margin (1 dB) on fresh renders, and hold objects the
shape detector finds.
"""
import numpy as np

from tatitok_fast import TATiTok
from tatitok_fast.demo import run, shapes
from tatitok_fast.text import CLIPTextEncoder

STEPS = 100


def _evaluate(tokenizer, text_encoder, plan: run.Plan) -> tuple[dict, float]:
    """The demo's tokenizer metrics on its fresh renders, and the reconstructions' spread: the
    mean over pixels of their standard deviation across images."""
    metrics, pairs = run.evaluate_tokenizer(tokenizer, text_encoder, plan, seed=0, num_pairs=plan.eval_images)
    recon = np.stack([np.asarray(r, dtype=np.float64) / 255.0 for _, r in pairs])
    return metrics, float(recon.std(0).mean())


def test_demo_tokenizer_recipe_moves_off_the_mean_image(tmp_path):
    plan = run.Plan(train_images=512, eval_images=32, samples_per_prompt=1, tokenizer_steps=STEPS, generator_steps=1,
                    tokenizer_batch=32, shard_size=256)
    shards = shapes.write_shards(tmp_path / "data", plan.train_images, seed=0, shard_size=plan.shard_size)
    trained = TATiTok.from_pretrained(run._train_tokenizer(plan, shards, tmp_path / "run", seed=0,
                                                           progress=False)).eval()
    untrained = TATiTok(trained.config).eval()  # the recipe's model at step 0
    text_encoder = CLIPTextEncoder.from_spec(run.TEXT_ENCODER)

    # fresh renders of every pair (held-out ones included), as the demo scores them
    metrics, spread_trained = _evaluate(trained, text_encoder, plan)
    metrics0, spread_untrained = _evaluate(untrained, text_encoder, plan)
    spread = {"trained": spread_trained, "untrained": spread_untrained}

    # the stall gave a spread of 0.0006 and a PSNR at or below the mean image's
    assert spread["trained"] > 0.03 and spread["trained"] > 10 * spread["untrained"], spread
    assert metrics["psnr"] > metrics["mean_image_psnr"] + 1.0, metrics
    # the detector finds the renders' objects in the reconstructions (at 100 steps: as many objects
    # as drawn in ~80 % of the images), and nothing in the untrained model's blank canvas
    found = {"trained": metrics["detector_on_reconstructions"]["count_acc"],
             "untrained": metrics0["detector_on_reconstructions"]["count_acc"]}
    assert found["trained"] > 0.5 and found["untrained"] < 0.1, found
