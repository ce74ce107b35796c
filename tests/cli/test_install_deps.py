"""scripts/install_deps.py, which installs .venv's packages for make: uv gets pip's settings,
and pip installs the packages whenever uv cannot (nothing is installed here: the commands the
script would run are recorded)."""

import importlib.util
import os
import subprocess

import pytest

from helpers import REPO

spec = importlib.util.spec_from_file_location(
    "install_deps", os.path.join(REPO, "scripts", "install_deps.py")
)
install_deps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install_deps)

PIP_CONFIG = """global.cert='/etc/ssl/certs/ca.crt'
global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'
global.find-links='/opt/old'
:env:.find-links='/opt/wheels'
:env:.default-timeout='180'
global.constraint='/etc/xdg/pip/constraints.txt'
"""


class Recorder:
    """subprocess.run stand-in: records each command, answers from ``codes`` by program."""

    def __init__(self, codes):
        self.codes, self.calls = codes, []

    def __call__(self, cmd, **kw):
        self.calls.append((cmd, kw.get("env")))
        if cmd[1:4] == ["-m", "pip", "config"]:
            return subprocess.CompletedProcess(cmd, 0, stdout=PIP_CONFIG, stderr="")
        key = "uv" if cmd[0].endswith("/uv") else ("get-uv" if cmd[-1] == "uv" else "pip")
        return subprocess.CompletedProcess(cmd, self.codes.get(key, 0))


def test_pip_settings_are_parsed_with_the_environment_winning(monkeypatch):
    monkeypatch.setattr(install_deps.subprocess, "run", Recorder({}))
    settings = install_deps.pip_settings("/env/bin/python")
    assert settings["extra-index-url"] == ["file:///opt/a/simple", "file:///opt/b/simple"]
    assert settings["find-links"] == ["/opt/wheels"]  # PIP_FIND_LINKS over the file's value
    assert settings["constraint"] == ["/etc/xdg/pip/constraints.txt"]
    assert settings["cert"] == ["/etc/ssl/certs/ca.crt"]


@pytest.mark.parametrize(
    "codes, installer, used",
    [
        ({}, "uv", "uv"),  # uv installs; pip only fetched uv
        ({"uv": 1}, "uv", "pip"),  # uv failed: pip installs
        ({"get-uv": 1}, "uv", "pip"),  # uv could not be had: pip installs
        ({}, "pip", "pip"),  # INSTALLER=pip: pip alone
    ],
)
def test_uv_with_pips_settings_else_pip(monkeypatch, capsys, codes, installer, used):
    rec = Recorder(codes)
    monkeypatch.setattr(install_deps.subprocess, "run", rec)
    monkeypatch.setenv("INSTALLER", installer)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    rc = install_deps.install("/env/bin/python", ["torch==2.14.1", "numpy"])
    assert rc == 0
    last, env = rec.calls[-1]
    assert last[-2:] == ["torch==2.14.1", "numpy"]  # every package asked for, in the last command
    if used == "uv":
        assert last[:5] == ["/env/bin/uv", "pip", "install", "--python", "/env/bin/python"]
        words = " ".join(last)
        for flag in (
            "--index-strategy unsafe-best-match",
            "--compile-bytecode",
            "--extra-index-url file:///opt/a/simple",
            "--extra-index-url file:///opt/b/simple",
            "--find-links /opt/wheels",
            "--constraint /etc/xdg/pip/constraints.txt",
        ):
            assert flag in words
        assert "/opt/old" not in words
        assert env["SSL_CERT_FILE"] == "/etc/ssl/certs/ca.crt" and env["UV_HTTP_TIMEOUT"] == "180"
    else:
        assert last[:4] == ["/env/bin/python", "-m", "pip", "install"]
        tried_uv = any(cmd[0].endswith("/uv") for cmd, _ in rec.calls)
        assert tried_uv == (codes == {"uv": 1})
        err = capsys.readouterr().err
        assert ("installing with pip" in err) == (installer == "uv")


def test_the_makefile_installs_through_it():
    text = open(os.path.join(REPO, "Makefile")).read()
    assert "scripts/install_deps.py $(VENV)/bin/python" in text and "INSTALLER ?= uv" in text
