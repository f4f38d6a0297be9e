"""The `mxmoe` command: one module per subcommand, each with `add_parser` and `run`."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> module (relative to this package). Each module defines
#: ``add_arguments(parser)`` and ``run(args) -> int`` and a one-line docstring.
SUBCOMMANDS = {
    "info": ".info",
    "check": ".check",
    "bench": ".bench",
    "tune": ".tune",
    "quantize": ".quantize",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mxmoe", description="Fused MoE on MXFP4 expert weights (Triton + PyTorch)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name, __name__)
        doc = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
        p = sub.add_parser(name, help=doc, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
