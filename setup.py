"""isofast: fast isometric regularisation for PyTorch.

Builds the compiled extension ``isofast._C`` (``csrc/``) ahead of time with ninja, as
``isofast/_build.py`` describes it (the same description the just-in-time build reads):

- the C++ CPU kernels always;
- the CUDA kernels too when torch is a CUDA build and a CUDA toolkit is found, or when forced with
  ``ISOFAST_BUILD_CUDA=1`` (``ISOFAST_BUILD_CUDA=0`` skips them);
- nothing with ``ISOFAST_NO_EXT=1`` (pure Python; ``python -m isofast doctor --build`` can build the
  extension just in time later).

torch must already be installed and visible to the build, so the build runs without pip's build
isolation: ``pip install torch ninja pybind11 setuptools wheel && pip install --no-build-isolation -e ".[test]"``.
torch is deliberately not a build requirement in ``pyproject.toml``: an isolated build would
download a torch of its own and compile against it, not against the torch that will run the
extension. A build that cannot import torch stops with a message saying so.
Parallel compile jobs: ``MAX_JOBS`` (default 2).
"""

import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _load_build_description():
    """``isofast/_build.py`` by its path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("isofast_build_description", ROOT / "isofast" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NO_TORCH = """isofast: torch is not importable in this build environment, so the compiled extension
cannot be built. Install torch first and build without pip's build isolation:

    pip install torch ninja pybind11 setuptools wheel
    pip install --no-build-isolation -e .

or ask for a pure-Python install (no C++ extension) with ISOFAST_NO_EXT=1.
(torch import error: {error})"""


def extension_modules():
    """``(ext_modules, cmdclass)`` for the compiled extension, or empty with ``ISOFAST_NO_EXT=1``."""
    if os.environ.get("ISOFAST_NO_EXT") == "1":
        print("isofast: ISOFAST_NO_EXT=1, not building the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise SystemExit(NO_TORCH.format(error=exc)) from None
    build = _load_build_description()
    with_cuda = build.cuda_wanted(torch.version.cuda, cpp_extension.CUDA_HOME)
    build.prepare_environment(with_cuda)
    flags = build.compile_flags(torch.__version__, (torch.version.cuda or "none") if with_cuda else None)
    kwargs = dict(
        name=build.AOT_NAME,
        # setuptools wants sources relative to setup.py.
        sources=[os.path.relpath(s, ROOT) for s in build.sources(ROOT, with_cuda)],
        include_dirs=[str(ROOT / build.CSRC)],
        extra_compile_args={"cxx": flags, "nvcc": flags},
    )
    ext = cpp_extension.CUDAExtension(**kwargs) if with_cuda else cpp_extension.CppExtension(**kwargs)
    print(f"isofast: building {build.AOT_NAME} ({'CPU + CUDA' if with_cuda else 'CPU'} kernels) with "
          f"MAX_JOBS={os.environ['MAX_JOBS']}"
          + (f", TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else ""))
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


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
