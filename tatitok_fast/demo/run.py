"""`tatitok-fast demo --out DIR`: the whole product on procedural shapes, offline.

Stages, in order (each printed with its time):

    data                procedural captioned shapes -> DIR/data/shapes-*.tar (webdataset), fresh
                        renders of every pair -> DIR/data/eval-*.tar
    train tokenizer     a micro TA-TiTok VQ, through the training engine -> DIR/runs/tokenizer
                        (its PSNR on the eval renders every tenth of the run in metrics.jsonl),
                        exported to DIR/tokenizer (official layout)
    evaluate tokenizer  reconstruction PSNR and codebook usage on fresh renders
    tokenize            `tatitok-fast tokenize` of the training shards -> DIR/tokens/
    train generator     a tiny MaskGen-VQ on the tokens -> DIR/runs/generator, DIR/generator
    generate + score    seen and held-out prompts through the trained and an untrained
                        generator -> DIR/samples/, detector scores
    report              DIR/report.json, DIR/report.md, DIR/grid.png, DIR/curves.png

Both exported configs name the text encoder (model.text_encoder = TEXT_ENCODER, a tiny
open_clip tower with fixed random weights), so that afterwards
`tatitok-fast generate "a green triangle" --generator DIR/generator --tokenizer DIR/tokenizer -o out/`
works offline with no other flag.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tatitok_fast.demo import curves, detector, report, shapes

__all__ = ["DemoError", "Plan", "PLANS", "TEXT_ENCODER", "run_demo", "prepare_out_dir", "make_data", "test_prompts",
           "evaluate_tokenizer", "tokenize_data", "generate_and_score", "write_outputs"]

TEXT_ENCODER = {"name": "tiny", "seed": 0, "context_length": 16}  # the captions' longest is 15 tokens
# what the demo writes into DIR; with --force exactly these are replaced, nothing else
OUTPUTS = ("data", "runs", "tokenizer", "tokens", "generator", "samples", "grid.png", "curves.png", "report.json",
           "report.md")


class DemoError(ValueError):
    """A bad demo argument or output directory (raised before any work)."""


@dataclass(frozen=True)
class Plan:
    """Sizes of one demo run."""

    train_images: int  # procedural training images (held-out pairs never among them)
    eval_images: int  # fresh renders (all pairs) for reconstruction PSNR and codebook usage
    samples_per_prompt: int  # generated images per test prompt, per generator
    tokenizer_steps: int  # optimizer steps (the training stages read these)
    generator_steps: int
    tokenizer_batch: int = 32
    generator_batch: int = 64
    image_size: int = 64
    shard_size: int = 1000
    detector_check_images: int = 200  # ground-truth renders the detector is checked on
    prompts_per_split: int = 0  # test prompts per split (evenly spaced); 0 = all (28 seen, 8 held-out)


PLANS = {
    "full": Plan(train_images=4000, eval_images=64, samples_per_prompt=8, tokenizer_steps=1000,
                 generator_steps=1300),
    "quick": Plan(train_images=128, eval_images=16, samples_per_prompt=1, tokenizer_steps=10,
                  generator_steps=10, tokenizer_batch=8, generator_batch=16, detector_check_images=50,
                  prompts_per_split=6),
}


# ---------------------------------------------------------------------------------------
# Output directory

def prepare_out_dir(out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Check DIR before any work: a non-empty DIR needs force (then only the demo's own
    outputs in it are removed), DIR must be creatable and writable."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DemoError(f"--out {out}: exists and is not empty; pass --force to replace the demo's outputs in it "
                        f"({', '.join(OUTPUTS)}), or choose another directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".tatitok-fast-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise DemoError(f"--out {out}: cannot write there: {exc.strerror or exc}") from None
    if force:
        for name in OUTPUTS:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    return out


# ---------------------------------------------------------------------------------------
# Stages that need no training engine

def make_data(data_dir: Path, plan: Plan, seed: int, progress: bool = True) -> tuple[list[Path], list[Path], dict]:
    """Training shards (training pairs only), evaluation shards (fresh renders of every pair,
    the same images evaluate_tokenizer scores: the tokenizer's PSNR curve during training) and
    the detector's scores on ground-truth renders."""
    with tqdm(total=plan.train_images, desc="render", unit="img", disable=not progress, leave=False) as bar:
        shards = shapes.write_shards(data_dir, plan.train_images, seed, shard_size=plan.shard_size,
                                     size=plan.image_size, progress=lambda n: bar.update(n - bar.n))
    eval_shards = shapes.write_shards(data_dir, plan.eval_images, seed + 1, shard_size=plan.shard_size, prefix="eval",
                                      pairs=shapes.ALL_PAIRS, size=plan.image_size)
    check = list(shapes.iter_samples(plan.detector_check_images, seed + 2, pairs=shapes.ALL_PAIRS,
                                     size=plan.image_size))
    on_data = detector.score([im for im, _ in check], [t for _, t in check])
    return shards, eval_shards, on_data


@torch.no_grad()
def evaluate_tokenizer(tokenizer, text_encoder, plan: Plan, seed: int, *, device: str = "cpu",
                       num_pairs: int = 8) -> tuple[dict, list]:
    """Reconstruction PSNR, codebook usage and the detector's scores on the reconstructions
    ("detector_on_reconstructions": what a generator reproducing these images' exact tokens
    would score) on `plan.eval_images` fresh renders (all pairs); returns (metrics,
    [(original, reconstruction)] PIL pairs for the grid)."""
    from tatitok_fast.images import load_images, to_pil

    samples = list(shapes.iter_samples(plan.eval_images, seed + 1, pairs=shapes.ALL_PAIRS, size=plan.image_size))
    x = load_images([im for im, _ in samples], tokenizer.image_size).to(device)
    captions = [t["caption"] for _, t in samples]
    ids = tokenizer.tokenize(x)
    recon = tokenizer.detokenize(ids, captions, text_encoder=text_encoder).float().clamp(0, 1)
    # the bar to clear: the training set's mean image (estimated from 512 training renders)
    mean_image = load_images([im for im, _ in shapes.iter_samples(512, seed, size=plan.image_size)],
                             tokenizer.image_size).mean(0, keepdim=True).to(device)
    metrics = {"psnr": report.psnr(x, recon), "mean_image_psnr": report.psnr(x, mean_image.expand_as(x)),
               "num_images": len(samples)}
    if tokenizer.quantize_mode == "vq":
        metrics.update(report.codebook_usage(ids, tokenizer.codebook_size))
    recon_pil = to_pil(recon)
    on_recon = detector.score(recon_pil, [t for _, t in samples])
    metrics["detector_on_reconstructions"] = {k: on_recon[k] for k in ("color_acc", "shape_acc", "count_acc")}
    pairs = list(zip(to_pil(x[:num_pairs]), recon_pil[:num_pairs]))
    return metrics, pairs


def tokenize_data(shards: list[Path], tokenizer_dir: Path, tokens_dir: Path, *, device: str = "cpu",
                  progress: bool = True) -> list[Path]:
    """`tatitok-fast tokenize` of the training shards (the command users run)."""
    from tatitok_fast.cli import main

    argv = ["tokenize", *map(str, shards), "--tokenizer", str(tokenizer_dir), "-o", str(tokens_dir),
            "--device", device, "--batch-size", "64", "--expect-mode", "vq"]
    if main(argv + ([] if progress else ["--no-progress"])) != 0:
        raise RuntimeError(f"tatitok-fast {' '.join(argv)} failed (see the error above)")
    return sorted(tokens_dir.glob("tokens-*.tar"))


def test_prompts(plan: Plan) -> dict:
    """{"seen": [...], "held_out": [...]}: shapes.test_prompts, cut to plan.prompts_per_split
    evenly spaced ones (so a cut still mixes one- and two-object prompts)."""
    out = {}
    for split in ("seen", "held_out"):
        prompts = shapes.test_prompts(split)
        n = plan.prompts_per_split
        if 0 < n < len(prompts):
            prompts = [prompts[round(i * (len(prompts) - 1) / (n - 1))] for i in range(n)] if n > 1 else prompts[:1]
        out[split] = prompts
    return out


test_prompts.__test__ = False  # not a pytest test


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text)[:60]


