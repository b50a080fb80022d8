"""The ``emalab`` console entry point: one command, subcommands discovered from ``emalab.commands``."""

from __future__ import annotations

import argparse
import errno
import importlib
import math
import os
import pkgutil
import sys
import traceback

import emalab.commands

__all__ = ["main", "build_parser", "error_line"]


def _command_modules():
    for info in sorted(pkgutil.iter_modules(emalab.commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"emalab.commands.{info.name}")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, like every other emalab error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


_DEBUG_HELP = "show the full traceback of an error (also: EMALAB_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="emalab",
        description="Emergent misalignment from narrow refusal unlearning: measure, probe, unlearn, report.",
    )
    parser.add_argument("--debug", action="store_true", dest="debug_main", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=(mod.__doc__ or mod.HELP).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
        p.set_defaults(_run=mod.run)
    return parser


_OWN = {"interp", "probes", "training", "emalab", "experiments", "figures", "benchmarks"}

_OS_FIXES = {
    errno.ENOSPC: "free space there or write elsewhere (--out, --results or EMALAB_CACHE)",
    errno.EDQUOT: "free space there or write elsewhere (--out, --results or EMALAB_CACHE)",
    errno.EACCES: "fix its permissions or write elsewhere (--out, --results or EMALAB_CACHE)",
    errno.EPERM: "fix its permissions or write elsewhere (--out, --results or EMALAB_CACHE)",
    errno.EROFS: "it is on a read-only file system: write elsewhere (--out, --results or EMALAB_CACHE)",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a parent of the path is a file: check the path",
    errno.EISDIR: "that is a directory: pass a file",
    errno.EMFILE: "too many open files: raise `ulimit -n`",
}


def error_line(err: BaseException) -> str:
    """One line that says what failed and how to fix it, for any exception."""
    if isinstance(err, OSError) and err.errno in _OS_FIXES and str(err).startswith("[Errno"):
        # The OS's own message names no fix; emalab's OSErrors carry theirs and fall through.
        where = f": {err.filename}" if err.filename else ""
        msg = f"{err.strerror}{where}; {_OS_FIXES[err.errno]}"
    elif isinstance(err, ModuleNotFoundError):
        msg = f"cannot import {err.name!r} ({err}); install the missing package or check the name"
    elif isinstance(err, MemoryError):
        msg = "out of memory; lower --batch-size or the prompt limits, or use a smaller model"
    elif isinstance(err, (ValueError, RuntimeError, OSError)) and (
            type(err).__module__ == "builtins" or type(err).__module__.split(".")[0] in _OWN):
        msg = str(err) or type(err).__name__  # ours carry the fix in the message
    else:
        # Library internals (TypeError, safetensors, torch): the type tells a bug report where to look.
        msg = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    if isinstance(err, (KeyError, AttributeError, TypeError, IndexError, AssertionError)) and \
            type(err).__module__ == "builtins":
        msg += " (an emalab bug or a malformed input file; rerun with --debug and report the traceback)"
    return "; ".join(part.strip() for part in msg.splitlines() if part.strip())


def _check_numbers(args: argparse.Namespace) -> None:
    for key, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"--{key.replace('_', '-')} must be a finite number, got {v}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    debug = bool(args.debug_main or getattr(args, "debug", False) or os.environ.get("EMALAB_DEBUG") == "1")
    try:
        _check_numbers(args)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished stages are saved and the next run resumes from them", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0  # output piped into e.g. `head`, which stopped reading
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001 - every error becomes one line; --debug shows the traceback
        if debug:
            traceback.print_exc()
        print(f"emalab {args.command}: error: {error_line(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
