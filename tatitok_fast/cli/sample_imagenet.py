"""`tatitok-fast sample-imagenet --generator G [--tokenizer T] -o FILE.npz`: ImageNet samples
for gFID (the official sample_imagenet_titok.py, made robust), in the ADM evaluator's format
(`arr_0` uint8 N x 256 x 256 x 3, `arr_1` labels).

  --per-class 50 --num-classes 1000   labels i % num_classes, as the official script
  --batch 125 --seed 42               chunk k = samples [k*batch, (k+1)*batch), one generate()
                                      after torch.manual_seed(SeedSequence(seed, k)): the images do
                                      not depend on the number of ranks (they do on --batch)
  torchrun --nproc-per-node 8 -m tatitok_fast.cli sample-imagenet ...   (NCCL on GPU, gloo on CPU)

Resumable: chunks go to FILE.parts/ (beside FILE.npz) atomically; a rerun with the same settings
makes only the missing chunks and never rewrites a finished one. Sampling defaults: the
generator config's (TITOK.md 10: L32 9.5/8/4.5/linear, B64 11.0/8/3.0/linear, S128
2.8/64/6.9/power-cosine; softmax temperature annealing on).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tatitok_fast.cli.class_models import (add_class_sampling_arguments, check_class_sampling, class_pipeline,
                                           class_sampling_overrides, default_tokenizer)
from tatitok_fast.cli.common import DTYPES, CommandError, runtime


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sample-imagenet", help="class-to-image samples of every ImageNet class as an ADM .npz "
                              "(for gFID)", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", required=True, help="TiTok generator preset (titok_l32, titok_b64, titok_s128), "
                   "Hub repo id or checkpoint directory")
    p.add_argument("--tokenizer", default=None, help="TiTok preset, Hub repo id or checkpoint directory (default: the "
                   "generator preset's tokenizer)")
    p.add_argument("-o", "--output", required=True, help="the .npz to write (work folder: FILE.parts beside it)")
    p.add_argument("--per-class", type=int, default=50, help="samples per class (default 50)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes 0..N-1 (default 1000)")
    p.add_argument("--batch", type=int, default=125, help="images per generate() call and per chunk (default 125, "
                   "the official per-GPU batch); part of the seeding")
    p.add_argument("--seed", type=int, default=42, help="base seed (default 42)")
    p.add_argument("--remove-chunks", action="store_true", help="delete the work folder once FILE.npz is written")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available; under torchrun "
                   "cuda:LOCAL_RANK)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="model precision (default: bf16 on CUDA, "
                   "fp32 on CPU)")
    p.add_argument("--eager", action="store_true", help="no CUDA graph")
    p.add_argument("--cache-dir", default=None, help="Hugging Face cache directory")
    p.add_argument("--local-files-only", action="store_true", help="never touch the network")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_class_sampling_arguments(p)
    p.set_defaults(func=sample_imagenet)


def _check_args(args) -> Path:
    for flag, value in (("--per-class", args.per_class), ("--num-classes", args.num_classes), ("--batch", args.batch)):
        if value < 1:
            raise CommandError(f"{flag}: expected >= 1, got {value}")
    if args.num_classes > 1000:
        raise CommandError(f"--num-classes: expected 1..1000 (ImageNet classes), got {args.num_classes}")
    if args.seed < 0:
        raise CommandError(f"--seed: expected >= 0, got {args.seed}")
    check_class_sampling(args)
    out = Path(args.output)
    if out.suffix != ".npz":
        raise CommandError(f"-o {out}: expected a file name ending in .npz")
    if out.is_dir():
        raise CommandError(f"-o {out}: is a folder; expected the .npz file to write")
    if out.exists():
        raise CommandError(f"-o {out}: exists; delete it (or choose another name) to sample again")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"-o {out}: cannot create its folder ({exc})") from None
    return out


def _jsonable(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def sample_imagenet(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from tatitok_fast.evaluation.imagenet_sampling import Rank, SamplingError, SamplingPlan, run_sampling

    out = _check_args(args)
    tokenizer_name = default_tokenizer(args.generator, args.tokenizer)
    args.batch_size = args.batch
    device, dtype = runtime(args)
    rank = Rank()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from tatitok_fast.training.parallel import init_distributed

        world = init_distributed("cuda" if device.type == "cuda" else "cpu")
        device, rank = world.device, Rank(world.rank, world.world_size, dist.barrier)
    try:
        pipe = class_pipeline(args, tokenizer_name, device, dtype)
        if args.num_classes > pipe.num_classes:
            raise CommandError(f"--num-classes {args.num_classes}: the generator knows {pipe.num_classes} classes")
        try:
            settings = pipe.settings(**class_sampling_overrides(args))
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        plan = SamplingPlan(num_classes=args.num_classes, per_class=args.per_class, batch=args.batch, seed=args.seed)
        manifest = _jsonable({
            "generator": args.generator, "tokenizer": tokenizer_name, "settings": settings, "noise": args.noise,
            "generator_config": pipe.generator.config, "tokenizer_config": pipe.tokenizer.config,
            "device": device.type, "dtype": str(dtype).replace("torch.", ""),
            "image_size": getattr(pipe.tokenizer, "image_size", None)})
        call = {**settings, "noise": args.noise, "use_cuda_graph": False if args.eager else None}
        try:
            run_sampling(pipe, plan, out, manifest=manifest, settings=call, device=device, rank=rank,
                         progress=args.progress, remove_chunks=args.remove_chunks,
                         log=print if rank.rank == 0 else (lambda _msg: None))
        except SamplingError as exc:
            raise CommandError(str(exc)) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
