"""Search kernel configs on this GPU and write the table the kernels read."""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--models", nargs="+", default=["20b", "120b"], help="20b, 120b")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="M values")
    parser.add_argument("--modes", nargs="+", default=["dequant", "scaled"],
                        choices=["dequant", "scaled"])
    parser.add_argument("--out", type=Path, default=None,
                        help="table to write (default: the package's table for this GPU)")


def run(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("mxmoe tune needs a CUDA GPU: it times kernels on the device it tunes for.")
        return 2
    from ..tune import DEFAULT_TOKENS, default_table_path, tune

    out = args.out or default_table_path()
    print(f"tuning {args.models} on {torch.cuda.get_device_name()} -> {out}")
    tune(args.models, args.tokens or list(DEFAULT_TOKENS), args.modes, out)
    return 0