@torch.no_grad()
def generate_and_score(generators: dict, tokenizer, text_encoder, plan: Plan, seed: int, *,
                       prompts: dict | None = None, samples_dir: Path | None = None, batch_size: int = 32,
                       progress: bool = True) -> tuple[dict, dict]:
    """Images for the test prompts from each generator ({"trained": g, "untrained": g0}),
    scored by the detector.

    prompts: {split: [{"caption", "objects"}]} (default: test_prompts(plan)).
        `plan.samples_per_prompt` images per prompt, sampling seeded by `seed`.
    Returns (adherence {generator: {split: score}}, images {generator: {split: [(caption, [PIL])]}});
    writes the images to samples_dir/<generator>/<split>/ when given."""
    from tatitok_fast.images import to_pil
    from tatitok_fast.pipeline import TextToImage

    adherence: dict = {}
    images: dict = {}
    for name, gen in generators.items():
        pipe = TextToImage(gen, tokenizer, text_encoder)
        adherence[name], images[name] = {}, {}
        for split, split_prompts in (prompts or test_prompts(plan)).items():
            captions = [p["caption"] for p in split_prompts for _ in range(plan.samples_per_prompt)]
            rng = torch.Generator(device=tokenizer.latent_tokens.device).manual_seed(seed)
            out = []
            for i in tqdm(range(0, len(captions), batch_size), desc=f"generate {name} {split}", unit="batch",
                          disable=not progress, leave=False):
                out += to_pil(pipe(captions[i:i + batch_size], generator=rng))
            truths = [p for p in split_prompts for _ in range(plan.samples_per_prompt)]
            adherence[name][split] = detector.score(out, truths)
            k = plan.samples_per_prompt
            images[name][split] = [(p["caption"], out[j * k:(j + 1) * k]) for j, p in enumerate(split_prompts)]
            if samples_dir is not None:
                folder = samples_dir / name / split
                folder.mkdir(parents=True, exist_ok=True)
                for j, (cap, im) in enumerate(zip(captions, out)):
                    im.save(folder / f"{j:04d}_{_slug(cap)}.png")
    return adherence, images


