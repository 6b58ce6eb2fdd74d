"""The training engine: config (dataclass sections from TOML + --section.key overrides), the
Trainer (train.py), and one module per concern: parallel (DDP/FSDP2, activation checkpointing,
compile), fp8 (Transformer Engine, torchao), optim, ema, checkpoint (DCP), data (webdataset
streaming), metrics. Model families plug in as recipes (spec.py, recipes/)."""
