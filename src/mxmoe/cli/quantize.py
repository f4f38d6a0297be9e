"""Convert a bf16 safetensors checkpoint's MoE expert weights to MXFP4.

Formats (--format): gpt-oss (default; HF gpt-oss MXFP4 names, transformers' quant_method
"mxfp4") or compressed-tensors (llm-compressor's MXFP4A16, format mxfp4-pack-quantized: per
expert Linear weight_packed + weight_scale, loadable by vLLM, transformers and llm-compressor).
Every other tensor and file is copied unchanged."""

from __future__ import annotations

import sys

#: `mxmoe.convert.OUTPUT_FORMATS`' keys, here so that --help imports no torch.
OUTPUT_FORMAT_NAMES = ("gpt-oss", "compressed-tensors")


def add_arguments(parser) -> None:
    parser.add_argument("in_dir", metavar="IN_DIR", help="bf16 safetensors checkpoint directory")
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="where to write the MXFP4 checkpoint (must not exist or be empty)")
    parser.add_argument("--format", dest="output_format", choices=list(OUTPUT_FORMAT_NAMES),
                        default="gpt-oss",
                        help="output format: gpt-oss (default) or compressed-tensors (MXFP4A16, "
                             "mxfp4-pack-quantized)")
    parser.add_argument("--pattern", default=None, metavar="REGEX",
                        help="quantize the tensors whose full name matches REGEX (default, "
                             "gpt-oss: *.mlp.experts.gate_up_proj and down_proj; "
                             "compressed-tensors: *.experts.J.{gate_proj,up_proj,down_proj,"
                             "w1,w3,w2}.weight)")
    parser.add_argument("--transposed", action="store_true", default=None,
                        help="the matched tensors are stored [..., K, N] (reduction dim first), "
                             "as gpt-oss's are; implied for gpt-oss without --pattern")
    parser.add_argument("--scale-rounding", choices=["floor", "ceil"], default="floor",
                        help="shared exponent rule: floor (OCP, default) or ceil (triton_kernels)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def run(args) -> int:
    from ..convert import quantize_checkpoint

    try:
        result = quantize_checkpoint(
            args.in_dir, args.out_dir, pattern=args.pattern, transposed=args.transposed,
            scale_rounding=args.scale_rounding, output_format=args.output_format,
            force=args.force, progress=not args.quiet,
        )
    except (ValueError, OSError) as exc:
        print(f"mxmoe quantize: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {result.out_dir}: {len(result.converted)} tensor(s) quantized to MXFP4 "
          f"({args.output_format} format), "
          f"{result.copied} copied, {len(result.files)} file(s)")
    return 0
