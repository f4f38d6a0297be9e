"""The measuring instrument behind `mxmoe bench`: one whole MoE layer, timed beside its floor.

- `problems`: the shapes (gpt-oss-20b, gpt-oss-120b, custom) and random problems with rotating
  inputs and routings.
- `ceilings`: the device's copy bandwidth and bf16 matmul rate, measured at the start of a run.
- `floors`: the roofline floor of a layer from those ceilings (pure arithmetic).
- `baseline`: the plain-torch path with dequantized weights (`torch._grouped_mm`).
- `timing`: CUDA-graph replay timing with CUDA events (eager fallback), and CPU timing.
- `host`: the host cost of an eager call, its launch count, the bare cost of as many launches.
- `peers`: OpenAI's triton_kernels as a comparison path (optional; never a dependency).
- `runner`: the loop over models, M and paths; checks each path against the fp32 reference.
- `report`: the JSON file, the printed tables and the markdown of BENCHMARKS.md.
- `plot`: the PNG (needs matplotlib, the ``bench`` extra).
- `e2e`: a whole gpt-oss in transformers, bf16 experts against `use_mxmoe` (``--model-e2e``);
  `e2e_report`: its JSON layout and table.

Nothing here imports Triton at import time: the backends, `host.BareLaunch` and the peer do,
when they are first used.
"""
