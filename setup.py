"""Builds compressm_kernels' compiled extensions with torch's cpp_extension (ninja, pybind11).

- ``compressm_kernels._C``: the C++ CPU kernels in ``csrc/cpu`` (OpenMP), built everywhere.
- ``compressm_kernels._C_cuda``: the CUDA kernels in ``csrc/cuda`` (``.cu`` without torch headers, one
  binding ``.cpp``), built when nvcc is found and torch is a CUDA build.

Environment (no network, no git, no nvidia-smi):
    COMPRESSM_NO_EXTENSIONS=1      build no compiled extension (pure-Python install; scripts/bootstrap.sh
                                   compiles them in place first and then installs the package editable)
    COMPRESSM_SKIP_CUDA_BUILD=1    never build the CUDA extension
    COMPRESSM_FORCE_CUDA_BUILD=1   build it even when nvcc or torch's CUDA is missing (fails loudly instead)
    COMPRESSM_CUDA_ARCHS="8.0;9.0" compute capabilities; PTX is added for the newest
    COMPRESSM_NO_OPENMP=1          build the CPU kernels without OpenMP (one thread), as happens anyway when the
                                   C++ compiler cannot build and link -fopenmp (Apple's clang)
    MAX_JOBS=N                     parallel compile jobs (read by torch's ninja build)
    CUDA_HOME                      toolkit root; guessed from nvcc when unset
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "TRUE", "YES", "ON")


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root. torch guesses it from nvcc's path, which breaks when nvcc is a wrapper
    script outside the toolkit (e.g. /usr/local/bin/nvcc), so look for the headers instead."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent.parent] if nvcc else []
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if (root / "include" / "cuda_runtime.h").exists() and (root / "bin" / "nvcc").exists():
            return str(root)
    return None


def _cuda_archs() -> list[str]:
    archs = [a.strip() for a in os.environ.get("COMPRESSM_CUDA_ARCHS", "8.0;9.0").replace(",", ";").split(";")]
    return [a for a in archs if a]


def _gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for arch in archs:
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    newest = max(archs, key=float).replace(".", "")
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")  # PTX for newer GPUs
    return flags


def _wheel_cuda_includes() -> list[str]:
    """Header folders of pip's nvidia-* wheels (cuBLAS, cuSPARSE, ...), which torch's CUDA headers include."""
    dirs = []
    for entry in sys.path:
        nvidia = Path(entry) / "nvidia"
        if nvidia.is_dir():
            dirs += [str(p) for p in sorted(nvidia.glob("*/include")) if p.is_dir()]
    return dirs


def _openmp_flags() -> list[str]:
    """["-fopenmp"] when the C++ compiler builds and links an OpenMP program, else [] (the CPU kernels then run on
    one thread: their pragmas are ignored and the code guards its few OpenMP calls)."""
    if _flag("COMPRESSM_NO_OPENMP"):
        return []
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probe.cpp"
        source.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            built = subprocess.run([compiler, "-fopenmp", str(source), "-o", str(Path(tmp) / "probe")],
                                   capture_output=True).returncode == 0
        except OSError:
            built = False
    if not built:
        print(f"compressm_kernels: {compiler} cannot build OpenMP code; the CPU kernels will run on one thread",
              file=sys.stderr)
    return ["-fopenmp"] if built else []


def _sources(folder: str, *patterns: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for pat in patterns for p in (CSRC / folder).glob(pat))


def _generate_cuda_instantiations() -> None:
    """Refresh csrc/cuda/generated/*.cu from their generator (rewrites only files whose text changed)."""
    generator = CSRC / "cuda" / "generate_instantiations.py"
    if generator.exists():
        spec = importlib.util.spec_from_file_location("compressm_generate_instantiations", generator)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.write()


def extensions() -> tuple[list, dict]:
    _generate_cuda_instantiations()
    cpu_sources = _sources("cpu", "*.cpp")
    cuda_sources = _sources("cuda", "*.cpp", "*.cu", "generated/*.cu")
    if not cpu_sources and not cuda_sources:
        return [], {}
    os.environ.setdefault("CUDA_HOME", _find_cuda_home() or "")
    if not os.environ["CUDA_HOME"]:
        del os.environ["CUDA_HOME"]
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    include_dirs = [str(CSRC / "include")]
    # libstdc++ named explicitly, ahead of the compiler driver's own: where the environment asks for it statically
    # (-static-libstdc++ in LDFLAGS, say; the lent GPU machine's builds came out so), an extension carries a private
    # copy of its locale code beside the shared one torch uses, and streaming an integer into an error message
    # segfaulted there.
    link_libstdcxx = ["-lstdc++"] if sys.platform.startswith("linux") else []  # macOS has libc++, Windows MSVC
    exts = []
    if cpu_sources:
        openmp = _openmp_flags()
        exts.append(
            CppExtension(
                "compressm_kernels._C",
                cpu_sources,
                include_dirs=include_dirs,
                # -fno-trapping-math lets GCC if-convert the float selects in the state loops (exp's range
                # clamp) and so vectorise them; -fno-wrapv undoes the -fwrapv in Python's CFLAGS, which keeps
                # GCC from assuming int indices never overflow (decode steps 3-7 % slower with it); no -march:
                # the AVX2 loops are chosen at run time (cpu_common.h).
                extra_compile_args={
                    "cxx": ["-O3", "-g0", *openmp, "-Wno-unknown-pragmas", "-ffp-contract=fast", "-fno-trapping-math",
                            "-fno-wrapv"]
                },
                extra_link_args=[*openmp, *link_libstdcxx],
            )
        )
    import torch

    want_cuda = bool(cuda_sources) and not _flag("COMPRESSM_SKIP_CUDA_BUILD")
    have_nvcc = os.environ.get("CUDA_HOME") is not None
    # A CPU-only torch (pip's +cpu wheels) beside a CUDA toolkit: it has no CUDA libraries to link against.
    torch_cuda = torch.version.cuda is not None
    if want_cuda and ((have_nvcc and torch_cuda) or _flag("COMPRESSM_FORCE_CUDA_BUILD")):
        nvcc_flags = [
            "-O3",
            "-std=c++17",
            "--use_fast_math",
            "--expt-relaxed-constexpr",
            "-lineinfo",
            *_gencode_flags(_cuda_archs()),
        ]
        exts.append(
            CUDAExtension(
                "compressm_kernels._C_cuda",
                cuda_sources,
                include_dirs=include_dirs + _wheel_cuda_includes(),
                extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": nvcc_flags},
                extra_link_args=link_libstdcxx,
            )
        )
    elif want_cuda:
        missing = "nvcc not found" if not have_nvcc else f"torch {torch.__version__} is a CPU-only build"
        print(f"compressm_kernels: {missing}; building without the CUDA extension", file=sys.stderr)
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _with_build_info(build_ext_cls: type) -> type:
    """build_ext that records the torch version the extensions are built against, so a different torch
    gets a clear error at import time instead of an undefined-symbol crash."""

    class BuildExtWithInfo(build_ext_cls):
        def run(self) -> None:
            import torch

            info = f'TORCH_VERSION = "{torch.__version__}"\nCUDA_ARCHS = "{";".join(_cuda_archs())}"\n'
            for root in {ROOT, Path(self.build_lib)} if not self.inplace else {ROOT}:
                target = root / "compressm_kernels" / "_build_info.py"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text("# Written by setup.py at build time.\n" + info)
            super().run()

    return BuildExtWithInfo


ext_modules, cmdclass = extensions()
if "build_ext" in cmdclass:
    cmdclass["build_ext"] = _with_build_info(cmdclass["build_ext"])
setup(ext_modules=ext_modules, cmdclass=cmdclass)
