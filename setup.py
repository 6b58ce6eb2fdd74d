"""Build driver for tatitok_fast: one CMake extension, tatitok_fast._C (see CMakeLists.txt).

Environment:
  TATITOK_FAST_TARGET   auto (default) | cpu | cuda. auto builds the CUDA kernels when the
                        installed torch has CUDA and an nvcc of the same CUDA major version is
                        found; cuda fails loudly when that is impossible.
  CUDA_HOME/CUDA_PATH   toolkit to use first (else pip's nvidia-cuda-nvcc, nvcc on PATH,
                        /usr/local/cuda).
  TORCH_CUDA_ARCH_LIST  e.g. "8.0;9.0+PTX" (default: the archs the installed torch was built for).
  MAX_JOBS              parallel compile jobs; NVCC_THREADS threads per nvcc call.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _nvcc_version(nvcc: str):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _nvcc_candidates(cuda_major: int):
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            yield Path(os.environ[env]) / "bin" / "nvcc"
    # pip's toolkit (nvidia-cuda-nvcc, nvidia-cuda-runtime, ...) lives in site-packages.
    yield Path(sysconfig.get_paths()["purelib"]) / "nvidia" / f"cu{cuda_major}" / "bin" / "nvcc"
    on_path = shutil.which("nvcc")
    if on_path:
        yield Path(on_path)
    yield Path("/usr/local/cuda/bin/nvcc")


def find_nvcc(torch_cuda: str):
    """First nvcc of torch's CUDA major version whose toolkit has headers beside it."""
    want = tuple(int(x) for x in torch_cuda.split(".")[:2])
    rejected = []
    for nvcc in _nvcc_candidates(want[0]):
        if not nvcc.is_file():
            continue
        root = nvcc.resolve().parent.parent
        if not (root / "include" / "cuda_runtime.h").is_file():
            rejected.append(f"{nvcc} (no include/cuda_runtime.h beside it)")
            continue
        ver = _nvcc_version(str(nvcc))
        if ver is None or ver[0] != want[0]:
            rejected.append(f"{nvcc} (CUDA {ver}, torch has {torch_cuda})")
            continue
        return nvcc.resolve(), root, ver, rejected
    return None, None, None, rejected


_ARCH_ITEM = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")
_ARCH_FLAG = re.compile(r"^(?:sm|compute)_(\d+)([af]?)$")


def parse_arch_list(spec: str) -> list[str]:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0a 10.0+PTX") -> CMake CUDA_ARCHITECTURES entries
    (["80-real", "90a-real", "100-real", "100-virtual"]). Raises ValueError naming the item."""
    archs = []
    for item in re.split(r"[;\s]+", spec.strip()):
        if not item:
            continue
        m = _ARCH_ITEM.match(item)
        if m is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: expected items like 8.0, 9.0a or 9.0+PTX separated by ';' "
                             f"or spaces, got {item!r} in {spec!r}")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        archs.append(f"{num}-real")
        if m.group(4):
            archs.append(f"{num}-virtual")
    if not archs:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST: no architecture in {spec!r}")
    return archs


def parse_torch_arch_flags(flags: str) -> list[int]:
    """torch._C._cuda_getArchFlags() ("sm_80 sm_90 sm_90a sm_100f compute_120") -> the
    numeric SASS archs it names, sorted ([80, 90, 100]); the a/f feature suffixes fold into
    the plain arch (our kernels use no arch-specific instructions), compute_* (PTX) is skipped."""
    nums = set()
    for flag in flags.split():
        m = _ARCH_FLAG.match(flag)
        if m is not None and flag.startswith("sm_"):
            nums.add(int(m.group(1)))
    return sorted(nums)


def cuda_archs_from_env(torch_arch_flags: str) -> str:
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX") or torch's own archs -> CMake CUDA_ARCHITECTURES
    (sm_90 always included; PTX of the newest arch so that newer GPUs JIT it)."""
    spec = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if spec:
        return ";".join(parse_arch_list(spec))
    nums = parse_torch_arch_flags(torch_arch_flags) or [80, 90]
    if 90 not in nums:
        nums = sorted(nums + [90])
    return ";".join([f"{n}-real" for n in nums] + [f"{nums[-1]}-virtual"])


def detect_target():
    import torch

    want = os.environ.get("TATITOK_FAST_TARGET", "auto").strip().lower()
    if want not in ("auto", "cpu", "cuda"):
        raise RuntimeError(f"TATITOK_FAST_TARGET must be auto, cpu or cuda, got {want!r}")
    if want == "cpu":
        return "cpu", {}
    torch_cuda = torch.version.cuda
    if not torch_cuda:
        if want == "cuda":
            raise RuntimeError(
                f"TATITOK_FAST_TARGET=cuda, but the installed torch {torch.__version__} has no CUDA")
        print("tatitok_fast: torch has no CUDA -> CPU build", file=sys.stderr)
        return "cpu", {}
    nvcc, root, ver, rejected = find_nvcc(torch_cuda)
    if nvcc is None:
        msg = (f"no nvcc for CUDA {torch_cuda} (torch {torch.__version__}) found"
               + (": rejected " + "; ".join(rejected) if rejected else "")
               + f'. Install one, e.g. pip install "nvidia-cuda-nvcc=={torch_cuda}.*" '
               f'"nvidia-nvvm=={torch_cuda}.*" "nvidia-cuda-crt=={torch_cuda}.*", or set CUDA_HOME')
        if want == "cuda":
            raise RuntimeError("TATITOK_FAST_TARGET=cuda, but " + msg)
        print(f"tatitok_fast: {msg} -> CPU build", file=sys.stderr)
        return "cpu", {}
    archs = cuda_archs_from_env(torch._C._cuda_getArchFlags())
    print(f"tatitok_fast: CUDA build with {nvcc} (CUDA {ver[0]}.{ver[1]}), archs {archs}", file=sys.stderr)
    return "cuda", {
        "CMAKE_CUDA_COMPILER": str(nvcc),
        "TATITOK_FAST_CUDA_ARCHS": archs,
        "TATITOK_FAST_NVCC_THREADS": os.environ.get("NVCC_THREADS", "1"),
    }


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        target, extra = detect_target()
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / f"cmake-{target}"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DTATITOK_FAST_TARGET={target}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
        ]
        args += [f"-D{k}={v}" for k, v in extra.items()]
        if shutil.which("ccache"):
            args += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        subprocess.run(args, check=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import the parsers
    setup(ext_modules=[CMakeExtension("tatitok_fast._C")], cmdclass={"build_ext": CMakeBuild})
