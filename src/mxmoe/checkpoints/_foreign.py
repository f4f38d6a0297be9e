"""Tensors beside an expert's weights that mark another scheme than MXFP4 weights, where the
per-expert formats (`compressed_tensors`, `quark`) name them alike: each entry is a
`PerExpertFormat.foreign` pair, written once so that both readers refuse it in the same words."""

#: An asymmetric quantization's zero point (both formats store it as ``weight_zero_point``).
ZERO_POINT = ("weight_zero_point", "a zero point: asymmetric, not MXFP4")
