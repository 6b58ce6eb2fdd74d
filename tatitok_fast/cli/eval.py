"""`tatitok-fast eval reconstruct|generate`: measure a tokenizer or a text-to-image pipeline,
write the metrics as JSON and a grid PNG.

  tatitok-fast eval reconstruct IMAGES... --tokenizer NAME_OR_DIR -o OUT.json [--grid grid.png]
      rFID, Inception Score (InceptionV3, pt_inception-2015-12-05 weights), PSNR, SSIM and,
      for VQ tokenizers, codebook usage / entropy over image folders or webdataset shards.
  tatitok-fast eval generate --prompts-file F --generator G --tokenizer T [--reference-images DIR]
      -o OUT.json: FID against reference images (e.g. MJHQ-30K), Inception Score, CLIP score,
      images/s.
  tatitok-fast eval fid --samples X.npz --ref VIRTUAL_imagenet256_labeled.npz [-o OUT.json]
      the ADM evaluator's numbers for a sample batch (sample-imagenet's .npz): FID, sFID,
      Inception Score, precision, recall (evaluation/fid.py says how each is computed).

Offline: --inception-weights PATH (or $TATITOK_FAST_INCEPTION_WEIGHTS, or the file in the
torch hub cache) and --clip-score-pretrained PATH give local weights; 'random' builds
random-weight networks (smoke tests only: the numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

from tatitok_fast.cli.common import (CommandError, add_runtime_arguments, add_sampling_arguments,
                                     add_text_encoder_arguments, load_text_encoder,
                                     load_tokenizer, run_command, runtime)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate reconstruction (rFID, IS, PSNR, SSIM) or generation "
                              "(FID, CLIP score)", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="WHAT")

    r = sub.add_parser("reconstruct", help="tokenizer reconstruction metrics", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("images", nargs="+", help="image folders/files, or webdataset shards ('val-{0000..0009}.tar')")
    r.add_argument("--tokenizer", required=True, help="preset name, Hub repo id or checkpoint directory")
    r.add_argument("--caption", default=None, help="text guidance for every image (default: each image's caption: "
                   "a same-name .txt, or the shard's txt/json; else empty)")
    r.add_argument("--max-images", type=int, default=None, help="evaluate at most N images")
    _add_common(r)
    r.set_defaults(func=run_command(eval_reconstruct))

    g = sub.add_parser("generate", help="text-to-image metrics", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--prompts-file", required=True, help="prompts: a text file (one per line), a JSON list, or "
                   "MJHQ-30K's meta_data.json ({id: {prompt, ...}})")
    g.add_argument("--generator", required=True, help="MaskGen preset, Hub repo id or checkpoint directory")
    g.add_argument("--tokenizer", required=True, help="TA-TiTok preset, Hub repo id or checkpoint directory")
    g.add_argument("--reference-images", nargs="+", default=None,
                   help="FID reference: image folders/shards, or an .npz with mu/sigma (--save-reference-stats)")
    g.add_argument("--save-reference-stats", default=None, help="write the reference statistics to this .npz")
    g.add_argument("--max-prompts", type=int, default=None, help="use the first N prompts")
    g.add_argument("--max-reference-images", type=int, default=None, help="use at most N reference images")
    g.add_argument("--clip-score-model", default="ViT-L-14", help="open_clip model of the CLIP score (default: ViT-L-14)")
    g.add_argument("--clip-score-pretrained", default="openai",
                   help="its pretrained tag, a local weights file, or 'random' (default: openai)")
    g.add_argument("--no-clip-score", action="store_true", help="skip the CLIP score")
    g.add_argument("--images-dir", default=None, help="also save every generated image here")
    add_sampling_arguments(g)
    _add_common(g)
    g.set_defaults(func=run_command(eval_generate))

    f = sub.add_parser("fid", help="FID, sFID, IS, precision/recall of a sample .npz against an ADM reference batch",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--samples", required=True, help="sample batch .npz (arr_0: uint8 N x H x W x 3)")
    f.add_argument("--ref", required=True, help="reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz): arr_0 "
                   "images and/or precomputed mu/sigma[/mu_s/sigma_s]")
    f.add_argument("-o", "--output", default=None, help="also write the metrics as JSON here")
    f.add_argument("--inception-weights", default=None, help="InceptionV3 FID weights file, or 'random' (default: "
                   "$TATITOK_FAST_INCEPTION_WEIGHTS, the torch hub cache, else a download)")
    f.add_argument("--batch-size", type=int, default=64, help="images per Inception forward (default 64)")
    f.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    f.add_argument("--local-files-only", action="store_true", help="never download the Inception weights")
    f.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    f.set_defaults(func=eval_fid, dtype=None)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="metrics JSON file to write")
    p.add_argument("--grid", default=None, help="grid PNG to write (default: OUT.json's name with .png)")
    p.add_argument("--grid-size", type=int, default=16, help="images in the grid (0 = no grid)")
    p.add_argument("--inception-weights", default=None, help="InceptionV3 FID weights file, or 'random' (default: "
                   "$TATITOK_FAST_INCEPTION_WEIGHTS, the torch hub cache, else a download)")
    p.add_argument("--no-inception", action="store_true", help="skip FID / rFID and the Inception Score")
    add_runtime_arguments(p)
    add_text_encoder_arguments(p)


# ---- shared checks -----------------------------------------------------------------------

def _check_output(args) -> tuple[Path, Path | None]:
    out = Path(args.output)
    if out.is_dir():
        raise CommandError(f"-o {out}: is a folder; expected the path of the metrics JSON file")
    if args.grid_size < 0:
        raise CommandError(f"--grid-size: expected >= 0, got {args.grid_size}")
    grid = Path(args.grid) if args.grid else (out.with_suffix(".png") if args.grid_size else None)
    for path, flag in ((out, "-o"), (grid, "--grid")):
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CommandError(f"{flag} {path}: cannot create its folder ({exc})") from None
    return out, grid


def _positive(value, flag: str) -> None:
    if value is not None and value < 1:
        raise CommandError(f"{flag}: expected >= 1, got {value}")


def _features(args, device):
    if args.no_inception:
        return None
    from tatitok_fast.evaluation.inception import InceptionFeatures
    from tatitok_fast.weight_files import WeightsFileError

    try:
        return InceptionFeatures(args.inception_weights, device=device, download=not args.local_files_only)
    except (WeightsFileError, ValueError, ImportError) as exc:
        raise CommandError(f"{exc} (or pass --no-inception to skip FID and IS)") from None


def _write(out: Path, grid: Path | None, metrics: dict, grid_images, ncols: int) -> None:
    from tatitok_fast.images import make_grid, to_pil

    out.write_text(json.dumps(metrics, indent=2) + "\n")
    if grid is not None and grid_images is not None and len(grid_images):
        make_grid(grid_images if isinstance(grid_images, list) else to_pil(grid_images), ncols=ncols).save(grid)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics["metrics"].items() if isinstance(v, float))
    print(f"{summary}\nwrote {out}" + (f" and {grid}" if grid is not None else ""))


def _meta(args, device, dtype, features) -> dict:
    return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
            "python": platform.python_version(),
            "inception_weights": None if features is None else features.weights}


# ---- reconstruct -------------------------------------------------------------------------

def eval_reconstruct(args: argparse.Namespace) -> int:
    from tatitok_fast.evaluation.data import check_inputs, image_batches
    from tatitok_fast.evaluation.reconstruction import evaluate_reconstruction

    out, grid = _check_output(args)
    _positive(args.max_images, "--max-images")
    device, dtype = runtime(args)
    try:
        check_inputs(args.images, "images")
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    features = _features(args, device)
    tokenizer = load_tokenizer(args, device, dtype)
    from tatitok_fast import TATiTok

    # TiTok and the MaskGIT-VQGAN decode without captions: no text tower to load
    text_encoder = (load_text_encoder(args, device, [("--tokenizer", tokenizer.config)])
                    if isinstance(tokenizer, TATiTok) else None)
    torch.manual_seed(args.seed)

    def batches():
        for b in image_batches(args.images, tokenizer.image_size, args.batch_size, args.max_images):
            yield b.images, [args.caption] * len(b.captions) if args.caption is not None else b.captions

    try:
        result = evaluate_reconstruction(tokenizer, batches(), text_encoder, features=features,
                                         max_images=args.max_images, keep_images=args.grid_size, all_reduce=False)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise CommandError(str(exc)) from None
    samples = result.pop("samples", None)
    metrics = {"command": "eval reconstruct", "tokenizer": args.tokenizer, "quantize_mode": tokenizer.quantize_mode,
               "inputs": list(args.images), "metrics": result, **_meta(args, device, dtype, features)}
    cells, ncols = None, 8
    if samples is not None:  # rows of originals, each followed by the row of their reconstructions
        from tatitok_fast.images import interleave_rows, to_pil

        cells, ncols = interleave_rows(to_pil(samples["originals"]), to_pil(samples["reconstructions"]))
    _write(out, grid, metrics, cells, ncols)
    return 0


# ---- generate ----------------------------------------------------------------------------

def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per line), a JSON list of strings, or a JSON object of
    records with a "prompt" (MJHQ-30K meta_data.json)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"--prompts-file: {exc}") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CommandError(f"--prompts-file {path}: not valid JSON ({exc})") from None
        records = data.values() if isinstance(data, dict) else data if isinstance(data, list) else None
        prompts = [] if records is None else [r.get("prompt") if isinstance(r, dict) else r for r in records]
        if records is None or not all(isinstance(p, str) for p in prompts):
            raise CommandError(f"--prompts-file {path}: expected a JSON list of strings or an object of records "
                               "with a 'prompt' string")
    else:
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise CommandError(f"--prompts-file {path}: no prompts")
    return prompts


def _reference(args, features, size):
    from tatitok_fast.evaluation.generation import reference_stats
    from tatitok_fast.evaluation.metrics import load_stats

    refs = args.reference_images
    if len(refs) == 1 and refs[0].endswith(".npz"):
        try:
            return load_stats(refs[0])
        except ValueError as exc:
            raise CommandError(f"--reference-images: {exc}") from None
    try:
        stats = reference_stats(refs, features, size, batch_size=args.batch_size,
                                max_images=args.max_reference_images, progress=args.progress)
    except ValueError as exc:
        raise CommandError(f"--reference-images: {exc}") from None
    if args.save_reference_stats:
        stats.save(args.save_reference_stats)
    return stats


def eval_generate(args: argparse.Namespace) -> int:
    from tatitok_fast.cli.generate import _check_ranges, _load_generator, _slug
    from tatitok_fast.evaluation.data import check_inputs
    from tatitok_fast.evaluation.generation import evaluate_generation
    from tatitok_fast.pipeline import TextToImage, check_compatible

    out, grid = _check_output(args)
    _positive(args.max_prompts, "--max-prompts")
    _positive(args.max_reference_images, "--max-reference-images")
    _check_ranges(args)
    prompts = read_prompts(args.prompts_file)[:args.max_prompts]
    if args.reference_images and args.no_inception:
        raise CommandError("--reference-images: FID needs the Inception network; drop --no-inception")
    if args.save_reference_stats and not args.reference_images:
        raise CommandError("--save-reference-stats: needs --reference-images")
    refs = args.reference_images or []
    if refs and not (len(refs) == 1 and refs[0].endswith(".npz")):
        try:
            check_inputs(refs, "--reference-images")
        except ValueError as exc:
            raise CommandError(str(exc)) from None
    device, dtype = runtime(args)
    features = _features(args, device)
    clip_scorer = None
    if not args.no_clip_score:
        from tatitok_fast.evaluation.clip_score import CLIPScorer

        try:
            clip_scorer = CLIPScorer(args.clip_score_model, args.clip_score_pretrained, cache_dir=args.cache_dir,
                                     device=device)
        except (ValueError, RuntimeError) as exc:
            raise CommandError(f"{exc} (or pass --no-clip-score)") from None
    generator = _load_generator(args, device, dtype)
    tokenizer = load_tokenizer(args, device, dtype)
    try:
        check_compatible(generator, tokenizer)
    except ValueError as exc:
        raise CommandError(f"--generator {args.generator} / --tokenizer {args.tokenizer}: {exc}") from None
    reference = _reference(args, features, tokenizer.image_size) if refs else None
    text_encoder = load_text_encoder(args, device, [("--generator", generator.config), ("--tokenizer", tokenizer.config)])
    pipe = TextToImage(generator, tokenizer, text_encoder)
    images_dir = Path(args.images_dir) if args.images_dir else None
    if images_dir is not None:
        images_dir.mkdir(parents=True, exist_ok=True)

    def save(first, batch, images):
        from tatitok_fast.images import to_pil

        for j, (prompt, im) in enumerate(zip(batch, to_pil(images))):
            im.save(images_dir / f"{first + j:05d}_{_slug(prompt)}.png")

    torch.manual_seed(args.seed)
    try:
        result = evaluate_generation(pipe, prompts, batch_size=args.batch_size, features=features, reference=reference,
                                     clip_scorer=clip_scorer, keep_images=args.grid_size,
                                     on_images=save if images_dir is not None else None, progress=args.progress,
                                     steps=args.steps, cfg=args.cfg, aesthetic=args.aesthetic,
                                     temperature=args.temperature, use_cuda_graph=False if args.eager else None)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    samples = result.pop("samples", None)
    metrics = {"command": "eval generate", "generator": args.generator, "tokenizer": args.tokenizer,
               "prompts_file": args.prompts_file, "reference": refs or None,
               "clip_score_model": None if clip_scorer is None else
               f"{args.clip_score_model}/{args.clip_score_pretrained}",
               "settings": {"steps": args.steps, "cfg": args.cfg, "aesthetic": args.aesthetic,
                            "temperature": args.temperature, "seed": args.seed, "batch_size": args.batch_size},
               "metrics": result, **_meta(args, device, dtype, features)}
    _write(out, grid, metrics, samples, min(8, len(samples)) if samples is not None else 8)
    return 0


# ---- fid (ADM sample batches) --------------------------------------------------------------

def _check_npz(path: str, flag: str, need_images: bool) -> None:
    from tatitok_fast.evaluation.npz import NpzArray, npz_keys

    p = Path(path)
    if not p.is_file():
        raise CommandError(f"{flag} {path}: no such file")
    try:
        keys = npz_keys(p)
    except ValueError as exc:
        raise CommandError(f"{flag}: {exc}") from None
    if need_images and "arr_0" not in keys:
        raise CommandError(f"{flag} {path}: expected an 'arr_0' array of images, found {keys}")
    if not need_images and "arr_0" not in keys and "mu" not in keys:
        raise CommandError(f"{flag} {path}: expected 'arr_0' images and/or precomputed 'mu'/'sigma', found {keys}")
    if "arr_0" in keys:
        try:
            with NpzArray(p, "arr_0") as arr:
                shape, dtype = arr.shape, arr.dtype
        except ValueError as exc:
            raise CommandError(f"{flag}: {exc}") from None
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] < 2:
            raise CommandError(f"{flag} {path}: arr_0 must hold >= 2 uint8 N x H x W x 3 images, got {dtype} {shape}")


def eval_fid(args: argparse.Namespace) -> int:
    """User errors raise CommandError (`error: ...`, exit 2), all checked before the network loads."""
    from tatitok_fast.evaluation.fid import evaluate_sample_batch

    _check_npz(args.samples, "--samples", need_images=True)
    _check_npz(args.ref, "--ref", need_images=False)
    _positive(args.batch_size, "--batch-size")
    out = Path(args.output) if args.output else None
    if out is not None and out.is_dir():
        raise CommandError(f"-o {out}: is a folder; expected the path of the metrics JSON file")
    device, _ = runtime(args)
    from tatitok_fast.evaluation.inception import InceptionFeatures
    from tatitok_fast.weight_files import WeightsFileError

    try:
        features = InceptionFeatures(args.inception_weights, device=device, download=not args.local_files_only)
    except (WeightsFileError, ValueError, ImportError) as exc:
        raise CommandError(str(exc)) from None
    try:
        result = evaluate_sample_batch(args.samples, args.ref, features, batch_size=args.batch_size,
                                       progress=args.progress)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    metrics = {"command": "eval fid", "samples": args.samples, "ref": args.ref, "metrics": result,
               **_meta(args, device, torch.float32, features)}
    names = {"fid": "FID", "sfid": "sFID", "inception_score": "Inception Score", "precision": "Precision",
             "recall": "Recall"}
    for key, name in names.items():
        value = result.get(key)
        print(f"{name}: {'n/a' if value is None else f'{value:.4f}'}")
    for note in result["notes"]:
        print(f"note: {note}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {out}")
    return 0
