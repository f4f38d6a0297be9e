"""`mxmoe quantize`: convert the MoE expert weights of a safetensors checkpoint to MXFP4.

Two output formats, the same bytes (`MXFP4Tensor`'s: the even element in the low nibble, E8M0
scales as uint8) under different names; every other tensor is copied byte for byte:

- ``gpt-oss`` (the default): the expert weights (by default gpt-oss's bf16
  ``*.mlp.experts.gate_up_proj [E, H, 2I]`` and ``*.mlp.experts.down_proj [E, I, H]``, stored
  transposed: the reduction dim K comes before N) become ``{name}_blocks`` uint8
  ``[..., N, K/32, 16]`` and ``{name}_scales`` uint8 ``[..., N, K/32]``, the HF gpt-oss MXFP4
  naming, with transformers' ``quant_method: mxfp4`` config.
- ``compressed-tensors``: per-expert Linear weights (by default Qwen3-MoE's and Mixtral's
  ``*.experts.{j}.{gate_proj,up_proj,down_proj,w1,w3,w2}.weight [N, K]``) become
  ``{module}.weight_packed`` uint8 ``[N, K/2]`` and ``{module}.weight_scale`` uint8
  ``[N, K/32]``, llm-compressor's scheme ``MXFP4A16`` in format ``mxfp4-pack-quantized``, with
  the ``quantization_config`` that vLLM, transformers and llm-compressor read (targets
  ``Linear``; every Linear left in float listed in ``ignore``, as llm-compressor lists them).

How it stays safe on a large model:
- streaming: the output files are written by hand (the safetensors format is an 8-byte header
  length, a JSON header, then the bytes), one tensor at a time; an expert weight is quantized
  one leading-dim slice (one expert) at a time. Peak memory is one expert's float32 copy, not a
  tensor and never a shard.
- atomic: everything is written into a temporary directory beside OUT_DIR, renamed at the end;
  a failure removes it and leaves no OUT_DIR.
- verified: each written file is re-read with the safetensors library (names, shapes, dtypes,
  and a SHA-256 of every tensor's bytes against the one computed while writing).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoints.compressed_tensors import quantization_config as ct_quantization_config
from .constants import BYTES_PER_BLOCK, MXFP4_BLOCK_SIZE
from .format import ScaleRounding, quantize_mxfp4

__all__ = ["quantize_checkpoint", "GPT_OSS_PATTERN", "CT_PATTERN", "OUTPUT_FORMATS",
           "QuantizeResult"]

#: gpt-oss's bf16 expert weights, stored [E, K, N] (transposed).
GPT_OSS_PATTERN = r".*\.mlp\.experts\.(gate_up_proj|down_proj)"
#: Per-expert Linear weights [N, K]: Qwen3-MoE's names and Mixtral's (w1 gate, w3 up, w2 down).
CT_PATTERN = r".*\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight"
#: What gpt-oss's own MXFP4 config.json leaves unconverted (transformers' Mxfp4Config).
GPT_OSS_MODULES_TO_NOT_CONVERT = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_COPY_CHUNK = 64 << 20


@dataclass
class _Tensor:
    """One tensor of an input file, from its header."""

    name: str
    dtype: str
    shape: list[int]
    begin: int  # absolute offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def alignment(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return max(1, self.nbytes // numel) if numel else 1


@dataclass
class _Entry:
    """One tensor of an output file: where its bytes come from."""

    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    alignment: int
    source: _Tensor
    kind: str  # "copy", "blocks" or "scales"
    sha256: str = ""


@dataclass
class _FilePlan:
    source: Path
    target_name: str
    metadata: dict | None
    entries: list[_Entry] = field(default_factory=list)


@dataclass
class QuantizeResult:
    out_dir: Path
    files: list[str]
    converted: list[str]  # input tensor names quantized
    copied: int  # tensors copied unchanged


def read_header(path: Path) -> tuple[list[_Tensor], dict | None]:
    """The tensors of a safetensors file (in file order) and its ``__metadata__``."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: unreadable safetensors header: {exc}") from exc
    metadata = header.pop("__metadata__", None)
    base = 8 + size
    tensors = [
        _Tensor(name, info["dtype"], list(info["shape"]), base + info["data_offsets"][0],
                base + info["data_offsets"][1])
        for name, info in header.items()
    ]
    tensors.sort(key=lambda t: t.begin)
    return tensors, metadata


