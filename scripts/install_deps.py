"""Install Python packages into an environment: with uv where it can be had, else with pip.

    python scripts/install_deps.py PYTHON SPEC [SPEC ...]

PYTHON is the environment's interpreter (make passes .venv/bin/python). uv
(https://github.com/astral-sh/uv) installs the CUDA build of torch and its libraries (about
5.5 GB) several times faster than pip: it unpacks wheels in parallel and links them from its
cache. It is installed into the environment with pip first (one small wheel). Where pip is
configured (`pip config list`: index-url, extra-index-url, find-links, constraint, cert,
timeout), uv gets the same settings, so both take packages from the same places; as with pip,
every index is searched for the best match. If uv cannot be installed or fails, pip installs
the packages instead, with a line saying so. INSTALLER=pip skips uv.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys


def pip_settings(python: str) -> dict:
    """pip's effective settings as {name: [values]} (environment variables win over files)."""
    out = subprocess.run(
        [python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    settings: dict = {}
    env_settings: dict = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        scope, _, name = key.rpartition(".")
        values = shlex.split(value.strip().strip("'\""))
        (env_settings if scope == ":env:" else settings)[name] = values
    settings.update(env_settings)
    return settings


def uv_command(python: str, specs: list, settings: dict) -> list:
    cmd = [os.path.join(os.path.dirname(python), "uv"), "pip", "install", "--python", python]
    cmd += ["--index-strategy", "unsafe-best-match"]  # pip's rule: the best version of any index
    cmd += ["--compile-bytecode"]  # as pip does: else every first import compiles (tests: in parallel)
    for name, flag in (
        ("index-url", "--index-url"),
        ("extra-index-url", "--extra-index-url"),
        ("find-links", "--find-links"),
        ("constraint", "--constraint"),
    ):
        for value in settings.get(name, []):
            cmd += [flag, value]
    return cmd + list(specs)


def uv_environment(settings: dict) -> dict:
    env = dict(os.environ)
    if settings.get("cert") and "SSL_CERT_FILE" not in env:
        env["SSL_CERT_FILE"] = settings["cert"][0]
    if settings.get("timeout") or settings.get("default-timeout"):
        env.setdefault("UV_HTTP_TIMEOUT", (settings.get("timeout") or settings["default-timeout"])[0])
    return env


def install(python: str, specs: list) -> int:
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
    if os.environ.get("INSTALLER", "uv") != "pip":
        got_uv = subprocess.run([*pip, "--quiet", "uv"], check=False).returncode == 0
        if got_uv:
            settings = pip_settings(python)
            uv = subprocess.run(uv_command(python, specs, settings), env=uv_environment(settings))
            if uv.returncode == 0:
                return 0
            print("install_deps: uv failed; installing with pip instead", file=sys.stderr)
        else:
            print("install_deps: uv could not be installed; installing with pip", file=sys.stderr)
    return subprocess.run([*pip, *specs], check=False).returncode


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python scripts/install_deps.py PYTHON SPEC [SPEC ...]")
    sys.exit(install(sys.argv[1], sys.argv[2:]))
