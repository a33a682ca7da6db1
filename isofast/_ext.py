"""Locate, check and (on request only) build the compiled extension of ``csrc/``.

Importing isofast never compiles. :func:`load` looks for, in order,

1. ``isofast._C``: built ahead of time by ``setup.py`` (``pip install -e .``);
2. ``isofast_C``: built just in time by :func:`build` (``python -m isofast doctor --build``) into
   :func:`jit_dir`, and loaded from there by later processes without compiling.

A module built against another torch (or CUDA) version is refused: ``load`` returns ``None``
and a reason naming both versions, so ``isofast.backends.status("cpu")`` says what to rebuild.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from isofast import _build

#: The binding ABI this isofast expects (see :data:`isofast._build.ABI_VERSION`).
ABI_VERSION = _build.ABI_VERSION
#: Name of the module a just-in-time build produces.
JIT_NAME = _build.JIT_NAME

_ROOT = Path(__file__).resolve().parent.parent
CSRC = _ROOT / _build.CSRC
#: The CUDA kernel sources (what ``isofast doctor --compile-check`` compiles with nvcc).
CUDA_SOURCES = _build.CUDA_SOURCES

_lock = threading.Lock()
_state: tuple[ModuleType | None, str] | None = None


def expected_info() -> dict[str, object]:
    """What a loadable extension must have been built against: this process's torch."""
    return {"torch_version": torch.__version__, "cuda_version": torch.version.cuda or "none"}


def check_build_info(info: dict, expected: dict | None = None) -> str:
    """``""`` if a module's ``build_info()`` matches ``expected`` (default: this process), else why not."""
    expected = expected_info() if expected is None else expected
    if info.get("abi_version") != ABI_VERSION:
        return (f"the compiled extension has binding ABI {info.get('abi_version')!r} but this isofast "
                f"expects {ABI_VERSION}: rebuild it (pip install --no-build-isolation -e . "
                f"or python -m isofast doctor --build)")
    built, running = str(info.get("torch_version", "?")), str(expected["torch_version"])
    if built != running:
        return (f"the compiled extension was built against torch {built} but torch {running} is running: "
                f"rebuild it (pip install --no-build-isolation -e . or python -m isofast doctor --build)")
    if info.get("cuda"):
        built_cuda, running_cuda = str(info.get("cuda_version", "")), str(expected["cuda_version"])
        if built_cuda != running_cuda:
            return (f"the compiled extension was built against CUDA {built_cuda or 'none'} but torch runs "
                    f"CUDA {running_cuda or 'none'}: rebuild it")
    return ""


def jit_dir() -> Path:
    """Where :func:`build` compiles to: ``$ISOFAST_EXT_DIR`` or a per-torch-version cache folder."""
    env = os.environ.get("ISOFAST_EXT_DIR")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    return cache / "isofast" / tag


def _import_aot() -> tuple[ModuleType | None, str]:
    try:
        spec = importlib.util.find_spec("isofast._C")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None, "isofast._C is not built"
    try:
        return importlib.import_module("isofast._C"), ""
    except ImportError as exc:
        return None, f"isofast._C failed to load ({exc}); it was probably built for another torch: rebuild it"


def _import_jit() -> tuple[ModuleType | None, str]:
    folder = jit_dir()
    candidates = sorted(folder.glob(f"{JIT_NAME}*.so")) + sorted(folder.glob(f"{JIT_NAME}*.pyd"))
    if not candidates:
        return None, f"no just-in-time build in {folder}"
    spec = importlib.util.spec_from_file_location(JIT_NAME, candidates[0])
    assert spec is not None and spec.loader is not None
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as exc:
        return None, f"the just-in-time build {candidates[0]} failed to load ({exc}): rebuild it"
    sys.modules[JIT_NAME] = module
    return module, ""


def _checked(module: ModuleType | None, why: str) -> tuple[ModuleType | None, str]:
    if module is None:
        return None, why
    problem = check_build_info(dict(module.build_info()))
    return (None, problem) if problem else (module, "")


def load() -> tuple[ModuleType | None, str]:
    """``(module, "")`` for a usable compiled extension, else ``(None, why)``. Never compiles."""
    global _state
    with _lock:
        if _state is None:
            if os.environ.get("ISOFAST_NO_EXT") == "1":
                _state = (None, "disabled by ISOFAST_NO_EXT=1")
            else:
                aot, why_aot = _checked(*_import_aot())
                if aot is not None:
                    _state = (aot, "")
                else:
                    jit, why_jit = _checked(*_import_jit())
                    _state = (jit, "") if jit is not None else (
                        None, f"compiled extension missing: {why_aot}; {why_jit} "
                        f"(build it: pip install --no-build-isolation -e . or python -m isofast doctor --build)")
        return _state


def get() -> ModuleType:
    """The compiled extension, or a RuntimeError saying why it cannot be used."""
    module, why = load()
    if module is None:
        raise RuntimeError(f"isofast compiled extension unavailable: {why}")
    return module


def reset() -> None:
    """Forget the cached load result (tests; after a build)."""
    global _state
    with _lock:
        _state = None


def cuda_build_wanted() -> bool:
    """Whether a build here compiles the CUDA sources (see :func:`isofast._build.cuda_wanted`)."""
    from torch.utils.cpp_extension import CUDA_HOME

    return _build.cuda_wanted(torch.version.cuda, CUDA_HOME)


def _compile_here(verbose: bool = False) -> None:
    """Run the just-in-time compile in THIS process (what :func:`build` runs in a child process)."""
    from torch.utils import cpp_extension

    with_cuda = cuda_build_wanted()
    _build.prepare_environment(with_cuda)
    flags = _build.compile_flags(torch.__version__, (torch.version.cuda or "none") if with_cuda else None)
    folder = jit_dir()
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=JIT_NAME,
        sources=_build.sources(CSRC.parent, with_cuda),
        extra_cflags=flags,
        extra_cuda_cflags=flags,
        extra_include_paths=[str(CSRC)],
        build_directory=str(folder),
        with_cuda=with_cuda,
        verbose=verbose,
    )


def build(verbose: bool = False) -> tuple[bool, str]:
    """Compile the extension just in time into :func:`jit_dir` (ninja, ``MAX_JOBS`` default 2).

    The compile runs in a child process (a shared library cannot be reloaded into a process that
    already loaded an older copy); this process then loads the result if it can."""
    import subprocess

    module, why = load()
    if module is not None:
        return True, f"already built ({module.__name__}: {dict(module.build_info())})"
    if not (CSRC / "bindings.cpp").exists():
        return False, f"the C++ sources are not part of this installation ({CSRC} missing)"
    stale = JIT_NAME in sys.modules
    code = f"from isofast import _ext; _ext._compile_here(verbose={bool(verbose)})"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=not verbose, text=True, env=env)
    if proc.returncode != 0:
        tail = ((proc.stderr or "") + (proc.stdout or ""))[-4000:] if not verbose else ""
        return False, f"build failed (exit {proc.returncode}): {tail}"
    folder = jit_dir()
    if stale:
        return True, f"built into {folder}; restart Python to load it (an older copy is loaded in this process)"
    reset()
    module, why = load()
    if module is None:
        return False, f"built into {folder} but cannot load it: {why}"
    return True, f"built into {folder}"
