"""setup.py's CUDA arch parsing (the native build's TORCH_CUDA_ARCH_LIST and torch's own arch
flags -> CMake CUDA_ARCHITECTURES), on arch-specific names like sm_90a / sm_100f that torch
builds for Hopper and Blackwell report."""
import importlib.util
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[2] / "setup.py"


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("tatitok_fast_setup", SETUP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: setup() is not run
    return module


def test_torch_arch_flags_with_feature_suffixes(setup_py):
    flags = "sm_80 sm_86 sm_90 sm_90a sm_100 sm_100f sm_120a compute_120"
    assert setup_py.parse_torch_arch_flags(flags) == [80, 86, 90, 100, 120]
    assert setup_py.parse_torch_arch_flags("sm_90a") == [90]
    assert setup_py.parse_torch_arch_flags("") == []


def test_cmake_archs_from_torch_flags(setup_py, monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert setup_py.cuda_archs_from_env("sm_80 sm_90a sm_100f") == "80-real;90-real;100-real;100-virtual"
    assert setup_py.cuda_archs_from_env("sm_75") == "75-real;90-real;90-virtual"  # sm_90 always built
    assert setup_py.cuda_archs_from_env("compute_90") == "80-real;90-real;90-virtual"  # nothing usable: default


def test_arch_list_env(setup_py, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a 10.0+PTX")
    assert setup_py.cuda_archs_from_env("sm_80") == "80-real;90a-real;100-real;100-virtual"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5+PTX")
    assert setup_py.cuda_archs_from_env("sm_80") == "75-real;75-virtual"


@pytest.mark.parametrize("spec", ["Hopper", "9", "sm_90", "9.0+ptx", ";"])
def test_bad_arch_list_names_the_variable(setup_py, spec):
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        setup_py.parse_arch_list(spec)
