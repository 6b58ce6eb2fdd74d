"""The test environment itself: the global settings tests/conftest.py promises (its docstring)
hold in every test, and the rule for tests against the official code (tests/helpers.py
require_official): skip without the checkout, fail under CI=true."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests import conftest
from tests.helpers import REPO, in_ci, require_official


def test_triton_interpret_is_set_before_triton_imports():
    """Without a GPU (and no value from the caller) TRITON_INTERPRET=1, and everything that
    reads it at import agrees: triton's knob, its language functions (interpreted, not JIT;
    the mismatch of issue 21), and tatitok_fast's INTERPRET flag."""
    triton = pytest.importorskip("triton")
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from tatitok_fast.ops.triton import _common

    assert not conftest.TRITON_IMPORTED_FIRST, "triton was imported before tests/conftest.py set TRITON_INTERPRET"
    if not torch.cuda.is_available() and conftest.TRITON_INTERPRET_GIVEN is None:
        assert os.environ["TRITON_INTERPRET"] == "1"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    assert triton.knobs.runtime.interpret is interpret
    assert _common.INTERPRET is interpret
    assert isinstance(tl_standard.cdiv, InterpretedFunction if interpret else JITFunction)


def test_torch_settings_at_the_start_of_a_test():
    assert torch.initial_seed() == conftest.SEED
    assert torch.get_default_dtype() == conftest.DEFAULT_DTYPE == torch.float32
    assert torch.get_num_threads() == conftest.THREADS
    assert torch.is_grad_enabled()
    assert not torch.are_deterministic_algorithms_enabled()


def test_thread_count_is_torchs_default():
    """conftest.THREADS is what a fresh process with the same environment gets."""
    fresh = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, check=True, timeout=120)
    assert int(fresh.stdout) == conftest.THREADS


def test_a_test_that_changes_global_settings_does_not_leak_them(tmp_path):
    """Two tests run with tests/conftest.py as plugin: the first changes dtype, threads, grad
    mode and determinism; the second sees them restored."""
    (tmp_path / "test_pair.py").write_text(textwrap.dedent(f"""
        import torch

        def test_changes():
            torch.set_default_dtype(torch.float64)
            torch.set_num_threads({1 if conftest.THREADS != 1 else 2})
            torch.set_grad_enabled(False)
            torch.use_deterministic_algorithms(True)
            assert torch.get_default_dtype() == torch.float64 and not torch.is_grad_enabled()

        def test_sees_them_restored():
            assert torch.get_default_dtype() == torch.float32
            assert torch.get_num_threads() == {conftest.THREADS}
            assert torch.is_grad_enabled() and not torch.are_deterministic_algorithms_enabled()
        """))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_pair.py")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "2 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# Tests against the official code: skip without it, fail under CI=true

@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_missing_checkout_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path, ci, outcome):
    missing = tmp_path / "peer" / "1d-tokenizer"
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome) as exc:
        require_official(path=missing)
    assert str(missing) in str(exc.value)
    assert ("CI=true" in str(exc.value)) == (ci == "true")


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception), ("false", pytest.skip.Exception)])
def test_missing_official_dependency_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path, ci, outcome):
    checkout = tmp_path / "1d-tokenizer"
    (checkout / "modeling").mkdir(parents=True)
    (checkout / "modeling" / "tatitok.py").write_text("")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no_such_package_for_the_official_code"):
        require_official(("no_such_package_for_the_official_code",), path=checkout)
    assert require_official(("json",), path=checkout) == checkout  # present: no skip, no failure


@pytest.mark.parametrize("value, ci", [("true", True), ("TRUE", True), ("1", True), ("", False), ("false", False),
                                       ("0", False)])
def test_ci_is_read_from_the_environment(monkeypatch, value, ci):
    monkeypatch.setenv("CI", value)
    assert in_ci() is ci


def test_every_test_finds_the_official_code_through_the_helper():
    """No test module builds its own path to shared/peer (which would skip on its own terms)."""
    own = [p.relative_to(REPO).as_posix() for p in sorted((REPO / "tests").rglob("*.py"))
           if p.name not in ("helpers.py", "test_environment.py") and '"peer"' in p.read_text()]
    assert own == []
