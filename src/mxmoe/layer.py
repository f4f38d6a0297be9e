"""`MXFP4MoE`: a drop-in MoE block (router + MXFP4 experts) as a torch.nn.Module; `GatedMLP`
and `MXFP4GatedMLP`, the shared-experts MLP some families (DeepSeek-V3) add to it."""

from __future__ import annotations

import operator
import weakref

import torch
from torch import nn

from .activations import Activation
from .constants import GPT_OSS_SWIGLU_ALPHA, GPT_OSS_SWIGLU_LIMIT
from .format import MXFP4Tensor, ScaleRounding, quantize_mxfp4
from .layouts import Layout, get_layout
from .api import fused_experts
from .ops import fused_experts_op
from .problem import OP_ARG_NAMES
from . import settings
from .plans import plan_of, tensor_key, weight_key
from .router import eager_route_plan, route, route_grouped_sigmoid
from .routing import GroupedSigmoidRouting
from .validation import (check_correction_bias, check_expert_weights, check_grouped_routing,
                         check_layer_args, check_layer_input)

__all__ = ["MXFP4MoE", "MXFP4GatedMLP", "GatedMLP"]


class _MXFP4Weights(nn.Module):
    """What every module holding MXFP4 expert weights shares: the four weight buffers in one
    layout (``weight_layout``), their `MXFP4Tensor` views, the backend (whose setter converts
    the weights to a layout it reads) and the fused experts call. Subclasses set
    ``activation``, ``alpha``, ``limit``, and the ``w13_bias``/``w2_bias``/``expert_map``
    buffers (None where absent)."""

    def _hold_weights(self, w13: MXFP4Tensor, w2: MXFP4Tensor, layout) -> None:
        if layout == "auto":
            from .backends import fastest_layout

            layout = fastest_layout(w13.blocks.device, self.backend)
        if layout is not None:
            w13, w2 = w13.to_layout(layout), w2.to_layout(layout)
        if w13.layout != w2.layout:
            w2 = w2.to_layout(w13.layout)
        self.weight_layout: Layout = w13.layout
        self._weights: tuple | None = None
        self.register_buffer("w13_blocks", w13.blocks)
        self.register_buffer("w13_scales", w13.scales)
        self.register_buffer("w2_blocks", w2.blocks)
        self.register_buffer("w2_scales", w2.scales)

    @property
    def backend(self) -> str:
        """The backend name of every forward. Setting one that cannot read the weights'
        layout (tl.dot_scaled reads only the plain one) converts them, once, to its first."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = name
        for follower in self._followers():
            follower.backend = name
        if "w13_blocks" not in self._buffers or name == "auto":
            return
        from .backends import get_backend

        try:
            readable = get_backend(name).layouts
        except ValueError:  # an unknown name: the forward says so
            return
        if self.weight_layout.name not in readable:
            self.to_layout(readable[0])

    def _followers(self) -> list["_MXFP4Weights"]:
        """Submodules whose MXFP4 weights keep this module's backend and layout."""
        return []

    def _weight_objects(self) -> tuple[MXFP4Tensor, MXFP4Tensor]:
        """(w13, w2) as `MXFP4Tensor`, built once and again only when a buffer was replaced
        (``.to()``, `to_layout`, ``load_state_dict`` of new tensors): not per forward."""
        buffers = (self.w13_blocks, self.w13_scales, self.w2_blocks, self.w2_scales)
        layout = self.weight_layout
        if torch.compiler.is_compiling():
            # Traced once into the graph: a cache here would only add guards and recompiles.
            return (MXFP4Tensor(buffers[0], buffers[1], layout),
                    MXFP4Tensor(buffers[2], buffers[3], layout))
        cached = self._weights
        if cached is None or any(a is not b for a, b in zip(cached[0], buffers)):
            cached = self._weights = (buffers, MXFP4Tensor(buffers[0], buffers[1], layout),
                                      MXFP4Tensor(buffers[2], buffers[3], layout))
        return cached[1], cached[2]

    @property
    def w13(self) -> MXFP4Tensor:
        return self._weight_objects()[0]

    @property
    def w2(self) -> MXFP4Tensor:
        return self._weight_objects()[1]

    def to_layout(self, layout: Layout | str):
        """Convert the expert weights to ``layout`` in place (once; bit-exact); returns self.
        ``"auto"``: `mxmoe.backends.fastest_layout` for the weights' device and the backend."""
        if layout == "auto":
            from .backends import fastest_layout

            layout = fastest_layout(self.w13_blocks.device, self.backend)
        layout = get_layout(layout)
        if layout != self.weight_layout:
            w13, w2 = self.w13.to_layout(layout), self.w2.to_layout(layout)
            self.w13_blocks, self.w13_scales = w13.blocks, w13.scales
            self.w2_blocks, self.w2_scales = w2.blocks, w2.scales
            self.weight_layout = layout
            self._weights = None
        for follower in self._followers():
            follower.to_layout(layout)
        return self

    def _experts(self, x, topk_weights, topk_ids):
        if torch.compiler.is_compiling():
            # Traced: to the operator with the weights as their buffers. (A weight object made
            # inside the graph holds a layout object that some dynamo versions cannot wrap.)
            layout = self.weight_layout.name
            named = dict(
                hidden_states=x, topk_weights=topk_weights, topk_ids=topk_ids,
                w13_blocks=self.w13_blocks, w13_scales=self.w13_scales,
                w2_blocks=self.w2_blocks, w2_scales=self.w2_scales, w13_bias=self.w13_bias,
                w2_bias=self.w2_bias, expert_map=self.expert_map, w13_layout=layout,
                w2_layout=layout, activation=self.activation.value, alpha=float(self.alpha),
                limit=float(self.limit), apply_router_weight_on_input=False,
                backend=self.backend,
            )
            return fused_experts_op(*(named[name] for name in OP_ARG_NAMES))
        w13, w2 = self._weight_objects()
        return fused_experts(
            x, w13, w2, topk_weights, topk_ids, w13_bias=self.w13_bias, w2_bias=self.w2_bias,
            activation=self.activation, alpha=self.alpha, limit=self.limit,
            expert_map=self.expert_map, backend=self.backend,
        )


