"""ImageNet sampling for gFID (evaluation/imagenet_sampling.py) on a tiny random ImageBert and a
tiny random TiTok: two gloo ranks make the same .npz as one, a run killed mid-way resumes to the
same .npz without rewriting its finished chunks, a work folder of other settings is refused,
and the .npz is what the ADM evaluator reads (arr_0 uint8 N x H x W x 3)."""
from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch

from tatitok_fast import ImageBert, TiTok
from tatitok_fast.evaluation.imagenet_sampling import (Rank, SamplingError, SamplingPlan, chunk_path, run_sampling,
                                                       work_dir_for)
from tatitok_fast.pipeline import ClassToImage

CLASSES, TOKENS, CODES, SIZE = 5, 8, 32, 32
PLAN = dict(num_classes=CLASSES, per_class=3, batch=4, seed=11)  # 15 samples: chunks of 4, 4, 4, 3
SETTINGS = dict(num_sample_steps=3, guidance_scale=2.0, guidance_decay="linear", randomize_temperature=1.5)


def generator_config() -> dict:
    return {"model": {"vq_model": {"codebook_size": CODES, "num_latent_tokens": TOKENS},
                      "generator": {"model_type": "ViT", "hidden_size": 32, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "intermediate_size": 64, "dropout": 0.1,
                                    "attn_drop": 0.1, "image_seq_len": TOKENS, "condition_num_classes": CLASSES}},
            "dataset": {"preprocessing": {"crop_size": SIZE}}}


def tokenizer_config() -> dict:
    """A single-stage VQ TiTok (small ViTs) on SIZE x SIZE images, decoding the generator's ids."""
    return {"model": {"vq_model": {"quantize_mode": "vq", "codebook_size": CODES, "token_size": 8,
                                   "use_l2_norm": False, "commitment_cost": 0.25, "vit_enc_model_size": "small",
                                   "vit_dec_model_size": "small", "vit_enc_patch_size": 16, "vit_dec_patch_size": 16,
                                   "num_latent_tokens": TOKENS, "finetune_decoder": False, "is_legacy": False}},
            "dataset": {"preprocessing": {"crop_size": SIZE}}}


def make_pipe() -> ClassToImage:
    torch.manual_seed(0)
    return ClassToImage(ImageBert(generator_config()).eval(), TiTok(tokenizer_config()).eval())


class KillAt:
    """The pipe, killing its own process (SIGKILL, no clean-up) during its `n`-th call."""

    def __init__(self, pipe, n: int):
        self.pipe, self.n, self.calls = pipe, n, 0

    def __call__(self, labels, **kw):
        self.calls += 1
        out = self.pipe(labels, **kw)
        if self.calls == self.n:
            os.kill(os.getpid(), signal.SIGKILL)
        return out


def _run(output, pipe=None, rank: Rank | None = None, **plan):
    return run_sampling(pipe or make_pipe(), SamplingPlan(**{**PLAN, **plan}), output, manifest={"models": "tiny"},
                        settings=SETTINGS, rank=rank, log=lambda _m: None)


def _rank_main(rank: int, world: int, port: int, output: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _run(output, rank=Rank(rank, world, dist.barrier))
    finally:
        dist.destroy_process_group()


def _killed_main(output: str, n: int) -> None:
    torch.set_num_threads(1)
    _run(output, pipe=KillAt(make_pipe(), n))


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "samples.npz"
    result = _run(out)
    return out, result


def test_npz_is_the_adm_format(one_rank):
    out, result = one_rank
    arrays = _load(out)
    assert sorted(arrays) == ["arr_0", "arr_1"]
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (15, SIZE, SIZE, 3)
    assert result["shape"] == (15, SIZE, SIZE, 3)
    np.testing.assert_array_equal(arrays["arr_1"], np.arange(15) % CLASSES)  # the official label order
    assert len(np.unique(arrays["arr_0"].reshape(15, -1), axis=0)) == 15, "every sample differs"


def test_chunk_equals_a_direct_call_after_its_seed(one_rank):
    """Chunk k is generate() of its labels right after torch.manual_seed(chunk_seed(k))."""
    out, _ = one_rank
    plan, pipe = SamplingPlan(**PLAN), make_pipe()
    for k in (0, 3):
        torch.manual_seed(plan.chunk_seed(k))
        images = pipe(torch.from_numpy(plan.chunk_labels(k)), **SETTINGS)
        want = (images.clamp(0, 1) * 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
        start, stop = plan.chunk_range(k)
        np.testing.assert_array_equal(_load(out)["arr_0"][start:stop], want)
    assert len({plan.chunk_seed(k) for k in range(plan.num_chunks)}) == plan.num_chunks


def test_two_ranks_give_the_same_images_as_one(one_rank, tmp_path):
    from tests.training.dist_worker import free_port

    out = tmp_path / "two.npz"
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    one, two = _load(one_rank[0]), _load(out)
    np.testing.assert_array_equal(two["arr_0"], one["arr_0"])
    np.testing.assert_array_equal(two["arr_1"], one["arr_1"])


def test_killed_run_resumes_to_the_same_npz(one_rank, tmp_path):
    out = tmp_path / "killed.npz"
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_killed_main, args=(str(out), 3))  # killed while making chunk 2
    p.start()
    p.join(300)
    assert p.exitcode == -signal.SIGKILL
    work = work_dir_for(out)
    assert work == tmp_path / "killed.parts"
    done = sorted(f.name for f in work.glob("chunk_*.npy"))
    assert done == ["chunk_000000.npy", "chunk_000001.npy"] and not out.exists()
    before = {k: (chunk_path(work, k).stat().st_mtime_ns, chunk_path(work, k).stat().st_ino) for k in (0, 1)}
    result = _run(out)
    assert result["skipped"] == [0, 1] and result["made"] == [2, 3]
    after = {k: (chunk_path(work, k).stat().st_mtime_ns, chunk_path(work, k).stat().st_ino) for k in (0, 1)}
    assert after == before, "finished chunks are never rewritten"
    one, resumed = _load(one_rank[0]), _load(out)
    assert resumed["arr_0"].tobytes() == one["arr_0"].tobytes()
    np.testing.assert_array_equal(resumed["arr_1"], one["arr_1"])


def test_other_settings_in_the_work_folder_are_refused(tmp_path):
    out = tmp_path / "s.npz"
    _run(out, per_class=1)  # 5 samples, two chunks
    out.unlink()
    with pytest.raises(SamplingError, match=r"another run .*seed.*11.*12"):
        _run(out, seed=12, per_class=1)
    assert not out.exists()


def test_plan_checks_its_numbers():
    with pytest.raises(ValueError, match="per_class: expected an int >= 1"):
        SamplingPlan(per_class=0)
    with pytest.raises(ValueError, match="seed"):
        SamplingPlan(seed=-1)
    plan = SamplingPlan(num_classes=1000, per_class=50, batch=125)
    assert plan.num_samples == 50000 and plan.num_chunks == 400 and plan.chunk_range(399) == (49875, 50000)
    np.testing.assert_array_equal(plan.chunk_labels(8)[:3], [0, 1, 2])  # 1000 = 8 chunks of 125
