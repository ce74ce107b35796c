"""The package's layout contract: the top level of iddpm_ext/ holds openai/improved-diffusion's
module names plus package plumbing and io; every other module lives in a subpackage named for
its layer; and no module imports a module of a higher layer (imports inside functions
included), so the layers stay a stack."""

import ast
import importlib
import os
import pkgutil

import pytest

import iddpm_ext

PACKAGE_DIR = os.path.dirname(iddpm_ext.__file__)

REFERENCE_MODULES = {
    "gaussian_diffusion",
    "respace",
    "resample",
    "losses",
    "nn",
    "unet",
    "script_util",
    "dist_util",
    "fp16_util",
    "logger",
    "image_datasets",
    "train_util",
}
PLUMBING = {"__init__", "__main__", "errors", "version"}
OTHER_TOP_LEVEL = {"io"}  # atomic writes, used by every layer that writes files (README, Layout)
SUBPACKAGES = {"core", "ops", "engine", "training", "integrations", "evaluation", "cli", "bench"}
# Modules that need an optional dependency (pyproject extras): imported only where it is installed.
OPTIONAL = {"iddpm_ext.integrations.diffusers_unet": "diffusers"}

# Lowest first. A module may import its own layer and those below it.
LAYERS = [
    {"errors", "version", "io"},
    {"ops"},
    {"core", "losses", "nn"},
    {"gaussian_diffusion", "respace", "resample", "unet", "script_util"},
    {"engine"},
    {"training", "dist_util", "logger", "fp16_util", "image_datasets", "train_util"},
    {"integrations"},
    {"evaluation"},
    {"bench"},
    {"cli", "__main__"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def test_top_level_holds_the_reference_names_plumbing_and_subpackages():
    modules = {n[:-3] for n in os.listdir(PACKAGE_DIR) if n.endswith(".py")}
    assert modules == REFERENCE_MODULES | PLUMBING | OTHER_TOP_LEVEL
    packages = {
        n for n in os.listdir(PACKAGE_DIR) if os.path.isfile(os.path.join(PACKAGE_DIR, n, "__init__.py"))
    }
    assert packages == SUBPACKAGES


@pytest.mark.parametrize("name", sorted(REFERENCE_MODULES))
def test_reference_modules_import_under_their_names(name):
    assert importlib.import_module(f"iddpm_ext.{name}").__name__ == f"iddpm_ext.{name}"


def test_public_api_names_resolve():
    missing = [n for n in iddpm_ext.__all__ if not hasattr(iddpm_ext, n)]
    assert not missing
    assert iddpm_ext.GaussianDiffusion.__module__ == "iddpm_ext.gaussian_diffusion"


def _modules():
    for info in pkgutil.walk_packages([PACKAGE_DIR], prefix="iddpm_ext."):
        yield info.name


def _imported_top_names(module_name: str) -> set:
    """The first component below iddpm_ext of every iddpm_ext module this module imports."""
    spec = importlib.util.find_spec(module_name)
    tree = ast.parse(open(spec.origin).read())
    package = module_name if spec.submodule_search_locations else module_name.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            parts = t.split(".")
            if parts[0] == "iddpm_ext" and len(parts) > 1 and parts[1] != "_C":
                names.add(parts[1])
    return names


def test_every_module_imports_only_its_layer_and_below():
    violations = []
    for name in _modules():
        top = name.split(".")[1]
        if top == "__init__" or name.endswith(".__main__") and top == "bench":
            continue
        own = LAYER_OF[top]
        for dep in _imported_top_names(name):
            if LAYER_OF.get(dep, -1) > own:
                violations.append(f"{name} imports iddpm_ext.{dep}")
    assert not violations, "\n".join(violations)


def test_every_module_imports():
    for name in _modules():
        if name.endswith("__main__"):
            continue
        if name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name]) is None:
            continue
        importlib.import_module(name)


@pytest.mark.slow
def test_import_leaves_the_sampling_engine_and_diffusers_until_first_use():
    import subprocess
    import sys

    code = (
        "import sys, iddpm_ext; assert 'iddpm_ext.engine' not in sys.modules; "
        "import iddpm_ext.integrations; "
        "iddpm_ext.SamplingEngine; assert 'iddpm_ext.engine' in sys.modules; "
        "assert 'diffusers' not in sys.modules and 'iddpm_ext.engine.scheduler' not in sys.modules; "
        "iddpm_ext.IDDPMScheduler; assert 'iddpm_ext.engine.scheduler' in sys.modules; "
        "from importlib.util import find_spec; "
        "assert ('diffusers' in sys.modules) == (find_spec('diffusers') is not None)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
