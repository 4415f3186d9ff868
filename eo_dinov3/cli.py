"""The one ``eo-dinov3`` command.

Each sub-command lives next to the code it drives: a module listed in ``_COMMAND_MODULES`` exposes
``register(subparsers)`` which adds its parser(s) and sets ``func`` (called with the parsed namespace, returns an
exit code). Modules are imported lazily, so ``eo-dinov3 --help`` stays fast and a broken optional dependency only
breaks its own sub-command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from eo_dinov3.errors import EODinoError

_COMMAND_MODULES: list[str] = [
    "eo_dinov3.canopy.cli",
    "eo_dinov3.data.samples",
    "eo_dinov3.checkpoints",
    "eo_dinov3.evaluation.cli",
    "eo_dinov3.data.prepare",
    "eo_dinov3.data.curation.cli",
    "eo_dinov3.ssl.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eo-dinov3",
        description="DINOv3-style self-supervised vision for Earth observation. "
        "Run 'eo-dinov3 <command> --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for mod_name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:  # an optional extra is missing: keep the other commands alive
            if e.name and e.name.startswith("eo_dinov3"):
                raise
            continue
        mod.register(sub)
    return parser


def _version() -> str:
    from eo_dinov3 import __version__

    return f"eo-dinov3 {__version__}"


def run_standalone(parser: argparse.ArgumentParser, func, argv: list[str] | None = None) -> int:
    """Entry-script helper: parse ``argv`` with ``parser``, call ``func(args)``; a user error (:class:`EODinoError`)
    becomes one line on stderr and exit status 2, never a traceback."""
    args = parser.parse_args(argv)
    try:
        return int(func(args) or 0)
    except EODinoError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        rc = args.func(args)
    except EODinoError as e:
        print(f"eo-dinov3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
