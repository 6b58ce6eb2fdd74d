"""TA-TiTok encode / decode / encode+decode rows of `tatitok-fast bench tokenizer`, timed by
pytest-benchmark (options: --tokenizer-args, --official, --quick; see conftest.py)."""
SUITE = "tokenizer"


def test_tokenizer(run_model_row, model_row):
    run_model_row(SUITE, model_row)