class GatedMLP(nn.Module):
    """A dense silu gated MLP of float Linears (``gate_proj``, ``up_proj`` ``[I, H]``,
    ``down_proj`` ``[H, I]``, no biases): ``down(silu(gate(x)) * up(x))``, as DeepSeek-V3's
    shared experts when a checkpoint leaves them unquantized. The input is cast to the weights'
    dtype and the output back to the input's."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        for name, w in (("gate", gate), ("up", up), ("down", down)):
            if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
                raise TypeError(f"{name} must be a floating 2D tensor, got "
                                f"{getattr(w, 'dtype', type(w).__name__)}")
        inter, hidden = gate.shape
        for name, w, shape in (("up", up, (inter, hidden)), ("down", down, (hidden, inter))):
            if tuple(w.shape) != shape:
                raise ValueError(f"{name} must be {list(shape)} like gate [I, H] = "
                                 f"{[inter, hidden]}, got {list(w.shape)}")
        self.gate_proj, self.up_proj, self.down_proj = (
            self._linear(w) for w in (gate, up, down))

    @staticmethod
    def _linear(w: torch.Tensor) -> nn.Linear:
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            linear.weight.copy_(w)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.gate_proj.weight.dtype)
        out = self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))
        return out.to(x.dtype)


class MXFP4GatedMLP(_MXFP4Weights):
    """A dense gated MLP on MXFP4 weights, ``w13 [1, 2I, H]`` (rows ``[gate | up]`` for
    ``"silu"``) and ``w2 [1, H, I]``: DeepSeek-V3's shared experts when a checkpoint quantizes
    them (llm-compressor's MXFP4A16 does: they are Linears).

    It runs as a MoE of one expert that every token picks with weight 1, through the same
    fused experts call (`mxmoe.fused_experts`, any backend) as the routed experts. Why not
    dequantize at load: the file's bytes stay the weights (never requantized, 26.6% of bf16's
    memory: some 5 GB less over DeepSeek-V3's 58 MoE layers), one code path computes every
    MXFP4 product, and the result equals the dequantized MLP up to fp32 summation order (the
    weight 1 multiplies exactly). Held in the layout of the layer that owns it, which sets its
    backend and layout (`MXFP4MoE`).
    """

    def __init__(self, w13: MXFP4Tensor, w2: MXFP4Tensor, *,
                 activation: Activation | str = Activation.SILU, backend: str = "auto",
                 layout: Layout | str | None = None):
        super().__init__()
        shapes = check_expert_weights(w13, w2, None, None)
        if shapes.num_experts != 1:
            raise ValueError(f"w13 and w2 of a gated MLP must hold one expert ([1, 2I, H], "
                             f"[1, H, I]), got w13 {list(w13.shape)}")
        self.hidden_size = shapes.hidden
        self.intermediate_size = shapes.intermediate
        self.activation = Activation.parse(activation)
        self.alpha, self.limit = GPT_OSS_SWIGLU_ALPHA, GPT_OSS_SWIGLU_LIMIT
        self.backend = backend
        self._hold_weights(w13, w2, layout)
        self.w13_bias = self.w2_bias = self.expert_map = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        flat = x.reshape(-1, self.hidden_size)
        tokens = flat.shape[0]
        ids = torch.zeros(tokens, 1, dtype=torch.int32, device=flat.device)
        weights = torch.ones(tokens, 1, dtype=torch.float32, device=flat.device)
        return self._experts(flat, weights, ids).reshape(*leading, self.hidden_size)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"activation={self.activation.value}, backend={self.backend!r}, "
                f"layout={self.weight_layout.name}")


class MXFP4MoE(_MXFP4Weights):
    """Router (a Linear with bias, as gpt-oss) and MXFP4 experts.

    ``forward(x [..., H]) -> [..., H]``: routes each token to ``top_k`` experts and returns the
    routing-weighted sum of their outputs. No norm and no residual: gpt-oss's block is
    ``x + moe(norm(x))``, and those belong to the caller.

    The expert weights are buffers (``w13_blocks``, ``w13_scales``, ``w2_blocks``,
    ``w2_scales``): they move with ``.to()`` and appear in ``state_dict``; ``.w13`` and ``.w2``
    view them as `MXFP4Tensor`. They are held in one weight layout (`mxmoe.layouts`; the given
    weights' own unless ``layout`` names another, converted once here or by `to_layout`;
    ``"auto"``: `mxmoe.backends.fastest_layout` for the weights' device and the backend, e.g.
    MMA_LANES on Hopper, which the prefill GEMMs need); the buffers hold that layout's bytes,
    so a ``state_dict`` loads back into a layer of the same layout (``layer.weight_layout``;
    checkpoint writers take ``layer.w13.plain()``).

    DeepSeek-V3's MoE is the same layer with two options: ``routing`` (a
    `GroupedSigmoidRouting`, with ``router_correction_bias [E]``: the router is
    `mxmoe.router.route_grouped_sigmoid` instead of the softmax top-k) and ``shared_experts``
    (any module ``[..., H] -> [..., H]``, e.g. `GatedMLP` or `MXFP4GatedMLP`), whose output is
    added to every token's routed one, after the partial outputs of the ranks are summed (every
    rank holds all of it). An `MXFP4GatedMLP` there keeps the layer's backend and layout.
    """

    def __init__(
        self,
        w13: MXFP4Tensor,
        w2: MXFP4Tensor,
        router_weight: torch.Tensor,
        router_bias: torch.Tensor | None = None,
        w13_bias: torch.Tensor | None = None,
        w2_bias: torch.Tensor | None = None,
        *,
        top_k: int,
        activation: Activation | str = Activation.SWIGLUOAI,
        alpha: float = GPT_OSS_SWIGLU_ALPHA,
        limit: float = GPT_OSS_SWIGLU_LIMIT,
        renormalize: bool = True,
        backend: str = "auto",
        expert_map: torch.Tensor | None = None,
        ep_group=None,
        tp_group=None,
        layout: Layout | str | None = None,
        routing: GroupedSigmoidRouting | None = None,
        router_correction_bias: torch.Tensor | None = None,
        shared_experts: nn.Module | None = None,
    ):
        super().__init__()
        check_layer_args(
            w13, w2, router_weight, router_bias, w13_bias, w2_bias, top_k=top_k,
            activation=activation, alpha=alpha, limit=limit, renormalize=renormalize,
            backend=backend, expert_map=expert_map,
        )
        num_experts, two_i, hidden = w13.shape
        num_global = router_weight.shape[0]
        if routing is not None:
            check_grouped_routing(routing, num_global, top_k)
            if router_correction_bias is None:
                raise ValueError("routing (grouped sigmoid) needs router_correction_bias [E] "
                                 "(DeepSeek-V3's e_score_correction_bias; zeros for none)")
            check_correction_bias(router_correction_bias, num_global, w13.blocks.device)
        elif router_correction_bias is not None:
            raise ValueError("router_correction_bias is DeepSeek-V3's grouped sigmoid router's: "
                             "pass routing=GroupedSigmoidRouting(...) with it")
        if shared_experts is not None and not isinstance(shared_experts, nn.Module):
            raise TypeError(f"shared_experts must be a torch.nn.Module or None, got "
                            f"{type(shared_experts).__name__}")
        self.hidden_size = hidden
        self.intermediate_size = two_i // 2
        self.num_experts = num_global
        self.top_k = top_k
        self.activation = Activation.parse(activation)
        self.alpha = float(alpha)
        self.limit = float(limit)
        self.renormalize = renormalize
        self.backend = backend

        self.router = nn.Linear(hidden, num_global, bias=router_bias is not None,
                                dtype=router_weight.dtype, device=router_weight.device)
        with torch.no_grad():
            self.router.weight.copy_(router_weight)
            if router_bias is not None:
                self.router.bias.copy_(router_bias)
        self._hold_weights(w13, w2, layout)
        self.register_buffer("w13_bias", w13_bias)
        self.register_buffer("w2_bias", w2_bias)
        self.register_buffer("expert_map", expert_map)
        # Process groups whose ranks hold other experts (ep) or other slices of I (tp): the
        # partial outputs are summed over each. The weights given are already the local ones.
        if ep_group is not None or tp_group is not None:
            from .distributed import check_local_layer

            check_local_layer(num_global, expert_map, w2_bias, ep_group, tp_group)
        self.ep_group = ep_group
        self.tp_group = tp_group
        self.routing = routing
        self.register_buffer("router_correction_bias", router_correction_bias)
        self.shared_experts = shared_experts
        if isinstance(shared_experts, MXFP4GatedMLP):
            if shared_experts.hidden_size != hidden:
                raise ValueError(f"shared_experts has hidden size {shared_experts.hidden_size}, "
                                 f"the experts {hidden}")
            shared_experts.backend = self.backend
            shared_experts.to_layout(self.weight_layout)
        del num_experts

    def _followers(self) -> list[_MXFP4Weights]:
        shared = self._modules.get("shared_experts")
        return [shared] if isinstance(shared, MXFP4GatedMLP) else []

    @classmethod
    def from_dense(
        cls,
        router_weight: torch.Tensor,
        router_bias: torch.Tensor | None,
        w13: torch.Tensor,
        w2: torch.Tensor,
        w13_bias: torch.Tensor | None = None,
        w2_bias: torch.Tensor | None = None,
        *,
        scale_rounding: ScaleRounding | str = ScaleRounding.FLOOR,
        **options,
    ) -> "MXFP4MoE":
        """Quantize dense expert weights ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` to MXFP4
        (``scale_rounding``: see `quantize_mxfp4`); ``options`` are the constructor's keywords
        (``top_k`` required; activation, alpha, limit, renormalize, backend, ...)."""
        return cls(
            quantize_mxfp4(w13, scale_rounding=scale_rounding),
            quantize_mxfp4(w2, scale_rounding=scale_rounding),
            router_weight,
            router_bias,
            w13_bias,
            w2_bias,
            **options,
        )

    def shard(self, ep_group=None, tp_group=None) -> "MXFP4MoE":
        """This rank's part of a whole layer, for expert (``ep_group``) and/or tensor
        (``tp_group``) parallelism; see docs/parallelism.md.

        The new layer holds copies of only this rank's experts (``expert_range``) and, of
        each, its slice of I (``intermediate_range``), the w2 bias on tp rank 0 only, the
        router replicated (with its routing and correction bias), the shared experts (the same
        module, whole on every rank), and the groups. Its forward returns the whole output on every rank:
        every rank of both groups must call it with the same tokens. ``self`` is left intact
        and may be freed. With both groups None it returns ``self`` itself; a group of one rank
        gives an equal layer that still runs the (no-op) all-reduce.

        Raises ValueError, on every rank before any collective, when the layer is already a
        shard, the tp group is larger than the number of 32-blocks in I, or the groups are
        not orthogonal (e.g. the same group passed for both).
        """
        if ep_group is None and tp_group is None:
            return self
        from .distributed import ParallelLayout, shard_experts

        if self.expert_map is not None or self.ep_group is not None or self.tp_group is not None:
            raise ValueError(
                "shard() needs a whole layer, but this one already holds a part (it has an "
                "expert_map or process groups)"
            )
        layout = ParallelLayout.from_groups(ep_group, tp_group)
        part = shard_experts(self.w13, self.w2, self.w13_bias, self.w2_bias,
                             activation=self.activation, layout=layout)
        router_bias = self.router.bias.detach() if self.router.bias is not None else None
        return type(self)(
            part.w13,
            part.w2,
            self.router.weight.detach(),
            router_bias,
            part.w13_bias,
            part.w2_bias,
            top_k=self.top_k,
            activation=self.activation,
            alpha=self.alpha,
            limit=self.limit,
            renormalize=self.renormalize,
            backend=self.backend,
            expert_map=part.expert_map,
            ep_group=ep_group,
            tp_group=tp_group,
            layout=self.weight_layout,
            routing=self.routing,
            router_correction_bias=self.router_correction_bias,
            shared_experts=self.shared_experts,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.forward_with_routing(hidden_states)[0]

    def forward_with_routing(
        self, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(output [..., H], router_logits [M, E], topk_weights [M, k])``, M tokens in all:
        `forward` and the routing, for wrappers whose callers expect it back."""
        planned = self._planned_forward(hidden_states)
        if planned is not None:
            return planned(self, hidden_states)
        check_layer_input(hidden_states, self.hidden_size, self.w13_blocks.device)
        leading = hidden_states.shape[:-1]
        x = hidden_states.reshape(-1, self.hidden_size)
        logits = self.router(x.to(self.router.weight.dtype))
        if self.routing is None:
            topk_weights, topk_ids = route(logits, self.top_k, renormalize=self.renormalize)
        else:
            topk_weights, topk_ids = route_grouped_sigmoid(
                logits, self.router_correction_bias, self.top_k, self.routing,
                renormalize=self.renormalize)
        if self.w13_blocks.shape[0] == 0:
            # This rank holds no experts (an expert-parallel group larger than E).
            out = torch.zeros_like(x)
        else:
            out = self._experts(x, topk_weights, topk_ids)
        out = self._sum_partial_outputs(out)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(*leading, self.hidden_size), logits, topk_weights

    def _planned_forward(self, hidden_states) -> "_PlannedForward | None":
        """The eager forward of ``hidden_states``' signature, or None where the general path
        runs: gradients on, traced, a tensor subclass or an active dispatch mode (those go
        through the operator), DeepSeek-V3's grouped router, a router module without a weight
        Parameter."""
        if (torch.is_grad_enabled() or type(hidden_states) is not torch.Tensor
                or self.routing is not None or torch.compiler.is_compiling()
                or "weight" not in self._modules["router"]._parameters
                or hidden_states.is_meta
                or torch.utils._python_dispatch._get_current_dispatch_mode() is not None):
            return None
        planned = _EAGER_PLANS.get(self)
        if planned is None:
            planned = _EAGER_PLANS[self] = {}
        key = (tensor_key(hidden_states), settings.generation())
        plan = planned.get(key)
        if plan is None or not plan.holds(self):
            if len(planned) >= _EAGER_PLANS_PER_LAYER:
                planned.clear()
            plan = planned[key] = _PlannedForward(self, hidden_states)
        return plan

    def __setattr__(self, name, value) -> None:
        if name != "_weights":  # (the weight views' cache, refilled from the same buffers)
            _EAGER_PLANS.pop(self, None)  # an attribute a plan read may have changed
        super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):
        _EAGER_PLANS.pop(self, None)  # .to(), .cuda(), .half(): buffers replaced in place
        return super()._apply(fn, *args, **kwargs)

    def _sum_partial_outputs(self, out: torch.Tensor) -> torch.Tensor:
        groups = [g for g in (self.tp_group, self.ep_group) if g is not None]
        if not groups:
            return out
        import torch.distributed as dist

        for i, group in enumerate(groups):
            if group in groups[:i]:
                continue
            dist.all_reduce(out, group=group)
        return out

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
            f"experts={self.num_experts}, top_k={self.top_k}, activation={self.activation.value}, "
            f"backend={self.backend!r}, layout={self.weight_layout.name}"
            + ("" if self.routing is None else
               f", routing=grouped sigmoid ({self.routing.n_group} groups, "
               f"{self.routing.topk_group} kept, x{self.routing.scaling_factor:g})")
        )

    @classmethod
    def from_pretrained(
        cls,
        path,
        layer: int,
        *,
        top_k: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        backend: str = "auto",
        ep_group=None,
        tp_group=None,
        format: str | None = None,
        activation: Activation | str | None = None,
        layout: Layout | str | None = "auto",
    ) -> "MXFP4MoE":
        """Read layer ``layer``'s MoE from an MXFP4 safetensors checkpoint of any format mxmoe
        knows, detected from config.json and the tensor names (`mxmoe.checkpoints`): gpt-oss
        (HF or OpenAI names; swigluoai, router with bias), compressed-tensors
        ``mxfp4-pack-quantized`` (llm-compressor MXFP4A16) or AMD Quark (``mxfp4_weight_only``)
        of Qwen3-MoE, Mixtral or DeepSeek-V3 (silu with ``[gate | up]`` halves, router without
        bias, renormalised as config.json says; DeepSeek-V3's grouped sigmoid router, kept in
        float32 with its correction bias, and its shared experts: `mxmoe.checkpoints.families`).
        The packed bytes are the file's, never requantized;
        only this layer's tensors (and with ``ep_group``/``tp_group`` only this rank's part) are
        read.

        Args:
            path: a checkpoint directory (``model.safetensors`` or sharded through
                ``model.safetensors.index.json``) or one ``.safetensors`` file, with
                ``config.json`` beside it (top_k, family, swiglu limit, quantization_config).
            top_k: experts per token; required when config.json does not give it.
            device: where the weights go; MXFP4 bytes are moved as uint8, never widened.
            dtype: of the router and the biases.
            backend: the layer's backend (see `mxmoe.backends`).
            ep_group / tp_group: read only this rank's experts / slice of I (see
                `mxmoe.distributed`); the partial outputs are summed over the groups.
            format: ``"gpt-oss"``, ``"compressed-tensors"`` or ``"quark"`` to insist on one;
                None detects.
            activation: the layout of the w13 rows when the format's own is not meant: a
                gpt-oss-named checkpoint of a silu model (``mxmoe quantize --pattern``) is
                ``"silu"``. None: the format's (gpt-oss ``"swigluoai"``, interleaved rows).
            layout: the weight layout the layer holds (`mxmoe.layouts`): ``"auto"`` the one
                its kernels read fastest on ``device`` (`fastest_layout`), None the file's
                (plain), or a name.

        Raises:
            ValueError: an unsupported format, family or scheme (NVFP4, MXFP4 activations), a
                dense layer (Qwen3-MoE's or DeepSeek-V3's), a missing tensor, a shape or dtype
                that does not fit (naming the tensor and both shapes), no top_k, a group larger
                than the layer can be split over, or a CUDA device this torch cannot use.
        """
        from .checkpoints import read_pretrained

        moe = read_pretrained(path, layer, format=format, activation=activation, top_k=top_k,
                              device=device, dtype=dtype, ep_group=ep_group, tp_group=tp_group)
        return cls(**moe.layer_arguments(), backend=backend, ep_group=ep_group,
                   tp_group=tp_group, layout=layout)

    @classmethod
    def from_gpt_oss(cls, path, layer: int, *,
                     activation: Activation | str = Activation.SWIGLUOAI,
                     **options) -> "MXFP4MoE":
        """`from_pretrained` restricted to gpt-oss's format (HF transformers or original OpenAI
        names, detected): ``options`` are its keywords (top_k, device, dtype, backend, ep_group,
        tp_group); ``activation`` is the layout of the w13 rows (gpt-oss: ``"swigluoai"``,
        interleaved). A checkpoint of another format is refused, naming what was looked for.
        """
        return cls.from_pretrained(path, layer, format="gpt-oss", activation=activation,
                                   **options)


#: The eager forwards of each `MXFP4MoE` by input signature (weakly keyed: a layer's plans go
#: with it, and copying or pickling a layer copies none). A caller cycling through more shapes
#: than this starts over.
_EAGER_PLANS: "weakref.WeakKeyDictionary[MXFP4MoE, dict]" = weakref.WeakKeyDictionary()
_EAGER_PLANS_PER_LAYER = 64


class _PlannedForward:
    """`MXFP4MoE`'s eager forward for one input signature, gradients off: the input checked,
    the router's and the experts' plans looked up once (`mxmoe.router.eager_route_plan`,
    `mxmoe.plans.plan_of`), so that a call is the router Linear and the planned launches.

    Computes what the general path of `MXFP4MoE.forward_with_routing` computes, in the same
    operations. It holds the tensors it was planned with and serves a call only while the layer
    still holds the same ones (`holds`); assigning any attribute of the layer drops its plans
    (`MXFP4MoE.__setattr__`, `_apply`)."""

    __slots__ = ("hidden", "router_dtype", "router_dtype_full", "route", "experts", "w13", "w2",
                 "tensors", "router_weight", "router_bias", "folds")

    def __init__(self, layer: MXFP4MoE, hidden_states: torch.Tensor):
        check_layer_input(hidden_states, layer.hidden_size, layer.w13_blocks.device)
        self.hidden = layer.hidden_size
        x = hidden_states.reshape(-1, self.hidden)
        # The router's own Parameters (None where it has no bias), as `holds` reads them.
        parameters = layer._modules["router"]._parameters
        self.router_weight, self.router_bias = parameters["weight"], parameters.get("bias")
        router_dtype = self.router_dtype_full = self.router_weight.dtype
        self.router_dtype = None if x.dtype == router_dtype else router_dtype
        self.w13, self.w2 = layer._weight_objects()
        self.tensors = tuple(layer._buffers[name] for name in _PLANNED_BUFFERS)
        # The scales' fold fact picks the prefill kernel and can change with the data in place
        # (a load_state_dict): checked on every call (`plans.weight_key`).
        self.folds = (weight_key(self.w13), weight_key(self.w2))
        # Planned on the first call, from its own logits and routing: the router module runs
        # once a forward (hooks on it, such as transformers' router-logits recorder, see it
        # once).
        self.route = None
        self.experts = _UNPLANNED if layer.w13_blocks.shape[0] else None

    def holds(self, layer: MXFP4MoE) -> bool:
        """Whether ``layer`` still holds the tensors (and scale facts) this was planned with."""
        buffers = layer._buffers
        parameters = layer._modules["router"]._parameters
        return (all(map(operator.is_, map(buffers.get, _PLANNED_BUFFERS), self.tensors))
                and parameters.get("weight") is self.router_weight
                and parameters.get("bias") is self.router_bias
                # (``layer.router.double()`` converts the Parameter in place.)
                and self.router_weight.dtype == self.router_dtype_full
                and (weight_key(self.w13), weight_key(self.w2)) == self.folds)

    def __call__(self, layer: MXFP4MoE, hidden_states: torch.Tensor):
        leading = hidden_states.shape[:-1]
        x = hidden_states.reshape(-1, self.hidden)
        logits = layer.router(x if self.router_dtype is None else x.to(self.router_dtype))
        if self.route is None:
            self.route = eager_route_plan(logits, layer.top_k, layer.renormalize)
        topk_weights, topk_ids = self.route(logits)
        if self.experts is _UNPLANNED:
            self.experts = plan_of(
                x, self.w13, self.w2, topk_weights, topk_ids, layer.w13_bias, layer.w2_bias,
                layer.activation, layer.alpha, layer.limit, layer.expert_map, False,
                layer.backend)
        if self.experts is None:
            # This rank holds no experts (an expert-parallel group larger than E).
            out = torch.zeros_like(x)
        else:
            tensors = self.tensors
            out = self.experts(x, self.w13, self.w2, topk_weights, topk_ids, tensors[4],
                               tensors[5], tensors[6])
        out = layer._sum_partial_outputs(out)
        if layer.shared_experts is not None:
            out = out + layer.shared_experts(x)
        return out.reshape(*leading, self.hidden), logits, topk_weights


_UNPLANNED = object()  # the experts' plan before the first call

#: The buffers a planned forward reads, in this order (the experts' biases and map at 4-6).
_PLANNED_BUFFERS = ("w13_blocks", "w13_scales", "w2_blocks", "w2_scales", "w13_bias", "w2_bias",
                    "expert_map")
