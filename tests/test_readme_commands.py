"""Every shell command in README.md still works: it parses, its ``--help`` exits 0, and the cheap ones really run.

The ```bash blocks of the README are split into commands (``\\`` continuations joined, ``&&`` chains split,
``$(...)`` substitutions taken out as commands of their own, ``# comments`` dropped). Then:

* ``test_readme_command_parses`` — each ``eo-dinov3 …``, ``python <script> …`` and ``torchrun … <script> …``
  command is parsed with the real argument parser of that command (nothing is executed: parsing stops right
  after ``parse_args`` succeeds), so a renamed option, a removed sub-command or a wrong choice in the README
  fails here. Pretraining ``key=value`` overrides are checked against the config schema and GEO-Bench options
  against the run settings. The sub-command's ``--help`` must exit 0 as well (commands that need Meta's weight
  files are only parsed and ``--help``-ed, never run).
* ``test_readme_cheap_commands_run`` — the README commands that need no downloaded weights run for real, in a
  temporary folder, on the sample data: ``samples path``, ``inspect-checkpoint`` / ``convert-checkpoint`` on a
  checkpoint the test writes, ``geobench make-fixtures``, ``chm from-lidar`` on the Autzen cloud, ``chm predict
  --model demo`` on the Autzen image, ``chm stats`` and ``chm evaluate`` on those outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
SETUP_PROGRAMS = {"pip", "conda", "export", "cd", "apt-get", "source"}  # set-up lines: covered by test_readme_ci


# ------------------------------------------------------------------------------------------------ README parsing
def _substitutions(line: str) -> tuple[str, list[str]]:
    """Replace every ``$(cmd)`` by a placeholder path; return the line and the inner commands."""
    inner: list[str] = []

    def repl(m: re.Match) -> str:
        inner.append(m.group(1).strip())
        return "SUBSTITUTED_PATH"

    return re.sub(r"\$\(([^()]*)\)", repl, line), inner


def readme_commands(text: str | None = None) -> list[str]:
    """All commands of the README's ```bash/sh blocks, in order (see module docstring)."""
    text = README.read_text() if text is None else text
    commands: list[str] = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line, inner = _substitutions(line)
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError as e:  # unbalanced quotes
                raise AssertionError(f"README command does not parse as shell: {line!r} ({e})") from None
            if not tokens:
                continue
            commands.extend(inner)
            part: list[str] = []
            for tok in tokens + ["&&"]:
                if tok in ("&&", ";", "||"):
                    if part:
                        commands.append(shlex.join(part))
                    part = []
                else:
                    part.append(tok)
    return commands


def _kind(tokens: list[str]) -> tuple[str, str | None, list[str]]:
    """``(kind, program, args)``: kind is cli | script | app | skip."""
    prog = tokens[0]
    if prog == "eo-dinov3":
        return "cli", None, tokens[1:]
    if prog in ("python", "python3") and len(tokens) > 2 and tokens[1] == "-m":
        if tokens[2] == "eo_dinov3":
            return "cli", None, tokens[3:]
        if tokens[2] == "pytest":
            return "skip", None, []
    if prog in ("python", "python3") and len(tokens) > 1 and tokens[1].endswith(".py"):
        return "script", tokens[1], tokens[2:]
    if prog == "torchrun":
        for i, tok in enumerate(tokens):
            if tok.endswith(".py"):
                return "script", tok, tokens[i + 1:]
    if prog == "streamlit" and len(tokens) > 2 and tokens[1] == "run":
        return "app", tokens[2], tokens[3:]
    if prog in SETUP_PROGRAMS:
        return "skip", None, []
    raise AssertionError(f"README command {shlex.join(tokens)!r} uses a program this test does not know; "
                         "teach tests/test_readme_commands.py how to check it")


def _checked_commands() -> list[str]:
    return [c for c in readme_commands() if _kind(shlex.split(c))[0] != "skip"]


# ----------------------------------------------------------------------------------------- parse without running
class _Parsed(Exception):
    """Raised by the patched ``ArgumentParser.parse_args`` once the arguments parsed successfully."""

    def __init__(self, namespace: argparse.Namespace):
        super().__init__("parsed")
        self.namespace = namespace


@contextlib.contextmanager
def _stop_after_parsing():
    """Make a top-level ``parse_args`` / ``parse_known_args`` raise :class:`_Parsed` once parsing succeeded (the
    nested ``parse_known_args`` calls of sub-parsers are let through), so a command's ``main`` parses its arguments
    and does nothing else."""
    original_args = argparse.ArgumentParser.parse_args
    original_known = argparse.ArgumentParser.parse_known_args
    state = {"depth": 0, "in_parse_args": False}

    def parse_known_args(self, args=None, namespace=None):
        state["depth"] += 1
        try:
            result = original_known(self, args, namespace)
        finally:
            state["depth"] -= 1
        if state["depth"] == 0 and not state["in_parse_args"]:
            raise _Parsed(result[0])
        return result

    def parse_args(self, args=None, namespace=None):
        state["in_parse_args"] = True
        try:
            namespace = original_args(self, args, namespace)  # also rejects unrecognised arguments
        finally:
            state["in_parse_args"] = False
        raise _Parsed(namespace)

    argparse.ArgumentParser.parse_args = parse_args
    argparse.ArgumentParser.parse_known_args = parse_known_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original_args
        argparse.ArgumentParser.parse_known_args = original_known


