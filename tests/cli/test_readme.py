"""The README and docs/ name only commands, flags, make targets and modules that exist: every
`iddpm <command> --flag`, `make <target>` and `iddpm_ext.<name>` they mention is checked against
the parsers, the Makefile and the package."""

import argparse
import glob
import importlib
import os
import re

import pytest

from helpers import REPO
from iddpm_ext import bench
from iddpm_ext.cli import app

DOCS = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]


def _text():
    return {os.path.relpath(p, REPO): open(p).read() for p in DOCS}


def _code_spans(text):
    """Inline `code` and the lines of fenced code blocks."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return inline + [line for block in blocks for line in block.splitlines()]


def _options(parser: argparse.ArgumentParser) -> set:
    return {s for action in parser._actions for s in action.option_strings}


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _flags_of(command: str, sub: str | None) -> set | None:
    if command in app.COMMAND_HELP:
        return _options(app.command_parser(command))
    if command == "bench":
        benches = _subparsers(bench.build_parser())
        if sub in benches:
            return _options(benches[sub])
        return None if sub else _options(bench.build_parser())
    commands = _subparsers(app.build_parser())
    return _options(commands[command]) if command in commands else None


def _mentions():
    """(file, command, subcommand or None, flags) for each `iddpm ...` command line in the docs."""
    out = []
    for name, text in _text().items():
        for span in _code_spans(text):
            for m in re.finditer(
                r"(?:^|[\s(])(?:iddpm|python -m iddpm_ext)\s+([a-z_]+)((?:\s+[^\s|;&]+)*)", span
            ):
                command, rest = m.group(1), m.group(2).split()
                sub = rest[0] if command == "bench" and rest and re.fullmatch(r"[a-z_]+", rest[0]) else None
                flags = {f for w in rest for f in re.findall(r"^\[?(--[a-z0-9_-]+)", w)}
                out.append((name, command, sub, tuple(sorted(flags))))
    return out


def test_the_docs_mention_commands():
    commands = {c for _, c, _, _ in _mentions()}
    assert {"train", "sample", "nll", "demo", "bench"} <= commands


MENTIONS = sorted(set(_mentions()), key=str)
IDS = [f"{name}:{command} {sub or ''} {' '.join(flags)}".strip() for name, command, sub, flags in MENTIONS]


@pytest.mark.parametrize("name,command,sub,flags", MENTIONS, ids=IDS)
def test_every_command_and_flag_exists(name, command, sub, flags):
    known = _flags_of(command, sub)
    assert known is not None, f"{name}: `iddpm {command} {sub or ''}` is not a command"
    assert not set(flags) - known, f"{name}: `iddpm {command}` has no {sorted(set(flags) - known)}"


def test_every_make_target_exists():
    makefile = open(os.path.join(REPO, "Makefile")).read()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.M))
    for name, text in _text().items():
        for span in _code_spans(text):
            for target in re.findall(r"(?:^|\s)make ([a-z][a-z-]*)", span):
                assert target in targets, f"{name}: `make {target}` is not a Makefile target"


def test_every_module_path_exists():
    for name, text in _text().items():
        for dotted in set(re.findall(r"\biddpm_ext(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text)):
            parts = dotted.split(".")
            for i in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    continue
                for attr in parts[i:]:
                    assert hasattr(obj, attr), f"{name}: {dotted} does not exist"
                    obj = getattr(obj, attr)
                break
