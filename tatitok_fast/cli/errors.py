"""How the command line reports failures: a user error (bad config or data, missing weights,
offline Hub, an unusable checkpoint, a stopped run) prints one `error: <message>` line on
stderr and exits 2, without a traceback; `--debug` or TATITOK_FAST_DEBUG=1 prints the traceback
too. Any other exception is an internal error and keeps its traceback.

Used by `tatitok-fast` (cli.main) and `python -m tatitok_fast.training.train`. This module
imports nothing of the package at import time, so any entry point can use it.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Sequence

DEBUG_ENV = "TATITOK_FAST_DEBUG"
USER_ERROR_STATUS = 2


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types a user can fix (imported lazily: no import cost, no cycle)."""
    from tatitok_fast.checkpoint import CheckpointError
    from tatitok_fast.cli.common import CommandError
    from tatitok_fast.training.checkpoint import ResumeError
    from tatitok_fast.training.config import ConfigError
    from tatitok_fast.training.data import DataError
    from tatitok_fast.training.fp8 import FP8Unavailable
    from tatitok_fast.training.guards import NonFiniteLoss
    from tatitok_fast.token_shards import CorruptSampleError
    from tatitok_fast.weight_files import WeightsFileError

    out = [CheckpointError, CommandError, ResumeError, ConfigError, DataError, FP8Unavailable, NonFiniteLoss,
           CorruptSampleError, WeightsFileError]
    try:  # offline Hub: a missing cached file when the network is off
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        out += [LocalEntryNotFoundError, OfflineModeIsEnabled]
    except ImportError:
        pass
    return tuple(out)


def debug_requested(argv: Sequence[str] | None) -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in (sys.argv[1:] if argv is None else argv)


def report_errors(run: Callable[[], int], debug: bool) -> int:
    """run() -> its exit status; a user error -> `error: ...` on stderr and status 2."""
    try:
        return int(run() or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, user_errors()):
            raise
        if debug:
            traceback.print_exc()
        message = str(exc).strip() or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        if not debug:
            print(f"(set {DEBUG_ENV}=1 or pass --debug for the traceback)", file=sys.stderr)
        return USER_ERROR_STATUS
    finally:
        sys.stderr.flush()
