"""environment.yml (conda) must describe the same dependencies as pyproject.toml (pip)."""

from __future__ import annotations

import re
import tomllib

import yaml

from tests.conftest import REPO_ROOT

# conda-forge package names that differ from the PyPI names used in pyproject.toml
CONDA_TO_PYPI = {"lazrs-python": "lazrs", "distributed": "dask"}


def _name(spec: str) -> str:
    spec = spec.split(";")[0].strip()
    name = re.split(r"[\[<>=!~ ]", spec, maxsplit=1)[0]
    return name.lower().replace("_", "-")


def _pyproject_requirements() -> dict[str, str]:
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    specs = list(data["project"]["dependencies"])
    for extra, reqs in data["project"]["optional-dependencies"].items():
        specs += [r for r in reqs if not r.startswith("eo_dinov3")]
    out = {}
    for s in specs:
        out[_name(s)] = s
        if "[lazrs]" in s:
            out["lazrs"] = s
    return out


def _environment_requirements() -> dict[str, str]:
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    out = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for p in dep["pip"]:
                if not p.startswith("-e"):
                    out[_name(p)] = p
        elif not dep.startswith(("python=", "pip")):
            name = _name(dep)
            out[CONDA_TO_PYPI.get(name, name)] = dep
    return out


def test_environment_yml_lists_the_pyproject_dependencies():
    py, env = _pyproject_requirements(), _environment_requirements()
    assert set(env) == set(py), f"only in pyproject: {set(py) - set(env)}; only in environment.yml: {set(env) - set(py)}"


def test_torch_pins_agree():
    py, env = _pyproject_requirements(), _environment_requirements()
    for pkg, pin in [("torch", "torch==2.14.1"), ("torchvision", "torchvision==0.29.1")]:
        assert py[pkg] == pin and env[pkg] == pin
