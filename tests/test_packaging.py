"""pyproject.toml: every module the package needs is listed, the dependencies are the pins of requirements.txt, and the
console scripts name importable callables. (Installing into a fresh venv is too slow for the suite; see the README.)"""

import ast
import importlib
import os
import re
import tomllib


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _top_level_modules() -> set:
    return {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}


def test_py_modules_cover_every_otmel_module_and_what_they_import():
    setup = _pyproject()["tool"]["setuptools"]
    listed = set(setup["py-modules"])
    present = _top_level_modules()
    assert listed <= present, f"listed but absent (the build would fail): {sorted(listed - present)}"
    otmel = {name for name in present if name.endswith("_otmel")}
    assert otmel <= listed, f"*_otmel.py modules missing from py-modules: {sorted(otmel - listed)}"
    # Every sibling module that a listed module (or a packaged script) imports must be installed too.
    sources = [os.path.join(ROOT, f"{name}.py") for name in listed]
    for package in setup["packages"]:
        folder = os.path.join(ROOT, *package.split("."))
        sources += [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".py")]
    needed = {}
    for path in sources:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            for name in names:
                if name in present:
                    needed.setdefault(name, os.path.relpath(path, ROOT))
    missing = {name: by for name, by in needed.items() if name not in listed}
    assert not missing, f"imported by packaged code but not in py-modules: {missing}"


def test_dependencies_are_the_pins_of_requirements_txt():
    project = _pyproject()["project"]
    assert "dependencies" in project["dynamic"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        requirements = [line.split("#")[0].strip() for line in f]
    requirements = [r for r in requirements if r]
    assert requirements and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.+\-]+", r) for r in requirements), (
        requirements
    )
    assert "torch==2.13.0" in requirements


def test_console_scripts_are_importable_callables():
    scripts = _pyproject()["project"]["scripts"]
    assert {"otmel-train", "otmel-link", "otmel-convert", "otmel-synth", "otmel-serve"} <= set(scripts)
    for command, target in scripts.items():
        module_name, _, attribute = target.partition(":")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, attribute, None)), f"{command}: {target} is not a callable"


def test_help_of_each_command_exits_zero(capsys):
    """`--help` through each entry point: argparse / HfArgumentParser exit 0 (SystemExit), nothing else is run."""
    import pytest

    for target in _pyproject()["project"]["scripts"].values():
        module_name, _, attribute = target.partition(":")
        entry = getattr(importlib.import_module(module_name), attribute)
        with pytest.raises(SystemExit) as stop:
            code = entry(["--help"])
            raise SystemExit(code)
        assert stop.value.code in (0, None), target
        assert "usage" in capsys.readouterr().out.lower(), target
