"""The prefill GEMM (`mxmoe.kernels.prefill`) and its MMA_LANES layout against the reference.

Under TRITON_INTERPRET=1 on the CPU: fp16 and fp32 only (the interpreter computes bf16 wrongly;
bf16 and the PTX upcast at gpt-oss shapes are checked on the GPU by scripts/gpu_prefill.py).
The weights are the reference's, converted to MMA_LANES, so the tolerance measures kernel
arithmetic. Shapes are tiny but awkward: N and K tails, one token, prime E, k = E, experts
with no tokens, remote experts; both token paths (gathered rows, and expert-ordered rows read
through tensor descriptors).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import make_moe, random_expert_map, rel_err
from mxmoe.activations import Activation, apply_activation
from mxmoe.format import MXFP4Tensor
from mxmoe.kernels.launch import LaunchPlan, Ref
from mxmoe.kernels.prefill import ROWS_PAIR, PrefillConfig, PrefillGemm
from mxmoe.layouts import GROUP_HALVES, MMA_LANES, PLAIN
from mxmoe.testing import prefill_fused_experts
from mxmoe.reference import fused_experts_reference

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


# ---------------------------------------------------------------------------------------------
# The layout (pure torch: no interpreter needed)


def _random_weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    *lead, k = shape
    blocks = torch.randint(0, 256, (*lead, k // 2), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 256, (*lead, k // 32), dtype=torch.uint8, generator=g)
    return MXFP4Tensor(blocks, scales)


@pytest.mark.parametrize("shape", [(3, 5, 32), (2, 7, 96), (4, 160)], ids=str)
def test_mma_lanes_round_trip_is_bit_exact(shape):
    plain = _random_weight(shape, seed=len(shape))
    lanes = plain.to_layout(MMA_LANES)
    assert lanes.shape == plain.shape and lanes.layout == MMA_LANES
    back = lanes.to_layout(PLAIN)
    assert torch.equal(back.blocks, plain.blocks) and torch.equal(back.scales, plain.scales)
    via_halves = plain.to_layout(GROUP_HALVES).to_layout(MMA_LANES)
    assert torch.equal(via_halves.blocks, lanes.blocks)
    assert torch.equal(lanes.dequantize(torch.float32).nan_to_num(7.0),
                       plain.dequantize(torch.float32).nan_to_num(7.0))


def _rotl(word: int, r: int) -> int:
    return ((word << r) | (word >> (32 - r))) & 0xFFFFFFFF if r else word


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mma_lanes_puts_each_element_where_the_kernel_reads_it(seed):
    """Word t of group g (bytes 16g + 4t .. + 3, little-endian) gives operand register i as
    rotl(word, 0 / 4 / 10) & 0x81C081C0 (register 3: bits {6, 7, 15, 22, 23, 31} of rotl 6,
    bits {8, 24} of rotl 14), whose half j holds element 32g + 8i + 2t + j as a bf16 pattern of
    E2M1 * 2**-126: sign at bit 15, magnitude bits e1 e0 m at 8, 7, 6 (the kernels' decoders
    hard-code this; written out here independently of the layout's tables)."""
    k = 96
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k,), generator=gen, dtype=torch.uint8)
    plain = MXFP4Tensor((codes[0::2] | (codes[1::2] << 4)).reshape(1, k // 2),
                        torch.full((1, k // 32), 127, dtype=torch.uint8))
    lanes = plain.to_layout(MMA_LANES).blocks[0].tolist()
    mask = 0x81C081C0
    for g in range(k // 32):
        for t in range(4):
            word = int.from_bytes(bytes(lanes[16 * g + 4 * t:16 * g + 4 * t + 4]), "little")
            registers = [word & mask, _rotl(word, 4) & mask, _rotl(word, 10) & mask,
                         (_rotl(word, 6) & 0x80C080C0) | (_rotl(word, 14) & 0x01000100)]
            for i, register in enumerate(registers):
                for j in range(2):
                    half = register >> (16 * j) & 0xFFFF
                    code = ((half >> 15) << 3) | (((half >> 6) & 0x7))
                    assert half & ~0x81C0 == 0
                    assert code == int(codes[32 * g + 8 * i + 2 * t + j]), (g, t, i, j)


def test_mma_lanes_keeps_scales_k_major():
    plain = _random_weight((2, 48, 96), seed=3)
    lanes = plain.to_layout(MMA_LANES)
    assert lanes.scales.shape == plain.scales.shape
    assert lanes.scales.stride()[-2] == 1  # consecutive rows of a group are adjacent bytes
    assert torch.equal(lanes.scales, plain.scales)
    assert lanes[1].scales.stride()[-2] == 1  # one expert is still a view


# ---------------------------------------------------------------------------------------------
# The kernel, whole layer (interpreter)

#: One program walks several work items (the persistent loop), GROUP_M > 1 walks M blocks
#: together; the TMA config reads expert-ordered tokens through tensor descriptors.
CONFIGS = {
    "gathered rows": PrefillConfig(block_m=16, block_n=64, block_k=64, group_m=2, num_warps=4,
                                   num_stages=1, programs=3),
    "expert-ordered rows, TMA": PrefillConfig(block_m=16, block_n=128, block_k=64, group_m=3,
                                              num_warps=4, num_stages=1, programs=5, tma=True,
                                              gather_a=True, flatten=True),
    "16-row tiles, one scale group a step": PrefillConfig(block_m=16, block_n=16, block_k=32,
                                                          group_m=1, num_warps=4,
                                                          num_stages=1, programs=7),
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("MXMOE_POISON", "1")


def run_both(kw, config, **options):
    lanes = dict(kw, w13=kw["w13"].to_layout(MMA_LANES), w2=kw["w2"].to_layout(MMA_LANES))
    out = prefill_fused_experts(**lanes, config=config, **options)
    if "activation" in options:  # the reference takes the enum
        options = dict(options, activation=Activation(options["activation"]))
    return out, fused_experts_reference(**kw, **options)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", list(CONFIGS)[:2])
@pytest.mark.parametrize("m, h, i, e, k", [
    pytest.param(5, 96, 96, 5, 2, id="H = I = 96: K tails, N tails at 64 and 128 rows"),
    pytest.param(2, 64, 32, 7, 3, id="prime E, experts with no tokens"),
    pytest.param(1, 32, 64, 3, 3, id="one token, k = E"),
])
def test_layer_matches_reference(name, m, h, i, e, k):
    kw = make_moe(m, h, i, e, k, dtype=torch.float16, seed=m + e)
    out, ref = run_both(kw, CONFIGS[name])
    assert out.dtype == torch.float16
    assert rel_err(out, ref) < TOLERANCE[torch.float16]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("activation", ["swigluoai", "silu"])
@pytest.mark.parametrize("name", list(CONFIGS)[:2])
def test_activations_and_dtypes(name, activation, dtype):
    kw = make_moe(3, 64, 96, 3, 2, dtype=dtype, seed=3)
    out, ref = run_both(kw, CONFIGS[name], activation=activation)
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.interpreter
@pytest.mark.parametrize("on_input", [False, True], ids=["weight on output", "weight on input"])
@pytest.mark.parametrize("bias", [True, False], ids=["biases", "no biases"])
def test_router_weight_and_biases(bias, on_input):
    kw = make_moe(3, 64, 64, 3, 2, dtype=torch.float32, seed=4, bias=bias)
    out, ref = run_both(kw, CONFIGS["16-row tiles, one scale group a step"],
                        apply_router_weight_on_input=on_input)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.interpreter
@pytest.mark.parametrize("name", list(CONFIGS)[:2])
def test_expert_map_with_remote_experts(name):
    generator = torch.Generator().manual_seed(5)
    kw = make_moe(4, 64, 32, 3, 2, dtype=torch.float32, seed=5, e_global=7)
    expert_map = random_expert_map(7, 3, generator)
    out, ref = run_both(kw, CONFIGS[name], expert_map=expert_map)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.interpreter
@pytest.mark.parametrize("scale", [0, 1, 127, 192, 254], ids=lambda s: f"scale byte {s}")
def test_edge_scales_are_exact(scale):
    """One group of w2 with an edge scale byte (one code each half at the largest scales, so
    that no product overflows): the result equals the reference."""
    kw = make_moe(2, 64, 64, 2, 1, dtype=torch.float32, seed=6)
    codes = torch.arange(32, dtype=torch.uint8) % 16
    if scale >= 192:
        codes = torch.zeros(32, dtype=torch.uint8)
        codes[5], codes[20] = 1, 9  # +0.5 in the low half, -0.5 in the high half
    for expert in range(2):
        kw["w2"].scales[expert, 3, 1] = scale
        kw["w2"].blocks[expert, 3, 16:32] = codes[0::2] | (codes[1::2] << 4)
    out, ref = run_both(kw, CONFIGS["gathered rows"])
    assert torch.isfinite(ref).all()
    big = ref[:, 3].abs().max()
    rest = torch.cat([ref[:, :3], ref[:, 4:]], dim=1)
    assert float((out[:, 3] - ref[:, 3]).abs().max()) <= 1e-5 * float(big)
    assert rel_err(torch.cat([out[:, :3], out[:, 4:]], dim=1), rest) < TOLERANCE[torch.float32]


@pytest.mark.interpreter
@pytest.mark.parametrize("gemm", ["w13", "w2"])
def test_nan_scale_propagates(gemm):
    kw = make_moe(2, 64, 64, 2, 2, dtype=torch.float32, seed=7)
    kw[gemm].scales[:, 2, 0] = 255  # every expert, weight row 2, first group
    out, ref = run_both(kw, CONFIGS["expert-ordered rows, TMA"])
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(ref).any()


#: Every load of the K loop a TMA box (tokens gathered into expert order, codes, scales).
ALL_TMA = PrefillConfig(block_m=16, block_n=32, block_k=64, group_m=2, num_warps=4, num_stages=1,
                        programs=3, tma=True, gather_a=True, weights_tma=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("activation", ["swigluoai", "silu"], ids=["interleaved rows",
                                                                  "[gate | up] halves"])
@pytest.mark.parametrize("m, h, i, e, k", [
    pytest.param(5, 96, 96, 5, 2, id="H = I = 96: K tails, N tails"),
    pytest.param(2, 64, 32, 7, 3, id="prime E, experts with no tokens"),
])
def test_weights_by_tma_match_reference(m, h, i, e, k, activation):
    kw = make_moe(m, h, i, e, k, dtype=torch.float32, seed=m + e + 20)
    out, ref = run_both(kw, ALL_TMA, activation=activation)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


@pytest.mark.interpreter
def test_weights_by_tma_with_remote_experts_and_nan_scales():
    generator = torch.Generator().manual_seed(21)
    kw = make_moe(4, 64, 64, 3, 2, dtype=torch.float32, seed=21, e_global=7)
    expert_map = random_expert_map(7, 3, generator)
    out, ref = run_both(kw, ALL_TMA, expert_map=expert_map)
    assert rel_err(out, ref) < TOLERANCE[torch.float32]
    kw = make_moe(2, 64, 64, 2, 2, dtype=torch.float32, seed=22)
    kw["w2"].scales[:, 2, 1] = 255  # weight row 2 of every expert, its second group
    out, ref = run_both(kw, ALL_TMA)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(ref).any()


# ---------------------------------------------------------------------------------------------
# The launch contract of `fused_moe._Gemm.launch`: pair rows in and out


@pytest.mark.interpreter
@pytest.mark.parametrize("dense", [False, True], ids=["MXFP4", "dense weights"])
@pytest.mark.parametrize("gated", [True, False], ids=["GEMM1 gated", "GEMM2"])
def test_launch_with_pair_rows_is_one_grouped_gemm(gated, dense):
    from mxmoe.kernels._epilogues import epilogue_of
    from mxmoe.kernels.align import align
    from mxmoe.validation import check_fused_experts_args

    m, h, i, e, k = 5, 96, 96, 3, 2
    kw = make_moe(m, h, i, e, k, dtype=torch.float32, seed=8)
    call = check_fused_experts_args(
        kw["hidden_states"], kw["w13"].to_layout(MMA_LANES), kw["w2"].to_layout(MMA_LANES),
        kw["topk_weights"], kw["topk_ids"], w13_bias=kw["w13_bias"], w2_bias=kw["w2_bias"],
        activation="swigluoai", alpha=1.702, limit=7.0, expert_map=None)
    cfg = CONFIGS["gathered rows"]
    ids = kw["topk_ids"].reshape(-1).contiguous()
    aligned = align(ids, cfg.block_m, e, e, None)
    weights = kw["topk_weights"].reshape(-1).float().contiguous()
    pair_expert = ids.long()
    if gated:
        a, row_div, weight, bias, n, kk = kw["hidden_states"], k, call.w13, kw["w13_bias"], 2 * i, h
    else:
        a = torch.randn(m * k, i, generator=torch.Generator().manual_seed(9))
        row_div, weight, bias, n, kk = 1, call.w2, kw["w2_bias"], h, i
    out = torch.full((m * k, n // 2 if gated else n), float("nan"))
    dense_weight = weight.dequantize(torch.float32)
    tensors = [a, dense_weight if dense else weight.blocks, weight.scales, bias, out, weights,
               aligned.sorted_ids, aligned.expert_ids, aligned.num_tokens_post_padded]
    r = [Ref.of(index, t) for index, t in enumerate(tensors)]
    refs = SimpleNamespace(sorted_ids=r[6], expert_ids=r[7], num_tokens_post_padded=r[8],
                           block_m=cfg.block_m)
    gemm = PrefillGemm(call, refs, aligned.expert_ids.numel(), r[5], False,
                       epilogue_of(call.activation))
    step = gemm.step(r[0], row_div, r[1], r[2], None if dense else weight.layout, r[3], r[4],
                     n=n, k=kk, gated=gated, router_weight=0 if gated else 2, cfg=cfg,
                     a_rows=ROWS_PAIR, out_rows=ROWS_PAIR)
    LaunchPlan([step]).run(tensors)
    rows = a[torch.arange(m * k) // row_div]
    expected = torch.einsum("pk,pnk->pn", rows, dense_weight[pair_expert]) + bias[pair_expert]
    if gated:
        expected = apply_activation(expected, Activation.SWIGLUOAI, 1.702, 7.0)
    else:
        expected = expected * weights[:, None]
    assert rel_err(out, expected) < TOLERANCE[torch.float32]


def test_other_layouts_are_rejected():
    kw = make_moe(1, 32, 32, 2, 1)
    with pytest.raises(ValueError, match="mma_lanes"):
        prefill_fused_experts(**dict(kw, w13=kw["w13"].to_layout(GROUP_HALVES),
                                     w2=kw["w2"].to_layout(GROUP_HALVES)),
                              config=CONFIGS["gathered rows"])


def test_halves_run_the_shipped_tma_tiles_as_their_cp_async_predecessors():
    from mxmoe.kernels.prefill import PREFILL_TILES, gemm_tile

    for _, cfg in PREFILL_TILES:
        halves = gemm_tile(cfg, gated=True, interleaved=False)
        assert halves.block_m == cfg.block_m and halves.tma and halves.gather_a
        assert not halves.weights_tma and halves.block_k <= 128
        assert halves == cfg or cfg.weights_tma
        # GEMM2 and interleaved GEMM1 run the shipped tile; a caller's config runs as given.
        assert gemm_tile(cfg, gated=False, interleaved=False) == cfg
        assert gemm_tile(cfg, gated=True, interleaved=True) == cfg
    assert gemm_tile(CONFIGS["gathered rows"], True, False) == CONFIGS["gathered rows"]


@pytest.mark.parametrize("field, value", [("block_m", 8), ("block_n", 48), ("block_k", 16),
                                          ("num_stages", 0), ("programs", 0),
                                          ("per_sm", 0)])
def test_config_is_validated(field, value):
    with pytest.raises(ValueError, match=field):
        PrefillConfig(**{field: value})


def test_torch_backend_reads_mma_lanes_weights():
    import mxmoe

    kw = make_moe(2, 32, 32, 2, 1)
    lanes = dict(kw, w13=kw["w13"].to_layout(MMA_LANES), w2=kw["w2"].to_layout(MMA_LANES))
    out = mxmoe.fused_experts(**lanes, backend="torch")
    assert rel_err(out, fused_experts_reference(**kw)) < TOLERANCE[torch.float32]


# ---------------------------------------------------------------------------------------------
# On a GPU: bf16, the PTX upcast and the default (Hopper) configs, compiled


@pytest.mark.gpu
@pytest.mark.parametrize("ptx", ["1", "0"], ids=["PTX upcast", "portable upcast"])
@pytest.mark.parametrize("m", [64, 1024], ids=["64-token tiles", "128-token tiles, N tail"])
def test_bf16_layer_on_the_gpu(m, ptx, monkeypatch):
    from helpers import rms_err

    monkeypatch.setenv("MXMOE_DEQUANT_PTX", ptx)
    kw = make_moe(m, 256, 192, 8, 2, dtype=torch.bfloat16, device="cuda", seed=m)
    out, ref = run_both(kw, None)
    assert rel_err(out, ref) < 2e-2 and rms_err(out, ref) < 8e-3
