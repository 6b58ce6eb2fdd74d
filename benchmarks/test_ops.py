"""Fused ops vs their PyTorch twins, the cases of `tatitok-fast bench ops`, timed by
pytest-benchmark (options: --ops-args, --quick; see conftest.py)."""
SUITE = "ops"


def test_op(run_op_row, op_row):
    run_op_row(op_row)
