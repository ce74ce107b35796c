"""scripts/gpu_check.sh, the one prepared command for a lent GPU machine, checked without one:
a lease is rare (15 minutes of device time per task), so a typo in a step plan or a stale test
path must fail here, not there."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _text() -> str:
    return SCRIPT.read_text()


def _steps() -> list[str]:
    return re.findall(r"^\s*step (\w+) \d+ ", _text(), flags=re.M)


def _plans() -> dict[str, list[str]]:
    found = re.findall(r'^\s*(issue\d+)\) GPU_CHECK_ONLY="([^"]*)"', _text(), flags=re.M)
    return {name: steps.split() for name, steps in found}


def test_steps_are_unique():
    steps = _steps()
    assert len(steps) > 10 and len(steps) == len(set(steps)), steps


@pytest.mark.parametrize("plan", ["issue12", "issue13"])
def test_plans_name_existing_steps(plan):
    plans = _plans()
    assert plan in plans, sorted(plans)
    unknown = [s for s in plans[plan] if s not in _steps()]
    assert plans[plan] and not unknown, f"{plan} names steps the script does not have: {unknown}"


def test_test_files_named_by_the_script_exist():
    paths = sorted(set(re.findall(r"tests/[\w/]+\.py", _text())))
    assert paths, "no test files found in the script"
    missing = [p for p in paths if not (ROOT / p).is_file()]
    assert not missing, missing


@pytest.mark.parametrize(
    "env, message",
    [
        ({"GPU_CHECK_PLAN": "issue99"}, "GPU_CHECK_PLAN: expected issue12 or issue13, got issue99"),
        ({"GPU_CHECK_PLAN": "issue13", "GPU_CHECK_ONLY": "bench_step"},
         "GPU_CHECK_PLAN and GPU_CHECK_ONLY: expected one of them, got both"),
    ],
)  # fmt: skip
def test_bad_plan_is_refused_before_anything_else(tmp_path, env, message):
    out = tmp_path / "out"
    env = {**os.environ, **env, "OUT": str(out), "PYTHON": "false"}
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in run.stderr
    assert not out.exists()  # nothing written, no device asked


def _selections() -> list[tuple[str, str]]:
    """(test file, -k expression) of every step that selects tests by name."""
    found = re.findall(r"(tests/[\w/]+\.py)\s*(?:\\\n\s*)?-k (\"[^\"]+\"|\S+)", _text())
    return [(path, expr.strip('"')) for path, expr in found]


def test_every_k_selection_selects_gpu_tests():
    # A sanitizer step whose -k matches nothing would pass on the card having checked nothing.
    # One collection of the GPU tests, then each -k expression evaluated as pytest does (a name
    # matches when it is a substring, ignoring case, of the item's node-id parts).
    import sys

    from _pytest.mark.expression import Expression

    selections = _selections()
    assert len(selections) >= 6, selections
    paths = sorted({path for path, _ in selections})
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu"]
    run = subprocess.run([*cmd, *paths], cwd=ROOT, capture_output=True, text=True, timeout=300)
    items = [line for line in run.stdout.splitlines() if "::" in line]
    assert items, run.stdout[-2000:] + run.stderr[-2000:]
    for path, expr in selections:
        compiled = Expression.compile(expr)
        hits = []
        for nodeid in items:
            if not nodeid.startswith(path + "::"):
                continue
            names = [p.lower() for p in re.split(r"::|/", nodeid)] + ["gpu"]
            if compiled.evaluate(lambda sub, **_: any(sub.lower() in n for n in names)):
                hits.append(nodeid)
        assert hits, f"{path} -k {expr!r} selects no GPU test"