def write_outputs(out: Path, results: dict, images: dict, recon_pairs: list, *, seen_rows: int = 8) -> None:
    """report.json, report.md, grid.png (trained generator: some seen prompts and every
    held-out prompt; then originals beside reconstructions) and curves.png (the learning
    curves in DIR/runs/*/metrics.jsonl, when there)."""
    trained = images.get("trained", {})
    rows = [(cap, ims) for cap, ims in trained.get("seen", [])[:seen_rows]]
    rows += [(f"{cap} [held-out]", ims) for cap, ims in trained.get("held_out", [])]
    report.write_report(out, results)
    report.demo_grid(rows, recon_pairs).save(out / "grid.png")
    tok_log, gen_log = out / "runs" / "tokenizer" / "metrics.jsonl", out / "runs" / "generator" / "metrics.jsonl"
    if tok_log.is_file() and gen_log.is_file():
        mean_psnr = results.get("tokenizer", {}).get("mean_image_psnr")
        curves.plot_curves([
            curves.Panel("tokenizer: PSNR on fresh renders (dB)", curves.read_series(tok_log, "eval/psnr"),
                         mean_psnr, "the training set's mean image" if mean_psnr is not None else ""),
            curves.Panel("tokenizer: training loss", curves.read_series(tok_log, "loss")),
            curves.Panel("generator: masked-token accuracy (train)", curves.read_series(gen_log, "masked_accuracy")),
        ], out / "curves.png")


# ---------------------------------------------------------------------------------------
# Training stages: the training engine with the demo recipes (training/recipes/demo_*.toml),
# exactly as `tatitok-fast train --config ...` runs them

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"


def _recipe(name: str) -> Path:
    path = RECIPES / f"{name}.toml"
    if not path.is_file():  # an installed wheel without the repository's training/ folder
        raise DemoError(f"the demo recipe {path} is missing: run the demo from a checkout of the repository")
    return path


def _train(recipe: str, run_dir: Path, steps: int, batch: int, shards: list[Path], seed: int, progress: bool,
           extra: list[str]) -> Path:
    from tatitok_fast.training.train import main

    argv = ["--config", str(_recipe(recipe)), "--job.dump_folder", str(run_dir), "--training.steps", str(steps),
            "--training.local_batch_size", str(batch), "--training.seed", str(seed), "--model.text_encoder", json.dumps(TEXT_ENCODER),
            "--data.shards", ",".join(map(str, shards)), "--metrics.progress", "true" if progress else "false",
            *extra]
    if main(argv) != 0:
        raise RuntimeError(f"training {recipe} failed (see the error above)")
    return run_dir / "export" / f"step-{steps}"


