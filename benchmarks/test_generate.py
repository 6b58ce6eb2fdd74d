"""MaskGen generate and tokenizer-decode rows of `tatitok-fast bench generate`, timed by
pytest-benchmark (options: --generate-args, --official, --quick; see conftest.py)."""
SUITE = "generate"


def test_generate(run_model_row, model_row):
    run_model_row(SUITE, model_row)
