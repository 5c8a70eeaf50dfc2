"""``pip install edgetune`` as an edge app installs it: a fresh venv with no torch, no numba
and no C compiler runs ``edgetune run`` and ``edgetune chat`` on a bundle, with the same
words as the full install, and ``edgetune train`` says which extra it needs.

Marked ``install`` (it fetches the runtime's wheels from PyPI, ~1-2 minutes with a warm pip
cache); CI runs it."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "edgetune", "kernels", "examples")
PROMPT = "turn on the kitchen lights"


def _sh(cmd, env=None, stdin=None, check=True, timeout=900):
    done = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=timeout,
        cwd=tempfile.gettempdir(),  # not the checkout: `python -c` would import its edgetune/
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{cmd} -> {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    return done


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """(venv bin dir, its env): edgetune installed from this checkout's sources, where the C
    compiler is ``false`` (every compile fails, as on a machine without one)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        s = ROOT / name
        ignore = shutil.ignore_patterns("__pycache__", "*.so", "_ckernels.c", "build")
        if s.is_dir():
            shutil.copytree(s, src / name, ignore=ignore)
        else:
            shutil.copy2(s, src / name)
    venv = tmp / "venv"
    _sh([sys.executable, "-m", "venv", venv])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(CC="false", CXX="false", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    _sh([venv / "bin" / "python", "-m", "pip", "install", "-q", str(src)], env=env)
    return venv / "bin", env


def test_runtime_install_has_no_torch_numba_or_compiled_kernels(fresh):
    bin_, env = fresh
    probe = (
        "import importlib.util as u; "
        "print([m for m in ('torch', 'numba', 'transformers', 'edgetune.kernels._ckernels') "
        "if u.find_spec(m)])"
    )
    assert _sh([bin_ / "python", "-c", probe], env=env).stdout.strip() == "[]"


def _run(bin_, env, bundle, *flags, stdin=None, command="run"):
    args = [bin_ / "edgetune", command, bundle, *flags, "--max-new-tokens", "24"]
    if command == "run":
        args += ["--prompt", PROMPT]
    return _sh(args, env=env, stdin=stdin)


def test_run_and_chat_answer_as_the_full_install(fresh, int4_bundle):
    bin_, env = fresh
    full = Path(sys.executable).parent
    here = dict(os.environ)
    ours = _run(bin_, env, int4_bundle)
    assert ours.stdout == _run(full, here, int4_bundle).stdout and ours.stdout.strip()
    assert ours.stderr.strip() == ""  # the ORT backend needs no kernels: nothing to say
    chat_in = f"{PROMPT}\n/exit\n"
    chat = _run(bin_, env, int4_bundle, stdin=chat_in, command="chat")
    assert chat.stdout == _run(full, here, int4_bundle, stdin=chat_in, command="chat").stdout
    assert ours.stdout.strip() in chat.stdout


def test_native_backend_without_compiled_kernels_says_so_once(fresh, int4_bundle):
    """The native backend runs on the numpy reference kernels, word for word as the full
    install does when told to use them, and says once, on one line, why it is slower."""
    bin_, env = fresh
    ours = _run(bin_, env, int4_bundle, "--backend", "native")
    ref_env = {**os.environ, "EDGETUNE_KERNELS": "reference"}
    full = Path(sys.executable).parent
    assert ours.stdout == _run(full, ref_env, int4_bundle, "--backend", "native").stdout
    notice = ours.stderr.strip().splitlines()
    assert len(notice) == 1 and "compiled kernels are not built" in notice[0], ours.stderr


def test_train_without_torch_names_the_extra(fresh, tiny_model, task_data, tmp_path):
    bin_, env = fresh
    argv = ["train", "--model", tiny_model, "--data", task_data[0], "--out", tmp_path / "r"]
    done = _sh([bin_ / "edgetune", *argv], env=env, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "edgetune train: error: needs torch, which is not installed: pip install 'edgetune[train]'"
    ]
