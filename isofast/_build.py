"""The one description of how the compiled extension (``csrc/``) is built.

``setup.py`` (the ahead-of-time build, module ``isofast._C``) and :mod:`isofast._ext` (the
just-in-time build, module ``isofast_C``) both read it: sources, compiler flags, build-info
defines, CUDA architectures, the binding ABI number and the default number of compile jobs.

Standard library only, and nothing runs at import: ``setup.py`` loads this file by its path, before
torch is known to be importable and without importing the ``isofast`` package.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path

#: Bump when the binding signatures change; reaches ``bindings.cpp`` as ``-DISOFAST_ABI_VERSION``.
ABI_VERSION = 2
#: Module names of the ahead-of-time and the just-in-time builds.
AOT_NAME = "isofast._C"
JIT_NAME = "isofast_C"

#: The C++ sources folder, relative to the repository root; also the include path.
CSRC = "csrc"
#: C++ sources of every build (CPU kernels and the bindings), relative to ``CSRC``.
CPP_SOURCES = (
    "bindings.cpp", "cpu/mlp_stream.cpp", "cpu/mlp_pullback.cpp", "cpu/mlp_hutchinson.cpp", "cpu/spectral.cpp",
)
#: Host-side C++ of the CUDA build (the torch binding of the CUDA kernels).
CUDA_CPP_SOURCES = ("cuda/cuda_ops.cpp",)
#: CUDA kernels (``nvcc``); also what ``isofast doctor --compile-check`` compiles.
CUDA_SOURCES = ("cuda/spectral_kernels.cu", "cuda/reduce_kernels.cu", "cuda/mlp_epilogue_kernels.cu")

#: CUDA architectures built when ``TORCH_CUDA_ARCH_LIST`` is not set (H100 / H200).
DEFAULT_CUDA_ARCH_LIST = "9.0"
#: Compile jobs when ``MAX_JOBS`` is not set (ninja would otherwise take every core).
DEFAULT_MAX_JOBS = "2"
#: Optimisation flags of both compilers.
OPT_FLAGS = ("-O3",)


def cuda_wanted(torch_cuda_version: str | None, cuda_home: str | None, env: Mapping[str, str] = os.environ) -> bool:
    """Whether to compile the CUDA sources: ``ISOFAST_BUILD_CUDA=1`` forces them, ``=0`` skips them,
    otherwise they are built when torch is a CUDA build and a CUDA toolkit was found."""
    flag = env.get("ISOFAST_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    return torch_cuda_version is not None and cuda_home is not None


def cuda_arch_list(env: Mapping[str, str] = os.environ) -> str:
    """The CUDA architectures a build targets: ``TORCH_CUDA_ARCH_LIST`` or :data:`DEFAULT_CUDA_ARCH_LIST`."""
    return env.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST


def prepare_environment(with_cuda: bool, env: MutableMapping[str, str] = os.environ) -> None:
    """Set the variables torch's extension builder reads, where the user did not: ``MAX_JOBS`` and,
    for a CUDA build, ``TORCH_CUDA_ARCH_LIST`` (without it torch targets the GPU it finds, or every
    architecture it knows, and the recorded ``cuda_archs`` would not be what was compiled)."""
    env.setdefault("MAX_JOBS", DEFAULT_MAX_JOBS)
    if with_cuda:
        env["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(env)


def sources(root: Path, with_cuda: bool) -> list[str]:
    """Absolute paths of the sources a build compiles."""
    names = CPP_SOURCES + (CUDA_CPP_SOURCES + CUDA_SOURCES if with_cuda else ())
    return [str(root / CSRC / name) for name in names]


def define_flags(torch_version: str, cuda_version: str | None, arch_list: str) -> list[str]:
    """``-D`` flags of the build-info macros (``cuda_version=None``: a CPU-only build). Values travel
    as bare tokens that ``bindings.cpp`` stringifies: quoted strings do not survive every shell and
    ninja layer."""
    flags = [f"-DISOFAST_ABI_VERSION={ABI_VERSION}", f"-DISOFAST_TORCH_VERSION_RAW={torch_version}"]
    if cuda_version is not None:
        archs = ",".join(arch_list.replace(";", " ").replace(",", " ").split())
        flags += ["-DISOFAST_WITH_CUDA", f"-DISOFAST_CUDA_VERSION_RAW={cuda_version}",
                  f"-DISOFAST_CUDA_ARCHS_RAW={archs.replace('+', '_')}"]
    return flags


def compile_flags(torch_version: str, cuda_version: str | None, env: Mapping[str, str] = os.environ) -> list[str]:
    """The flags of both compilers (C++ and nvcc): optimisation and build-info defines."""
    return [*OPT_FLAGS, *define_flags(torch_version, cuda_version, cuda_arch_list(env))]