def _train_tokenizer(plan: Plan, shards: list[Path], run_dir: Path, seed: int, progress: bool = True,
                     eval_shards: list[Path] = ()) -> Path:
    """A micro TA-TiTok VQ (training/recipes/demo_tokenizer.toml); returns its export. With
    eval_shards, PSNR on them (EMA weights) every tenth of the run goes into metrics.jsonl."""
    extra = ["--samples.interval", str(plan.tokenizer_steps), "--samples.num", "8"]
    if eval_shards:
        extra += ["--eval.shards", ",".join(map(str, eval_shards)), "--eval.interval",
                  str(max(1, plan.tokenizer_steps // 10)), "--eval.num_samples", str(plan.eval_images),
                  "--eval.inception_weights", "none"]
    return _train("demo_tokenizer", run_dir, plan.tokenizer_steps, plan.tokenizer_batch, shards, seed, progress,
                  extra)


def _train_generator(plan: Plan, token_shards: list[Path], tokenizer_dir: Path, run_dir: Path, seed: int,
                     progress: bool = True) -> Path:
    """A tiny MaskGen-VQ (training/recipes/demo_generator.toml) on the token shards; its logged
    samples are decoded by the demo's tokenizer; returns its export."""
    prompts = [p["caption"] for p in shapes.test_prompts("seen")[:4] + shapes.test_prompts("held_out")[:4]]
    return _train("demo_generator", run_dir, plan.generator_steps, plan.generator_batch, token_shards, seed, progress,
                  ["--model.tokenizer", str(tokenizer_dir), "--samples.interval", str(plan.generator_steps),
                   "--samples.prompts", json.dumps(prompts)])


def _install_export(export_dir: Path, target: Path) -> Path:
    """Copy an engine export to DIR/<name>, making sure its config names the demo's text encoder
    (so `tatitok-fast generate` picks it without flags)."""
    shutil.copytree(export_dir, target)
    cfg_path = target / "config.json"
    cfg = json.loads(cfg_path.read_text())
    te = cfg.setdefault("model", {}).get("text_encoder")
    if te is None:
        cfg["model"]["text_encoder"] = dict(TEXT_ENCODER)
        cfg_path.write_text(json.dumps(cfg, indent=4))
    elif te != TEXT_ENCODER:
        raise RuntimeError(f"{export_dir}: config names text encoder {te}, the demo trains with {TEXT_ENCODER}")
    return target


# ---------------------------------------------------------------------------------------
# The whole demo

class _Stages:
    """Prints `[i/n] name ...` and `done in X s` per stage and records the times."""

    def __init__(self, names: list[str]):
        self.names, self.times, self.t0 = names, {}, time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        i = self.names.index(name) + 1
        print(f"[{i}/{len(self.names)}] {name} ...", flush=True)
        t = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - t
        print(f"[{i}/{len(self.names)}] {name}: done in {self.times[name]:.1f} s", flush=True)

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0


STAGES = ["data", "train tokenizer", "evaluate tokenizer", "tokenize", "train generator", "generate + score",
          "report"]


def run_demo(out_dir: str | os.PathLike, quick: bool = False, force: bool = False, seed: int = 0,
             progress: bool | None = None) -> dict:
    """Run every stage into `out_dir`; returns the results written to report.json."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DemoError(f"--seed: expected an int >= 0, got {seed!r}")
    try:
        detector.require_scipy()
    except ImportError as exc:
        raise DemoError(str(exc)) from None
    out = prepare_out_dir(out_dir, force)
    progress = sys.stderr.isatty() if progress is None else progress
    plan = PLANS["quick" if quick else "full"]
    stage = _Stages(STAGES)
    from tatitok_fast import TATiTok
    from tatitok_fast.models.generators.maskgen import load_generator
    from tatitok_fast.text import CLIPTextEncoder

    torch.manual_seed(seed)
    text_encoder = CLIPTextEncoder.from_spec(TEXT_ENCODER)
    with stage("data"):
        shards, eval_shards, on_data = make_data(out / "data", plan, seed, progress)
    with stage("train tokenizer"):
        tok_dir = _install_export(_train_tokenizer(plan, shards, out / "runs" / "tokenizer", seed, progress,
                                                   eval_shards), out / "tokenizer")
        tokenizer = TATiTok.from_pretrained(tok_dir).eval()
    with stage("evaluate tokenizer"):
        tok_metrics, recon_pairs = evaluate_tokenizer(tokenizer, text_encoder, plan, seed)
    with stage("tokenize"):
        token_shards = tokenize_data(shards, tok_dir, out / "tokens", progress=progress)
    with stage("train generator"):
        gen_dir = _install_export(_train_generator(plan, token_shards, tok_dir, out / "runs" / "generator", seed,
                                                   progress), out / "generator")
        generator = load_generator(gen_dir).eval()
    with stage("generate + score"):
        torch.manual_seed(seed)
        untrained = type(generator)(generator.config).eval()  # same architecture, random weights: chance level
        adherence, images = generate_and_score({"trained": generator, "untrained": untrained}, tokenizer,
                                               text_encoder, plan, seed, samples_dir=out / "samples",
                                               progress=progress)
    with stage("report"):
        results = {"seed": seed, "quick": quick, "plan": asdict(plan), "text_encoder": TEXT_ENCODER,
                   "detector_on_data": on_data, "tokenizer": tok_metrics, "adherence": adherence,
                   "stages": stage.times}
        results["total_seconds"] = stage.total
        write_outputs(out, results, images, recon_pairs)
    results["stages"] = stage.times
    results["total_seconds"] = stage.total
    report.write_report(out, results)  # again, with the report stage's own time
    return results