def _parse(entry, argv: list[str], label: str, capsys) -> argparse.Namespace:
    with _stop_after_parsing():
        try:
            entry(argv)
        except _Parsed as p:
            return p.namespace
        except SystemExit as e:
            err = capsys.readouterr().err.strip().splitlines()
            pytest.fail(f"README command {label!r} does not parse (exit {e.code}): {err[-1] if err else ''}")
    pytest.fail(f"README command {label!r}: its entry point returned without parsing arguments")


def _cli_entry(argv: list[str]) -> None:
    from eo_dinov3.cli import main

    main(argv)


def _script_entry(script: Path):
    def run(argv: list[str]) -> None:
        old = sys.argv
        sys.argv = [str(script), *argv]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = old

    return run


def _subcommand_path(args: list[str]) -> list[str]:
    """The leading tokens of ``args`` that name (nested) ``eo-dinov3`` sub-commands."""
    from eo_dinov3.cli import build_parser

    parser, path = build_parser(), []
    for tok in args:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or tok not in subs[0].choices:
            break
        parser = subs[0].choices[tok]
        path.append(tok)
    return path


def _validate_settings(script: str, ns: argparse.Namespace, label: str) -> None:
    """Beyond argparse: pretraining overrides must be config keys, GEO-Bench options valid run settings."""
    name = Path(script).name
    if name == "pretrain.py":
        from eo_dinov3.ssl.config import load_config

        config = Path(ns.config)
        assert config.is_file(), f"README command {label!r}: config {ns.config} does not exist"
        load_config(config, list(ns.overrides))  # raises ConfigError on unknown keys / bad values
    elif name == "run.py" and Path(script).parent.name == "geobench":
        from eo_dinov3.evaluation.cli import config_from_args

        config_from_args(ns)
    else:
        config = getattr(ns, "config", None)
        if isinstance(config, str) and config.endswith((".yaml", ".yml")):
            assert (REPO_ROOT / config).is_file(), f"README command {label!r}: config {config} does not exist"