def _gpt_oss_outputs(t: _Tensor, n: int, k: int):
    lead = t.shape[:-2]
    return ((f"{t.name}_blocks", [*lead, n, k // MXFP4_BLOCK_SIZE, BYTES_PER_BLOCK]),
            (f"{t.name}_scales", [*lead, n, k // MXFP4_BLOCK_SIZE]))


def _gpt_oss_config(plans: list[_FilePlan], default_pattern: bool) -> dict:
    modules = GPT_OSS_MODULES_TO_NOT_CONVERT if default_pattern else \
        _modules_to_not_convert(plans)
    return {"quant_method": "mxfp4", "modules_to_not_convert": modules}


def _ct_outputs(t: _Tensor, n: int, k: int):
    if len(t.shape) != 2 or not t.name.endswith(".weight"):
        raise ValueError(
            f"tensor {t.name!r} (shape {t.shape}) matches the expert pattern, but the "
            f"compressed-tensors format quantizes Linear weights: 2-D tensors named "
            f"'<module>.weight' (split fused or 3-D expert tensors per expert first, or "
            f"write --format gpt-oss)")
    module = t.name[:-len(".weight")]
    return ((f"{module}.weight_packed", [n, k // 2]),
            (f"{module}.weight_scale", [n, k // MXFP4_BLOCK_SIZE]))


def _ct_config(plans: list[_FilePlan], default_pattern: bool) -> dict:
    return ct_quantization_config(ignore=_float_linear_modules(plans))


@dataclass(frozen=True)
class _OutputFormat:
    """How one output format names a quantized tensor and what its config.json says."""

    name: str
    default_pattern: str
    default_transposed: bool
    #: What the default pattern's names look like, for the message when nothing matches.
    hint: str
    #: (tensor, N, K) -> ((name, shape) of the packed codes, (name, shape) of the scales).
    outputs: Callable[[_Tensor, int, int], tuple]
    #: (plans, default pattern used) -> config.json's quantization_config.
    quantization_config: Callable[[list[_FilePlan], bool], dict]


OUTPUT_FORMATS: dict[str, _OutputFormat] = {f.name: f for f in (
    _OutputFormat("gpt-oss", GPT_OSS_PATTERN, True,
                  "gpt-oss bf16 names end in .mlp.experts.gate_up_proj / .down_proj; per-expert "
                  "Linear weights (Qwen3-MoE, Mixtral) are written with --format "
                  "compressed-tensors", _gpt_oss_outputs, _gpt_oss_config),
    _OutputFormat("compressed-tensors", CT_PATTERN, False,
                  "per-expert Linear weights such as model.layers.0.mlp.experts.0.gate_proj."
                  "weight (Qwen3-MoE) or ...block_sparse_moe.experts.0.w1.weight (Mixtral)",
                  _ct_outputs, _ct_config),
)}


def _plan_file(source: Path, regex: re.Pattern, transposed: bool,
               output: _OutputFormat) -> _FilePlan:
    tensors, metadata = read_header(source)
    plan = _FilePlan(source, source.name, metadata)
    for t in tensors:
        if not regex.fullmatch(t.name):
            plan.entries.append(_Entry(t.name, t.dtype, t.shape, t.nbytes, t.alignment, t, "copy"))
            continue
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"tensor {t.name!r} matches the expert pattern but has dtype "
                             f"{t.dtype}, expected one of {list(_FLOAT_DTYPES)}")
        if len(t.shape) < 2:
            raise ValueError(f"tensor {t.name!r} has shape {t.shape}, expected [..., N, K] "
                             f"(or [..., K, N] with --transposed)")
        n, k = t.shape[-2:]
        if transposed:
            n, k = k, n
        if k % MXFP4_BLOCK_SIZE:
            layout = "[..., K, N] (transposed)" if transposed else "[..., N, K]"
            raise ValueError(f"tensor {t.name!r} has shape {t.shape} read as {layout}: K = {k} "
                             f"is not a multiple of {MXFP4_BLOCK_SIZE}")
        for kind, (name, shape) in zip(("blocks", "scales"), output.outputs(t, n, k)):
            plan.entries.append(_Entry(name, "U8", shape, math.prod(shape), 1, t, kind))
    # Largest element first keeps every tensor aligned to its element size (header is padded to 8).
    plan.entries.sort(key=lambda e: -e.alignment)
    return plan


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _modules_to_not_convert(plans: list[_FilePlan]) -> list[str]:
    """Parent modules of the copied tensors, layer indices replaced by ``*``, leaving out any
    module that contains a converted tensor (transformers matches these names as prefixes)."""

    def pattern(name: str) -> str:
        return re.sub(r"\.\d+(?=\.|$)", ".*", _module(name))

    entries = [e for plan in plans for e in plan.entries if "." in e.name]
    converted = {pattern(e.source.name) + "." for e in entries if e.kind == "blocks"}
    copied = {pattern(e.name) for e in entries if e.kind == "copy"}
    return sorted(m for m in copied if not any(c.startswith(m + ".") for c in converted))


def _float_linear_modules(plans: list[_FilePlan]) -> list[str]:
    """The modules whose 2-D float ``.weight`` is copied: the Linears left unquantized (the
    router, attention, ``lm_head``), as llm-compressor lists them in ``ignore``. Embeddings are
    not Linears and are left out (compressed-tensors only targets Linears anyway)."""
    modules = {_module(e.name) for p in plans for e in p.entries
               if e.kind == "copy" and e.name.endswith(".weight") and len(e.shape) == 2
               and e.dtype in _FLOAT_DTYPES}
    return sorted(m for m in modules if not re.search(r"(^|\.)(\w*embed\w*|wte|wpe)$", m))


class _Progress:
    """One line on stderr, rewritten in place on a terminal, one line per file otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done = max(total, 1), 0
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()

    def update(self, nbytes: int, label: str) -> None:
        self.done += nbytes
        if self.tty:
            line = f"mxmoe quantize: {self.done / self.total:6.1%} {label}"[:119]
            sys.stderr.write("\r" + line.ljust(119))
            sys.stderr.flush()

    def file_done(self, label: str) -> None:
        if self.enabled and not self.tty:
            sys.stderr.write(f"mxmoe quantize: {self.done / self.total:6.1%} wrote {label}\n")

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _write_tensor_bytes(f, t: torch.Tensor, digest) -> int:
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    f.write(data.data)
    digest.update(data.data)
    return data.nbytes


def _quantized_chunks(handle, t: _Tensor, transposed: bool, rounding: ScaleRounding):
    """Yield (blocks, scales) of ``t`` one slice of its leading dim at a time."""
    sl = handle.get_slice(t.name)
    rows = range(t.shape[0]) if len(t.shape) > 2 else [None]
    for r in rows:
        x = sl[r:r + 1] if r is not None else sl[:]
        x = x.to(torch.float32)
        if transposed:
            x = x.transpose(-1, -2)
        q = quantize_mxfp4(x, scale_rounding=rounding)
        yield q.blocks, q.scales


def _write_file(plan: _FilePlan, target: Path, transposed: bool, rounding: ScaleRounding,
                progress: _Progress) -> None:
    from safetensors import safe_open

    header: dict = {}
    if plan.metadata is not None:
        header["__metadata__"] = plan.metadata
    offset = 0
    for e in plan.entries:
        header[e.name] = {"dtype": e.dtype, "shape": e.shape,
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    pending_scales: list[torch.Tensor] = []
    with open(target, "wb") as f, open(plan.source, "rb") as src, \
            safe_open(str(plan.source), framework="pt", device="cpu") as handle:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in plan.entries:
            digest = hashlib.sha256()
            written = 0
            if e.kind == "copy":
                src.seek(e.source.begin)
                left = e.nbytes
                while left:
                    chunk = src.read(min(left, _COPY_CHUNK))
                    if not chunk:
                        raise ValueError(f"{plan.source}: tensor {e.name!r} is truncated")
                    f.write(chunk)
                    digest.update(chunk)
                    left -= len(chunk)
                    written += len(chunk)
                progress.update(e.nbytes, e.name)
            elif e.kind == "blocks":
                pending_scales = []
                chunks = e.source.shape[0] if len(e.source.shape) > 2 else 1
                for blocks, scales in _quantized_chunks(handle, e.source, transposed, rounding):
                    written += _write_tensor_bytes(f, blocks, digest)
                    pending_scales.append(scales)
                    progress.update(e.source.nbytes // max(chunks, 1), e.source.name)
            else:
                for scales in pending_scales:
                    written += _write_tensor_bytes(f, scales, digest)
                pending_scales = []
            if written != e.nbytes:
                raise RuntimeError(f"tensor {e.name!r}: wrote {written} bytes, planned {e.nbytes}")
            e.sha256 = digest.hexdigest()
        f.flush()
        os.fsync(f.fileno())


def _verify_file(plan: _FilePlan, target: Path) -> None:
    """Re-read ``target`` with safetensors: the names, shapes, dtypes and bytes written."""
    from safetensors import safe_open

    with safe_open(str(target), framework="pt", device="cpu") as handle:
        names = set(handle.keys())
        planned = {e.name for e in plan.entries}
        if names != planned:
            raise ValueError(f"verifying {target.name}: tensors {sorted(names ^ planned)} differ "
                             f"from the plan")
        for e in plan.entries:
            sl = handle.get_slice(e.name)
            if list(sl.get_shape()) != e.shape or sl.get_dtype() != e.dtype:
                raise ValueError(
                    f"verifying {target.name}: tensor {e.name!r} reads back as "
                    f"{sl.get_dtype()} {list(sl.get_shape())}, wrote {e.dtype} {e.shape}"
                )
            data = handle.get_tensor(e.name).reshape(-1).view(torch.uint8).numpy()
            if hashlib.sha256(data.data).hexdigest() != e.sha256:
                raise ValueError(f"verifying {target.name}: tensor {e.name!r} reads back with "
                                 f"different bytes (SHA-256 mismatch)")


def _check_dirs(in_dir: Path, out_dir: Path, force: bool) -> tuple[Path, Path]:
    if not in_dir.is_dir():
        raise ValueError(f"IN_DIR {in_dir} is not a directory")
    src, dst = in_dir.resolve(), out_dir.resolve()
    if dst == src or src in dst.parents:
        raise ValueError(f"refusing to write OUT_DIR {out_dir} into IN_DIR {in_dir}: choose a "
                         f"directory outside the input")
    if dst in src.parents:
        raise ValueError(f"refusing OUT_DIR {out_dir}: it contains IN_DIR {in_dir}")
    if dst.exists():
        if not dst.is_dir():
            raise ValueError(f"OUT_DIR {out_dir} exists and is not a directory")
        if any(dst.iterdir()) and not force:
            raise ValueError(f"OUT_DIR {out_dir} exists and is not empty (pass --force to "
                             f"replace it)")
    return src, dst


def _input_files(in_dir: Path) -> tuple[list[Path], dict | None]:
    index_path = in_dir / INDEX_FILE
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        names = sorted(set(index.get("weight_map", {}).values()))
        files = [in_dir / n for n in names]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{index_path} names {f.name}, which is not in {in_dir}")
        return files, index
    files = sorted(in_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {in_dir}")
    return files, None


def quantize_checkpoint(
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    pattern: str | None = None,
    transposed: bool | None = None,
    scale_rounding: ScaleRounding | str = ScaleRounding.FLOOR,
    output_format: str = "gpt-oss",
    force: bool = False,
    progress: bool = True,
) -> QuantizeResult:
    """Write a copy of the checkpoint ``in_dir`` to ``out_dir`` with its expert weights in MXFP4.

    Args:
        pattern: regular expression a tensor name must match in full to be quantized. Default:
            the output format's: gpt-oss's ``*.mlp.experts.gate_up_proj`` / ``down_proj``, or
            for compressed-tensors `CT_PATTERN` (per-expert Linear weights).
        transposed: the matched tensors are stored ``[..., K, N]`` (K, the reduction dim, before
            N), as gpt-oss's are. Default: True for the gpt-oss pattern, False otherwise.
        scale_rounding: ``"floor"`` (OCP) or ``"ceil"`` (triton_kernels), see `quantize_mxfp4`.
        output_format: ``"gpt-oss"`` (HF gpt-oss MXFP4 names) or ``"compressed-tensors"``
            (llm-compressor's MXFP4A16, ``mxfp4-pack-quantized``); see the module docstring.
        force: replace a non-empty ``out_dir``.

    Raises:
        ValueError: refusals (output inside input, non-empty output), nothing matched, a matched
            tensor that cannot be MXFP4 (naming it and its shape), an input already quantized.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    src, dst = _check_dirs(in_dir, out_dir, force)
    rounding = ScaleRounding(scale_rounding)
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {list(OUTPUT_FORMATS)}, got "
                         f"{output_format!r}")
    output = OUTPUT_FORMATS[output_format]
    default = pattern is None
    regex = re.compile(output.default_pattern if default else pattern)
    if transposed is None:
        transposed = output.default_transposed and default
    transposed = bool(transposed)

    config = None
    if (src / CONFIG_FILE).is_file():
        config = json.loads((src / CONFIG_FILE).read_text())
        if config.get("quantization_config"):
            raise ValueError(f"{in_dir / CONFIG_FILE} already has a quantization_config "
                             f"({config['quantization_config'].get('quant_method')!r}): "
                             f"expected a bf16 checkpoint")
    files, index = _input_files(src)
    plans = [_plan_file(f, regex, transposed, output) for f in files]
    converted = [e.source.name for p in plans for e in p.entries if e.kind == "blocks"]
    if not converted:
        hint = f" ({output.hint})" if default else ""
        raise ValueError(f"no tensor in {in_dir} matches the expert pattern "
                         f"{regex.pattern!r}{hint}")

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    # mkdtemp makes a private (0700) directory; the output is an ordinary one, as mkdir makes.
    os.chmod(tmp, 0o777 & ~_umask())
    bar = _Progress(sum(e.source.nbytes for p in plans for e in p.entries if e.kind != "scales"),
                    progress)
    try:
        for plan in plans:
            target = tmp / plan.target_name
            _write_file(plan, target, transposed, rounding, bar)
            _verify_file(plan, target)
            bar.file_done(plan.target_name)
        bar.close()
        if index is not None:
            weight_map = {e.name: p.target_name for p in plans for e in p.entries}
            metadata = dict(index.get("metadata") or {})
            metadata["total_size"] = sum(e.nbytes for p in plans for e in p.entries)
            new_index = {**index, "metadata": metadata,
                         "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(new_index, indent=2) + "\n")
        if config is not None:
            config["quantization_config"] = output.quantization_config(plans, default)
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        written = {p.source.name for p in plans} | {INDEX_FILE, CONFIG_FILE}
        for item in sorted(src.iterdir()):
            if item.name in written or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        _replace_dir(tmp, dst)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return QuantizeResult(dst, [p.target_name for p in plans], converted,
                          sum(e.kind == "copy" for p in plans for e in p.entries))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace_dir(tmp: Path, dst: Path) -> None:
    """Move the finished ``tmp`` to ``dst``, replacing an existing ``dst`` (checked before)."""
    if not dst.exists():
        os.rename(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    old.rmdir()
    os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
