"""The ``emalab`` console entry point: one command, subcommands discovered from ``emalab.commands``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import emalab.commands

__all__ = ["main", "build_parser"]


def _command_modules():
    for info in sorted(pkgutil.iter_modules(emalab.commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"emalab.commands.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emalab",
        description="Emergent misalignment from narrow refusal unlearning: measure, probe, unlearn, report.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=(mod.__doc__ or mod.HELP).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished stages are saved and the next run resumes from them", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError, RuntimeError) as err:
        # Library errors carry the fix in their message; a traceback would bury it.
        print(f"emalab {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
