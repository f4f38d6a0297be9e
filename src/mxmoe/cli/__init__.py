"""The `mxmoe` command: one module per subcommand, each with `add_arguments` and `run`.

Only the module of the subcommand being run is imported; ``mxmoe --help`` and ``--version``
import none of them, and ``mxmoe/__init__.py`` imports its names lazily: neither imports torch
(tests/test_cli.py holds them to that).
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module relative to this package, one-line help). Each module defines
#: ``add_arguments(parser)`` and ``run(args) -> int``; its docstring is the long description.
SUBCOMMANDS = {
    "info": (".info", "Show the device, the versions, and which backends are usable here."),
    "check": (".check", "Run every usable backend against the float32 reference; pass/fail."),
    "bench": (".bench", "Time one whole MoE layer on every path, beside its floor."),
    "tune": (".tune", "Search kernel configs on this GPU and write the table the kernels read."),
    "quantize": (".quantize", "Convert a bf16 checkpoint's MoE expert weights to MXFP4."),
}


def _version() -> str:
    from .. import __version__

    return __version__


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the arguments of ``command`` only (all of them when None)."""
    parser = argparse.ArgumentParser(
        prog="mxmoe", description="Fused MoE on MXFP4 expert weights (Triton + PyTorch)."
    )
    parser.add_argument("--version", action="version", version=f"mxmoe {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_line) in SUBCOMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=help_line)
            continue
        module = importlib.import_module(module_name, __name__)
        p = sub.add_parser(name, help=help_line, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in SUBCOMMANDS else None if command else "")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
