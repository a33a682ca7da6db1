"""isofast: fast isometric regularisation for PyTorch.

Builds the compiled extension ``isofast._C`` (``csrc/``) ahead of time with ninja:

- the C++ CPU kernels always;
- the CUDA kernels too when torch is a CUDA build and a CUDA toolkit is found, or when forced with
  ``ISOFAST_BUILD_CUDA=1`` (``ISOFAST_BUILD_CUDA=0`` skips them);
- nothing with ``ISOFAST_NO_EXT=1`` (pure Python; ``python -m isofast doctor --build`` can build the
  extension just in time later).

torch must already be installed and visible to the build:
``pip install --no-build-isolation -e ".[test]"``. Parallel compile jobs: ``MAX_JOBS`` (default 2).
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CSRC = "csrc"
CPP_SOURCES = ["bindings.cpp", "mlp_cpu.cpp", "spectral_cpu.cpp"]
CUDA_SOURCES = ["cuda_ops.cpp", "cuda/spectral_kernels.cu", "cuda/reduce_kernels.cu", "cuda/mlp_epilogue_kernels.cu"]


def extension_modules():
    """``(ext_modules, cmdclass)`` for the compiled extension, or empty when it is not built."""
    if os.environ.get("ISOFAST_NO_EXT") == "1":
        print("isofast: ISOFAST_NO_EXT=1, not building the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("isofast: torch is not importable (install torch first and use --no-build-isolation); "
              "building without the compiled extension")
        return [], {}
    os.environ.setdefault("MAX_JOBS", "2")
    flag = os.environ.get("ISOFAST_BUILD_CUDA")
    with_cuda = flag == "1" if flag is not None else (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None)
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", arch_list)
    # Build-info macros as bare tokens (bindings.cpp stringifies them); same as isofast/_ext.py.
    defines = [f"-DISOFAST_TORCH_VERSION_RAW={torch.__version__}"]
    if with_cuda:
        archs = ",".join(arch_list.replace(";", " ").replace(",", " ").split()).replace("+", "_")
        defines += ["-DISOFAST_WITH_CUDA", f"-DISOFAST_CUDA_VERSION_RAW={torch.version.cuda or 'none'}",
                    f"-DISOFAST_CUDA_ARCHS_RAW={archs}"]
    sources = [f"{CSRC}/{s}" for s in CPP_SOURCES + (CUDA_SOURCES if with_cuda else [])]
    kwargs = dict(
        name="isofast._C",
        sources=sources,
        include_dirs=[str(ROOT / CSRC)],
        extra_compile_args={"cxx": ["-O3", *defines], "nvcc": ["-O3", *defines]},
    )
    ext = cpp_extension.CUDAExtension(**kwargs) if with_cuda else cpp_extension.CppExtension(**kwargs)
    print(f"isofast: building isofast._C ({'CPU + CUDA' if with_cuda else 'CPU'} kernels) with "
          f"MAX_JOBS={os.environ['MAX_JOBS']}")
    build = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build}


ext_modules, cmdclass = extension_modules()

setup(
    name="isofast",
    version="0.1.0",
    description="Fast geometry-preserving (isometric) regularisation of autoencoders and generators",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder and install as isofast.kernels.
    packages=find_packages(include=["isofast", "isofast.*"]) + ["isofast.kernels"],
    package_dir={"isofast.kernels": "kernels"},
    package_data={"isofast": ["py.typed"]},
    install_requires=["torch>=2.3", "numpy"],
    extras_require={
        "train": ["matplotlib", "scikit-learn", "tqdm"],
        "test": ["pytest", "matplotlib", "scikit-learn", "tqdm", "triton; platform_system == 'Linux'", "diffusers"],
        "triton": ["triton"],
    },
    entry_points={"console_scripts": ["isofast = isofast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
