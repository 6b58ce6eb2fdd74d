"""Run the training entry point as one rank of a local gloo group (spawned by the tests)."""
from __future__ import annotations

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    from tatitok_fast.training.train import main

    rc = main(argv + ["--metrics.progress", "false"])
    if rc:
        raise SystemExit(rc)


def launch(world_size: int, argv: list[str]) -> None:
    """Run `argv` on `world_size` local processes (spawn); raises if any rank fails."""
    import torch.multiprocessing as mp

    mp.start_processes(run_rank, args=(world_size, free_port(), argv), nprocs=world_size, start_method="spawn")
