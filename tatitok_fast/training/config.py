"""Training configuration: a tree of dataclass sections, read from a TOML recipe, then
`--section.key value` overrides from the command line, validated before anything is built.

    cfg = load_config("training/recipes/maskgen_vq_tiny.toml", ["--training.steps", "20"])
    cfg.training.steps                    # 20
    write_config(cfg, run_dir / "config.toml")

Every field has a one-line doc (`metadata["help"]`, printed by `--help-config`) and, where the
values are a closed set, `metadata["choices"]`. A wrong key or value raises ConfigError naming
the dotted key and what is allowed. The recipe-specific `[loss]` section is validated against
the recipe's own dataclass (see spec.py).
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tatitok_fast.training.errors import ConfigError
from tatitok_fast.training.spec import RECIPES, loss_config_class


def opt(default: Any, help: str, choices: Sequence[Any] | None = None):
    """A config field: its default, a one-line doc and (optionally) the allowed values."""
    meta = {"help": help, **({"choices": tuple(choices)} if choices else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------
# Sections (torchtitan's names where they fit)

@dataclass
class Job:
    dump_folder: str = opt("./outputs/run", "run folder: config.toml, checkpoints/, metrics.jsonl, tb/, export/")
    recipe: str = opt("maskgen", "training recipe family", tuple(RECIPES))  # every registered recipe
    description: str = opt("", "free text, written into the run folder's config")


@dataclass
class Model:
    config: str = opt("", "zoo preset (e.g. maskgen_vq_xl, tatitok_bl128_vq), tiny_vq / tiny_vae, or a config.json path")
    overrides: dict = opt({}, "official-config entries to change, dotted keys: {\"model.maskgen.decoder_depth\" = 4}")
    init_from: str = opt("", "weights to start from: preset, Hub id or directory (fine-tuning, stage 2)")
    init_strict: bool = opt(True, "init_from must match every key (the official stage 2 loads with strict=False)")
    tokenizer: str = opt("", "maskgen / maskgit: the paired tokenizer (preset or directory) that decodes logged samples")
    text_encoder: dict = opt({"name": "ViT-L-14-336", "pretrained": "openai"},
                             "frozen CLIP text tower: {name, pretrained} or {name = \"tiny\", seed = 0}")
    text_cache: int = opt(0, "keep the text tower's outputs for up to N distinct captions (LRU, each caption encoded "
                             "alone); for data that repeats its captions (the demo); 0: off")


@dataclass
class Training:
    steps: int = opt(1000, "optimizer steps to train for")
    stop_after: int = opt(0, "stop this run at this step (checkpointing it) although the schedule spans "
                             "training.steps; a later run resumes (time-limited jobs); 0 = run to the end")
    local_batch_size: int = opt(32, "samples per process per micro-batch")
    grad_accum_steps: int = opt(1, "micro-batches per optimizer step")
    max_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    seed: int = opt(42, "seed of model init, data order and every random draw")
    mixed_precision: str = opt("bf16", "compute dtype (autocast; FSDP2 param dtype); fp32 = full precision",
                               ("bf16", "fp32"))
    deterministic: bool = opt(False, "deterministic algorithms (slower; bitwise-reproducible runs)")
    device: str = opt("auto", "auto (cuda when available), cpu or cuda", ("auto", "cpu", "cuda"))
    nonfinite: str = opt("stop", "a NaN/Inf loss or gradient norm: stop (error naming the step and the loss terms; "
                         "the last good checkpoint is kept) or skip (drop that update, count it in "
                         "train/skipped_steps)", ("stop", "skip"))


@dataclass
class Optimizer:
    name: str = opt("AdamW", "optimizer", ("AdamW",))
    lr: float = opt(1e-4, "peak learning rate")
    betas: list = opt([0.9, 0.999], "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")
    weight_decay: float = opt(1e-4, "weight decay (not on biases, norms, embeddings: the official groups)")
    fused: str = opt("auto", "fused AdamW kernel: auto (on CUDA and CPU), on, off", ("auto", "on", "off"))


@dataclass
class LRScheduler:
    kind: str = opt("cosine", "cosine to end_lr, or constant, after linear warmup from 0", ("cosine", "constant"))
    warmup_steps: int = opt(0, "linear warmup steps")
    end_lr: float = opt(1e-5, "cosine: final learning rate")


@dataclass
class EMA:
    enable: bool = opt(True, "keep an fp32 EMA of the weights (used for export and sample logging)")
    decay: float = opt(0.999, "EMA decay")
    warmup: bool = opt(True, "official warmup: decay_t = min((1 + t) / (10 + t), decay)")


@dataclass
class Checkpoint:
    enable: bool = opt(True, "save DCP checkpoints and resume from the latest one in the run folder")
    interval: int = opt(1000, "save every N steps (and at the last step)")
    keep_latest_k: int = opt(3, "keep the newest K checkpoints (0 = all)")
    export_interval: int = opt(0, "also export official-layout weights every N steps (0 = at the end only)")
    export_ema: bool = opt(True, "export the EMA weights (when EMA is on)")
    on_signal: bool = opt(True, "on SIGTERM / SIGUSR1 (preemption): finish the step, save a checkpoint, exit 0")
    allow_restart: bool = opt(False, "when the newest checkpoint exists but does not fit this run, start over "
                                     "from step 0 (setting it aside as step-N.unloadable) instead of stopping")


@dataclass
class Data:
    shards: list = opt([], "webdataset shard URLs or brace patterns ('data-{000..099}.tar'; '::' joins lists)")
    resampled: bool = opt(True, "draw shards with replacement (infinite stream), seeded per rank/worker")
    split: str = opt("shard", "shard: each rank/worker reads its own shards (scales); sample: every rank reads "
                     "the stream and keeps every world-th sample (same batches at any world size)",
                     ("shard", "sample"))
    shuffle_buffer: int = opt(5000, "shuffle buffer (samples; 0 = no shuffle)")
    shuffle_initial: int = opt(1000, "samples buffered before the first one is drawn")
    num_workers: int = opt(2, "data loader worker processes per rank")
    crop_size: int = opt(0, "tatitok: training crop (0 = the model's crop_size)")
    random_flip: bool = opt(True, "tatitok: random horizontal flip")
    recap_prob: float = opt(0.0, "maskgen: probability of using a sample's recaption (official: 0.95)")
    max_bad_fraction: float = opt(0.5, "stop when more than this fraction of samples read so far is corrupt")


@dataclass
class Parallelism:
    mode: str = opt("auto", "auto (fsdp when more than one process), none, ddp, fsdp", ("auto", "none", "ddp", "fsdp"))
    reshard_after_forward: bool = opt(True, "FSDP2: free gathered parameters after forward")
    activation_checkpoint: str = opt("none", "recompute each transformer block in backward", ("none", "full"))
    compile: bool = opt(False, "torch.compile each transformer block")


@dataclass
class FP8:
    backend: str = opt("none", "FP8 projections: Transformer Engine, torchao, or none", ("none", "te", "torchao"))
    recipe: str = opt("auto", "te: auto|delayed|current|mxfp8; torchao: auto|tensorwise|rowwise|rowwise_with_gw_hp")
    emulate: bool = opt(False, "torchao: emulate FP8 matmuls (CPU, tests)")
    min_features: int = opt(64, "skip projections with in or out features below this (and not divisible by 16)")


@dataclass
class Metrics:
    log_freq: int = opt(10, "log every N steps (metrics.jsonl, TensorBoard, progress bar)")
    enable_tensorboard: bool = opt(True, "write TensorBoard events to <run>/tb")
    progress: bool = opt(True, "show a progress bar")


@dataclass
class Samples:
    interval: int = opt(0, "log generated images / reconstructions every N steps (0 = off)")
    prompts: list = opt([], "maskgen: prompts to generate; maskgit: class ids (fixed, EMA weights)")
    num: int = opt(8, "tatitok: images to reconstruct")
    steps: int = opt(0, "maskgen: sampling steps (0 = the model config's)")


@dataclass
class Eval:
    interval: int = opt(0, "tatitok: reconstruction evaluation every N steps (0 = off)")
    shards: list = opt([], "evaluation shards (image + caption)")
    reference: str = opt("", "maskgit: ADM reference batch .npz (arr_0 images and/or mu/sigma) for gFID")
    num_samples: int = opt(256, "images per evaluation")
    inception_weights: str = opt("", "rFID / IS network: a pt_inception file, '' = the standard lookup (cache, "
                                 "download), 'none' = PSNR / SSIM / codebook only")


SECTIONS: dict[str, type] = {
    "job": Job, "model": Model, "training": Training, "optimizer": Optimizer, "lr_scheduler": LRScheduler,
    "aux_optimizer": Optimizer, "aux_lr_scheduler": LRScheduler, "ema": EMA, "checkpoint": Checkpoint,
    "data": Data, "parallelism": Parallelism, "fp8": FP8, "metrics": Metrics, "samples": Samples, "eval": Eval,
}


@dataclass
class JobConfig:
    """The whole run. `aux_optimizer` / `aux_lr_scheduler` drive a recipe's trainable loss-side
    modules (the tokenizer's discriminator); `loss` is the recipe's own dataclass."""

    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    aux_optimizer: Optimizer = field(default_factory=Optimizer)
    aux_lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    ema: EMA = field(default_factory=EMA)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    data: Data = field(default_factory=Data)
    parallelism: Parallelism = field(default_factory=Parallelism)
    fp8: FP8 = field(default_factory=FP8)
    metrics: Metrics = field(default_factory=Metrics)
    samples: Samples = field(default_factory=Samples)
    eval: Eval = field(default_factory=Eval)
    loss: Any = None

    def to_dict(self) -> dict:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}


# ---------------------------------------------------------------------------------------
# Values: checked against the field's declared type

def _field_type(cls: type, f: dataclasses.Field) -> type:
    return typing.get_type_hints(cls)[f.name]


def _check_value(dotted: str, value: Any, typ: type, f: dataclasses.Field) -> Any:
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, list),
          dict: lambda v: isinstance(v, dict)}[typ]
    if not ok(value):
        raise ConfigError(f"{dotted}: expected {typ.__name__}, got {value!r} ({type(value).__name__})")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{dotted}: expected one of {list(choices)}, got {value!r}")
    return float(value) if typ is float else value


def _parse_cli_value(dotted: str, text: str, typ: type) -> Any:
    """A command-line string -> the field's type (lists/dicts as JSON or comma-separated)."""
    if typ is str:
        return text
    if typ is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{dotted}: expected true or false, got {text!r}")
    if typ in (int, float):
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{dotted}: expected {typ.__name__}, got {text!r}") from None
        if typ is int:  # 1000, 1e3 and 1_000 are ints; 3.5 is not
            if not value.is_integer():
                raise ConfigError(f"{dotted}: expected an int, got {text!r}")
            return int(value)
        return value
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if typ is list:  # a,b,c
            return [s for s in text.split(",") if s]
        raise ConfigError(f"{dotted}: expected a JSON object, got {text!r}") from None


def _build_section(name: str, cls: type, values: dict) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a table of keys, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{name}.{key}: unknown key; {name} has {sorted(fields)}")
        kwargs[key] = _check_value(f"{name}.{key}", value, _field_type(cls, fields[key]), fields[key])
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------
# Loading

def parse_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """["--training.steps", "10", "--data.shards=a.tar"] -> [("training.steps", "10"), ...]."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"{arg}: expected --section.key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg}: missing its value")
            key, value = arg[2:], argv[i + 1]
            i += 2
        out.append((key, value))
    return out


def _apply_override(raw: dict, dotted: str, text: str, loss_cls: type | None) -> None:
    section, _, key = dotted.partition(".")
    cls = loss_cls if section == "loss" else SECTIONS.get(section)
    if cls is None:
        allowed = sorted(SECTIONS) + (["loss"] if loss_cls else [])
        raise ConfigError(f"--{dotted}: unknown section {section!r}; sections are {allowed}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        raise ConfigError(f"--{dotted}: unknown key; {section} has {sorted(fields)}")
    raw.setdefault(section, {})[key] = _parse_cli_value(dotted, text, _field_type(cls, fields[key]))


def load_config(path: str | Path | None, argv: Sequence[str] = ()) -> JobConfig:
    """TOML file (optional) + `--section.key value` overrides -> a validated JobConfig."""
    raw: dict = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"--config: file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config {path}: not valid TOML: {exc}") from None
    overrides = parse_overrides(list(argv))
    for dotted, text in overrides:  # the recipe decides what [loss] may hold: apply job.* first
        if dotted.startswith("job."):
            _apply_override(raw, dotted, text, None)
    recipe = raw.get("job", {}).get("recipe", Job.recipe)
    _check_value("job.recipe", recipe, str, {f.name: f for f in dataclasses.fields(Job)}["recipe"])
    loss_cls = loss_config_class(recipe)
    for dotted, text in overrides:
        if not dotted.startswith("job."):
            _apply_override(raw, dotted, text, loss_cls)
    for name in raw:
        if name not in SECTIONS and name != "loss":
            raise ConfigError(f"{name}: unknown section; sections are {sorted(SECTIONS) + ['loss']}")
    cfg = JobConfig(**{name: _build_section(name, cls, raw.get(name, {})) for name, cls in SECTIONS.items()},
                    loss=_build_section("loss", loss_cls, raw.get("loss", {})))
    validate(cfg)
    return cfg


def validate(cfg: JobConfig) -> None:
    """Cross-field checks, before any model is built."""
    t = cfg.training
    for dotted, value in (("training.steps", t.steps), ("training.local_batch_size", t.local_batch_size),
                          ("training.grad_accum_steps", t.grad_accum_steps), ("metrics.log_freq", cfg.metrics.log_freq),
                          ("checkpoint.interval", cfg.checkpoint.interval)):
        if value < 1:
            raise ConfigError(f"{dotted}: expected >= 1, got {value}")
    if cfg.checkpoint.keep_latest_k < 0:
        raise ConfigError(f"checkpoint.keep_latest_k: expected >= 0, got {cfg.checkpoint.keep_latest_k}")
    for name in ("optimizer", "aux_optimizer"):
        o = getattr(cfg, name)
        if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas):
            raise ConfigError(f"{name}.betas: expected two numbers in [0, 1), got {o.betas}")
        if o.lr <= 0:
            raise ConfigError(f"{name}.lr: expected > 0, got {o.lr}")
    if t.nonfinite == "skip":
        for name in ("optimizer", "aux_optimizer"):
            if getattr(cfg, name).fused == "off":
                raise ConfigError(f"{name}.fused: training.nonfinite = 'skip' drops a step inside the fused AdamW "
                                  "kernel (found_inf); use fused = 'auto' or 'on', or training.nonfinite = 'stop'")
    if not 0 < cfg.ema.decay < 1:
        raise ConfigError(f"ema.decay: expected in (0, 1), got {cfg.ema.decay}")
    if not cfg.model.config:
        raise ConfigError("model.config: expected a zoo preset, tiny_vq / tiny_vae or a config.json path")
    if not cfg.data.shards:
        raise ConfigError("data.shards: expected at least one webdataset shard URL or pattern")
    if cfg.data.num_workers < 0 or cfg.data.shuffle_buffer < 0:
        raise ConfigError("data.num_workers, data.shuffle_buffer: expected >= 0")
    te_recipes, ao_recipes = ("auto", "delayed", "current", "mxfp8"), ("auto", "tensorwise", "rowwise",
                                                                        "rowwise_with_gw_hp")
    if cfg.fp8.backend == "te" and cfg.fp8.recipe not in te_recipes:
        raise ConfigError(f"fp8.recipe: with fp8.backend = 'te' expected one of {list(te_recipes)}, got {cfg.fp8.recipe!r}")
    if cfg.fp8.backend == "torchao" and cfg.fp8.recipe not in ao_recipes:
        raise ConfigError(f"fp8.recipe: with fp8.backend = 'torchao' expected one of {list(ao_recipes)}, "
                          f"got {cfg.fp8.recipe!r}")
    if cfg.model.text_cache < 0:
        raise ConfigError(f"model.text_cache: expected >= 0 (0: off), got {cfg.model.text_cache}")
    te = cfg.model.text_encoder
    if not isinstance(te.get("name"), str):
        raise ConfigError(f"model.text_encoder: expected {{name = ..., pretrained = ...}}, got {te!r}")


# ---------------------------------------------------------------------------------------
# Writing (the resolved config goes into the run folder)

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    if v is None:
        return '""'
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: JobConfig) -> str:
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def write_config(cfg: JobConfig, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(to_toml(cfg))
    tmp.replace(path)


def describe(loss_cls: type | None = None) -> str:
    """Every key with its default and doc, for --help-config."""
    out = []
    for name, cls in list(SECTIONS.items()) + ([("loss", loss_cls)] if loss_cls else []):
        out.append(f"[{name}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            out.append(f"  {f.name} = {_toml_value(default)}    # {f.metadata.get('help', '')}"
                       + (f" (one of {list(choices)})" if choices else ""))
    return "\n".join(out)
