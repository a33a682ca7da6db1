"""The one build description (isofast/_build.py) that setup.py and the just-in-time build share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from isofast import _build, _ext, backends

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_exists_and_is_built() -> None:
    names = _build.CPP_SOURCES + _build.CUDA_CPP_SOURCES + _build.CUDA_SOURCES
    assert all((ROOT / _build.CSRC / name).is_file() for name in names)
    csrc = ROOT / _build.CSRC
    on_disk = {p.relative_to(csrc).as_posix() for p in csrc.rglob("*") if p.suffix in (".cpp", ".cu")}
    assert on_disk == set(names), "a source file that no build compiles"
    assert len(_build.sources(ROOT, with_cuda=False)) == len(_build.CPP_SOURCES)
    assert len(_build.sources(ROOT, with_cuda=True)) == len(names)


def test_cuda_arch_list_is_exported_and_recorded_alike() -> None:
    env: dict[str, str] = {}
    _build.prepare_environment(with_cuda=True, env=env)
    assert env == {"MAX_JOBS": _build.DEFAULT_MAX_JOBS, "TORCH_CUDA_ARCH_LIST": _build.DEFAULT_CUDA_ARCH_LIST}
    flags = _build.compile_flags("2.13.0", "12.8", env)
    assert f"-DISOFAST_CUDA_ARCHS_RAW={_build.DEFAULT_CUDA_ARCH_LIST}" in flags
    env = {"TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX"}
    _build.prepare_environment(with_cuda=True, env=env)
    assert env["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"
    assert "-DISOFAST_CUDA_ARCHS_RAW=8.0,9.0_PTX" in _build.compile_flags("2.13.0", "12.8", env)
    env = {}
    _build.prepare_environment(with_cuda=False, env=env)
    assert "TORCH_CUDA_ARCH_LIST" not in env
    assert not any("CUDA" in f for f in _build.compile_flags("2.13.0", None, env))


def test_abi_number_reaches_the_extension() -> None:
    assert f"-DISOFAST_ABI_VERSION={_build.ABI_VERSION}" in _build.compile_flags("2.13.0", None, {})
    assert _ext.ABI_VERSION == _build.ABI_VERSION
    module, why = _ext.load()
    if module is not None:
        assert dict(module.build_info())["abi_version"] == _build.ABI_VERSION


def test_loads_by_path_without_torch() -> None:
    """setup.py loads the description by its path before it knows torch is importable."""
    code = ("import importlib.util, sys; sys.modules['torch'] = None; "
            f"spec = importlib.util.spec_from_file_location('b', {str(ROOT / 'isofast' / '_build.py')!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.ABI_VERSION)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == str(_build.ABI_VERSION), out.stderr


def test_mismatched_build_is_refused(cpu_ext, monkeypatch):
    module, _ = _ext.load()
    info = dict(module.build_info())
    msg = _ext.check_build_info(info, {"torch_version": "9.9.9", "cuda_version": "none"})
    assert "9.9.9" in msg and info["torch_version"] in msg
    assert _ext.check_build_info({**info, "abi_version": -1})
    cuda_info = {**info, "cuda": True, "cuda_version": "12.1"}
    msg = _ext.check_build_info(cuda_info, {"torch_version": info["torch_version"], "cuda_version": "12.8"})
    assert "12.1" in msg and "12.8" in msg
    # availability() refuses it with that message.
    monkeypatch.setattr(_ext, "expected_info", lambda: {"torch_version": "9.9.9", "cuda_version": "none"})
    _ext.reset()
    backends.refresh()
    try:
        ok, why = backends.status("cpu")
        assert not ok and "9.9.9" in why and info["torch_version"] in why
    finally:
        monkeypatch.undo()
        _ext.reset()
        backends.refresh()
    assert backends.status("cpu")[0]


def test_no_ext_env_disables(cpu_ext, monkeypatch):
    monkeypatch.setenv("ISOFAST_NO_EXT", "1")
    _ext.reset()
    backends.refresh()
    try:
        ok, why = backends.status("cpu")
        assert not ok and "ISOFAST_NO_EXT" in why
    finally:
        monkeypatch.delenv("ISOFAST_NO_EXT")
        _ext.reset()
        backends.refresh()