@pytest.mark.parametrize("command", _checked_commands())
def test_readme_command_parses(command: str, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    tokens = [t for t in shlex.split(command) if t != "..."]  # "..." = "and more options" in prose
    kind, program, args = _kind(tokens)
    if kind == "app":
        app = REPO_ROOT / program
        assert app.is_file(), f"README command {command!r}: {program} does not exist"
        compile(app.read_text(), str(app), "exec")
        return
    if kind == "cli":
        ns = _parse(_cli_entry, args, command, capsys)
        assert getattr(ns, "func", None) is not None, f"README command {command!r} names no runnable sub-command"
        config = getattr(ns, "config", None)
        if isinstance(config, str) and config.endswith((".yaml", ".yml")):
            assert (REPO_ROOT / config).is_file(), f"README command {command!r}: config {config} does not exist"
        path = _subcommand_path(args)
        with pytest.raises(SystemExit) as exit_info:
            _cli_entry([*path, "--help"])
        assert exit_info.value.code in (0, None), f"eo-dinov3 {' '.join(path)} --help exited {exit_info.value.code}"
        assert "usage:" in capsys.readouterr().out
        return
    script = REPO_ROOT / program
    assert script.is_file(), f"README command {command!r}: {program} does not exist"
    ns = _parse(_script_entry(script), args, command, capsys)
    _validate_settings(program, ns, command)
    res = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, f"python {program} --help exited {res.returncode}: {res.stderr[-500:]}"
    assert "usage:" in res.stdout


def test_console_script_help():
    """The installed ``eo-dinov3`` entry point starts and lists the README's sub-commands."""
    res = subprocess.run(["eo-dinov3", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    used = {shlex.split(c)[1] for c in _checked_commands() if shlex.split(c)[0] == "eo-dinov3"}
    missing = [c for c in sorted(used) if c not in res.stdout]
    assert not missing, f"eo-dinov3 --help does not list {missing}"


def test_command_splitting():
    """The README parser itself: continuations, chains, substitutions and comments."""
    text = ("```bash\npip install x && eo-dinov3 samples fetch   # set-up\n"
            "python a.py --x 1 \\\n    --y 2\n"
            "eo-dinov3 pca w.pth $(eo-dinov3 samples path k) --size 8\n```\n"
            "```python\nprint('not a shell block')\n```\n")  # fmt: skip
    assert readme_commands(text) == ["pip install x", "eo-dinov3 samples fetch", "python a.py --x 1 --y 2",
                                     "eo-dinov3 samples path k", "eo-dinov3 pca w.pth SUBSTITUTED_PATH --size 8"]


def test_parse_only_harness(capsys):
    """Parsing stops before the command body runs; sub-parsers work; unknown options fail."""

    def entry(argv):
        p = argparse.ArgumentParser(prog="x")
        sub = p.add_subparsers(dest="cmd")
        run = sub.add_parser("run")
        run.add_argument("--size", type=int)
        args = p.parse_args(argv)
        raise RuntimeError(f"the command body ran with {args}")

    assert _parse(entry, ["run", "--size", "3"], "x run --size 3", capsys).size == 3
    with pytest.raises(pytest.fail.Exception, match="unrecognized arguments: --tile-size"):
        _parse(entry, ["run", "--tile-size", "3"], "x run --tile-size 3", capsys)


# ------------------------------------------------------------------------------------------------ cheap real runs
def _readme_line(pattern: str) -> list[str]:
    """The README command matching ``pattern`` (regex), tokenised: fails if the README lost it."""
    for c in readme_commands():
        if re.search(pattern, c):
            return shlex.split(c)
    pytest.fail(f"README no longer has a command matching {pattern!r}")


def _run(tokens: list[str], capsys, replace: dict[str, str] | None = None) -> str:
    from eo_dinov3.cli import main

    assert tokens[0] == "eo-dinov3"
    args = [(replace or {}).get(t, t) for t in tokens[1:]]
    rc = main(args)
    out = capsys.readouterr()
    assert rc == 0, f"eo-dinov3 {' '.join(args)} exited {rc}: {out.err[-1000:]}"
    return out.out


@pytest.mark.slow
def test_readme_cheap_commands_run(tmp_path, monkeypatch, capsys):
    import geopandas as gpd
    import numpy as np
    import rasterio
    import torch
    from shapely.geometry import box

    from eo_dinov3.checkpoints import load_backbone
    from eo_dinov3.data.samples import sample_path
    from eo_dinov3.hub import dinov3_vits16

    monkeypatch.chdir(tmp_path)

    # eo-dinov3 samples path KEY (the $(...) of the PCA example) prints an existing file
    out = _run(_readme_line(r"^eo-dinov3 samples path "), capsys)
    assert Path(out.strip()).is_file()

    # inspect-checkpoint / convert-checkpoint on a checkpoint written here (official layout, random ViT-S/16)
    ref = dinov3_vits16(pretrained=False)
    torch.save(ref.state_dict(), "my_weights.pth")
    out = _run(_readme_line(r"^eo-dinov3 inspect-checkpoint my_weights\.pth"), capsys)
    assert "official" in out and "dinov3_vits16" in out
    _run(_readme_line(r"^eo-dinov3 convert-checkpoint my_weights\.pth out_hf --to hf"), capsys)
    back = load_backbone("out_hf")
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), f"{k} changed in the HF round trip"

    # geobench make-fixtures: the official folder layout + normalizer.json
    out = _run(_readme_line(r"^eo-dinov3 geobench make-fixtures "), capsys, {"/tmp/gb": str(tmp_path / "gb")})
    for bench in ("classification_v1.0", "segmentation_v1.0"):
        assert (tmp_path / "gb" / bench / "normalizer.json").is_file()
    assert len(list((tmp_path / "gb").glob("*/*/*.hdf5"))) > 100

    # chm from-lidar on the Autzen cloud, chm predict --model demo on the Autzen image of the same area
    os.symlink(sample_path("autzen_laz"), "cloud.laz")
    os.symlink(sample_path("autzen_rgb_0p6m"), "scene.tif")
    _run(_readme_line(r"^eo-dinov3 chm from-lidar cloud\.laz .*--out lidar_chm\.tif"), capsys)
    with rasterio.open("lidar_chm.tif") as d:
        lidar = d.read(1, masked=True)
        assert d.crs is not None and 0 < float(lidar.max()) < 80  # metres
    out = _run(_readme_line(r"^eo-dinov3 chm predict scene\.tif --model demo .*--out chm_demo\.tif"), capsys)
    assert "demo" in out
    with rasterio.open("scene.tif") as s, rasterio.open("chm_demo.tif") as d:
        assert (d.crs, d.transform, d.width, d.height) == (s.crs, s.transform, s.width, s.height)
        assert "DEMO" in d.tags()
        assert np.isfinite(d.read(1)).any()

    # chm stats / chm evaluate on the README's file names (chm.tif = the demo map here)
    Path("chm.tif").write_bytes(Path("chm_demo.tif").read_bytes())
    with rasterio.open("chm.tif") as d:
        b, crs = d.bounds, d.crs
    xm = (b.left + b.right) / 2
    gpd.GeoDataFrame({"stand": ["west", "east"]}, geometry=[box(b.left, b.bottom, xm, b.top),
                     box(xm, b.bottom, b.right, b.top)], crs=crs).to_file("stands.gpkg")  # fmt: skip
    _run(_readme_line(r"^eo-dinov3 chm stats chm\.tif --aoi stands\.gpkg --out stats\.csv"), capsys)
    import pandas as pd

    stats = pd.read_csv("stats.csv")
    assert list(stats["stand"]) == ["west", "east"] and stats["mean_m"].notna().all()
    _run(_readme_line(r"^eo-dinov3 chm evaluate chm\.tif lidar_chm\.tif --json metrics\.json"), capsys)
    metrics = json.loads(Path("metrics.json").read_text())
    assert metrics["mae"] > 0 and metrics["n_pixels"] > 1000
