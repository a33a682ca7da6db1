"""Installing a copy of this checkout into a fresh virtual environment, as a new user would.

The venv has current setuptools and wheel and sees this interpreter's packages through a ``.pth``
file (so torch is not downloaded again, whether this interpreter is a venv or not, and no other
isofast installed here can shadow the copy: ``.pth`` files of those folders are not run).
Checked, in order:

1. ``pip install -e .`` with pip's build isolation fails, saying how to install (torch is not
   importable in the isolated build environment);
2. ``ISOFAST_NO_EXT=1`` makes that same install a pure-Python one;
3. the README's install commands build the compiled extension, and the cpu backend is available.

That one is slow (it compiles the extension): deselected by default, run by CI with
``pytest -m slow``. A fast test checks the refusal itself, with torch made unimportable.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = (
    "import isofast, isofast.backends as b; ok, why = b.status('cpu'); "
    "print(isofast.__file__); print(ok); print(why)"
)


def readme_install_commands() -> list[str]:
    """The ``pip install`` steps of the README's test command (the line CI also runs)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if ln.startswith("pip install") and "pytest" in ln)
    return [step.strip() for step in line.split("&&") if step.strip().startswith("pip install")]


def copy_checkout(dest: Path) -> None:
    """The files of the checkout (tracked, and untracked ones git does not ignore), no build outputs."""
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True,
    )
    if listing.returncode != 0:
        pytest.skip("not a git checkout: cannot tell sources from build outputs")
    for name in filter(None, listing.stdout.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run(cmd: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=3000)


def probe(venv_python: Path, env: dict[str, str], tmp: Path) -> tuple[str, bool, str]:
    out = subprocess.run([str(venv_python), "-c", PROBE], cwd=tmp, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    file, ok, why = (out.stdout.splitlines() + ["", "", ""])[:3]
    return file, ok == "True", why


@pytest.mark.parametrize("no_ext", [False, True])
def test_setup_without_torch_refuses_unless_pure_python_is_asked_for(no_ext: bool) -> None:
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "ISOFAST_NO_EXT"}
    if no_ext:
        env["ISOFAST_NO_EXT"] = "1"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if no_ext:
        assert out.returncode == 0 and out.stdout.strip().endswith("isofast"), out.stderr[-2000:]
    else:
        assert out.returncode != 0
        assert "pip install --no-build-isolation" in out.stderr and "ISOFAST_NO_EXT=1" in out.stderr


@pytest.mark.slow
def test_fresh_venv_install_as_the_readme_says(tmp_path: Path) -> None:
    src = tmp_path / "isofast-src"
    copy_checkout(src)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    here = sysconfig.get_paths()
    parent = dict.fromkeys([*site.getsitepackages(), here["purelib"], here["platlib"]])
    (Path(purelib) / "parent_site_packages.pth").write_text("\n".join(parent) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ISOFAST_NO_EXT", "PIP_NO_BUILD_ISOLATION")}
    env["PATH"] = os.pathsep.join([str(bindir), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = str(venv)
    env.setdefault("MAX_JOBS", "2")
    up = run("python -m pip install -q -U setuptools wheel", tmp_path, env)
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]

    isolated = run("pip install -e .", src, env)
    assert isolated.returncode != 0, "an isolated build without torch must fail, not drop the extension"
    assert "--no-build-isolation" in isolated.stdout + isolated.stderr

    pure = run("pip install -q -e .", src, {**env, "ISOFAST_NO_EXT": "1"})
    assert pure.returncode == 0, pure.stdout[-3000:] + pure.stderr[-3000:]
    file, ok, why = probe(python, env, tmp_path)
    assert Path(file).resolve().is_relative_to(src.resolve()), f"imported {file}, not the installed copy"
    assert not ok and "compiled extension missing" in why

    for cmd in readme_install_commands():
        done = run(cmd, src, env)
        assert done.returncode == 0, f"{cmd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    file, ok, why = probe(python, env, tmp_path)
    assert Path(file).resolve().is_relative_to(src.resolve()), f"imported {file}, not the installed copy"
    assert ok, why
    assert any(p.name.startswith("_C.") and p.suffix in (".so", ".pyd") for p in (src / "isofast").iterdir())
