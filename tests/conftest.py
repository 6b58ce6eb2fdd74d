"""Shared test setup: the suite's global settings (tests/test_environment.py checks each).

- TRITON_INTERPRET=1 when there is no GPU, set here before triton is imported: the Triton
  kernels then run in Triton's interpreter on CPU tensors. A value already in the
  environment is kept. Code that must compile kernels for real does so in a fresh process
  (tests/ops/test_triton_offsets.py): flipping the variable later in this process does not
  undo the import-time interpretation.
- Every test starts with torch.manual_seed(SEED), torch's default dtype float32, torch's
  default intra-op thread count (THREADS, as a fresh process has it), grad mode on and
  deterministic algorithms off; a test that changes one of these has it restored after it.
"""
import os
import sys

import torch

TRITON_IMPORTED_FIRST = "triton" in sys.modules  # must be False: the variable below acts at triton's import
TRITON_INTERPRET_GIVEN = os.environ.get("TRITON_INTERPRET")  # the caller's value, kept when set
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SEED = 1234
DEFAULT_DTYPE = torch.float32
THREADS = torch.get_num_threads()  # torch's default here, read before any test can change it


def restore_global_settings() -> None:
    """Put back the process-wide torch settings a test may have changed."""
    torch.set_default_dtype(DEFAULT_DTYPE)
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)
    torch.set_grad_enabled(True)
    if torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def _global_settings():
    torch.manual_seed(SEED)
    yield
    restore_global_settings()


def pytest_report_header(config):
    from tests.helpers import OFFICIAL, in_ci

    official = "found" if (OFFICIAL / "modeling" / "tatitok.py").is_file() else (
        "MISSING: parity tests " + ("fail (CI=true)" if in_ci() else "skip"))
    return [f"tatitok_fast: TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}, torch threads {THREADS}, "
            f"default dtype {str(DEFAULT_DTYPE).removeprefix('torch.')}",
            f"official code: {OFFICIAL} ({official})"]
