"""Imports point one way only (ARCHITECTURE.md "Layering"); the CLI's --help stays free of heavy libraries.

Every import statement is read with ``ast`` (module level and inside functions alike, plus
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name), so a lazy import breaks a rule too.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dreamrelation", "manifests", "batch", "cluster")
HEAVY = ("torch", "diffusers", "transformers", "ray")
# what the CLI imports only inside its commands, besides HEAVY (dreamrelation.model.config, a plain dataclass, is the
# one library module its module level may load: the defaults of `generate`)
LAZY_IN_CLI = ("pyarrow", "pydantic", "fsspec", "numpy", "PIL", "tqdm", "peft", "manifests", "batch", "cluster")
CLI_LIBRARY_MODULES = ("dreamrelation.model", "dreamrelation.model.config")  # config, and the package it is in
CLI_MODULES = ("cli", "commands")  # the top layer: cli.py and the command groups it assembles

# layer -> top-level modules it must never import
FORBIDDEN = {
    "manifests": {"torch", "diffusers", "transformers", "peft", "ray", "batch", "cluster"},
    "dreamrelation": {"ray", "pydantic", "batch", "cluster", "manifests"},
    "batch": {"cluster"},
    "cluster": {"batch"},
}
# inside the model library (ARCHITECTURE.md "Target layout"): part -> parts it must never import. The model is
# what every other part builds on; the data engine may read the training data format, never the other way.
FORBIDDEN_PARTS = {
    "dreamrelation.model": {"dreamrelation.train", "dreamrelation.engine"},
    "dreamrelation.train": {"dreamrelation.engine"},
    "dreamrelation.metrics": {"dreamrelation.train", "dreamrelation.engine"},
    "dreamrelation.relation_phrase": {"dreamrelation.train", "dreamrelation.engine"},
    "dreamrelation.provenance": {"dreamrelation.train", "dreamrelation.engine"},
}


def _layer_files() -> dict[str, list[Path]]:
    files = {pkg: sorted((ROOT / pkg).rglob("*.py")) for pkg in PACKAGES}
    files["cli"] = [ROOT / "cli.py", *sorted((ROOT / "commands").glob("*.py"))]
    return files


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join([*base, node.module] if node.module else base))
            else:
                names.add(node.module or "")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                names.add(node.args[0].value)
    return names


def _violations(layer: str, banned: set[str]) -> list[str]:
    return [f"{path.relative_to(ROOT)} imports {name}"
            for path in _layer_files()[layer] for name in sorted(imported_modules(path))
            if name.split(".")[0] in banned]


def test_every_layer_has_files():
    files = _layer_files()
    for layer in (*PACKAGES, "cli"):
        assert files[layer], f"no .py files found for layer {layer!r} under {ROOT}"


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_one_way(layer):
    assert _violations(layer, FORBIDDEN[layer]) == []


def _in(name: str, modules) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def test_model_library_parts_import_one_way():
    files = _layer_files()["dreamrelation"]
    assert {_module_name(p) for p in files} >= set(FORBIDDEN_PARTS)
    offenders = [f"{path.relative_to(ROOT)} imports {name}"
                 for path in files for part, banned in FORBIDDEN_PARTS.items() if _in(_module_name(path), [part])
                 for name in sorted(imported_modules(path)) if _in(name, banned)]
    assert offenders == []


def test_nothing_imports_cli():
    offenders = [f"{path.relative_to(ROOT)} imports {name}" for layer in PACKAGES for path in _layer_files()[layer]
                 for name in sorted(imported_modules(path)) if name.split(".")[0] in CLI_MODULES]
    assert offenders == [], "the CLI (cli.py + commands/) is the top layer; these modules import it"


def test_command_groups_do_not_import_cli():
    """cli.py assembles commands/; a group that imported cli back would make a cycle."""
    groups = [path for path in _layer_files()["cli"] if path.parent.name == "commands"]
    assert {p.name for p in groups} >= {"__init__.py", "common.py", "generate.py", "batch.py", "manifest.py",
                                         "eval.py", "data.py", "train.py", "cluster.py"}
    offenders = [f"{path.relative_to(ROOT)} imports {name}" for path in groups
                 for name in sorted(imported_modules(path)) if name.split(".")[0] == "cli"]
    assert offenders == []


def test_import_scanner_sees_lazy_and_relative_imports():
    """The checker itself: function-level, relative and importlib imports are all found."""
    source = ("from .config import LoRAConfig\nfrom .. import metrics\nfrom ...batch import job\n"
              "def f():\n    import ray.data\n    import importlib\n    importlib.import_module('pydantic')\n")
    found = imported_modules(ROOT / "dreamrelation" / "model" / "probe.py", source)
    assert found >= {"dreamrelation.model.config", "dreamrelation", "batch", "ray.data", "importlib", "pydantic"}
    assert _module_name(ROOT / "dreamrelation" / "__init__.py") == "dreamrelation"
    assert _module_name(ROOT / "dreamrelation" / "model" / "__init__.py") == "dreamrelation.model"


def _run(code_or_args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "COLUMNS": "120"}
    return subprocess.run([sys.executable, *code_or_args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_cli_module_level_imports_are_light():
    probe = f"import cli, sys; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    done = _run(["-c", probe])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"importing cli pulls in {done.stdout.strip()}"


def test_every_command_group_is_light_at_module_level():
    """Importing cli imports every module of commands/ (the probe covers them all), and none of them loads a
    heavy library, pyarrow / pydantic / PIL / tqdm, or a lower layer beyond dreamrelation.model.config."""
    groups = sorted(_module_name(p) for p in _layer_files()["cli"] if p.parent.name == "commands")
    probe = ("import cli, json, sys; print(json.dumps({'missing': [m for m in %r if m not in sys.modules], "
             "'loaded': sorted(m for m in sys.modules if m.split('.')[0] in %r "
             "or (m.startswith('dreamrelation.') and m not in %r))}))"
             % (groups, (*HEAVY, *LAZY_IN_CLI), CLI_LIBRARY_MODULES))
    done = _run(["-c", probe])
    assert done.returncode == 0, done.stderr
    import json

    found = json.loads(done.stdout)
    assert found["missing"] == [], f"importing cli does not import {found['missing']}"
    assert found["loaded"] == [], f"importing cli pulls in {found['loaded']}"


def test_cli_help_lists_the_commands():
    done = _run(["cli.py", "--help"])
    assert done.returncode == 0, done.stderr
    for command in ("generate", "models"):
        assert command in done.stdout
    done = _run(["cli.py", "models", "--help"])
    assert done.returncode == 0, done.stderr
    assert "build-tiny" in done.stdout


def test_the_batch_driver_never_imports_torch():
    """`batch submit`'s driver (the job, the Ray Data pipeline, the worker's config, the local-encoder check, the
    report) stays free of torch and the model libraries: they are the actors' (a bounded, fast-starting driver)."""
    probe = ("import sys, batch.job, batch.pipeline, batch.report, batch.worker, batch.evaluate, "
             "dreamrelation.model.local_encoder_ref as r; r.check_local_tokens('tiny', None, True); "
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))")
    done = _run(["-c", probe])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"the batch driver pulls in {done.stdout.strip()}"
