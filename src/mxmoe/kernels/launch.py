"""Launch a ``@triton.jit`` kernel by keyword at little more than the cost of its driver call.

``kernel[grid](...)`` binds every argument, computes Triton's specialization key, hashes it and
looks up the compiled kernel on each call: 16-23 us of host time per launch on the GPU machine
(Triton 3.6), against ~13 us for launching the compiled kernel directly. A decode step launches
four or five kernels, so that difference is a large share of an eager call.

`Launcher` keeps the compiled kernel of each specialization and launches it directly. Its key is
at least as fine as Triton's own: each tensor's dtype and 16-byte alignment, every other
argument's value (ints, floats, constexprs) and the launch options; so it never reuses a kernel
Triton would have compiled differently. A new key goes through ``kernel[grid]``, which finds
(or compiles) the kernel, launches it and hands it back. The key is built with C-speed
itemgetters: its cost is a few microseconds, not Triton's binder's.

Under ``TRITON_INTERPRET=1`` (or a Triton without these internals) it is ``kernel[grid](...)``.
"""

from __future__ import annotations

import operator

import torch
import triton.language as tl

from .. import settings

__all__ = ["TRITON_DTYPES", "Launcher", "LaunchPlan", "Ref", "DescriptorRef", "Step", "Workspace",
           "cdiv", "next_power_of_2"]

#: The Triton dtype a kernel's constexpr takes for each activation dtype.
TRITON_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
                 torch.float32: tl.float32}

#: Launch options that change the compiled kernel; part of the key when given.
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


class Launcher:
    """``Launcher(kernel)(grid, **arguments, num_warps=..., num_stages=...)`` launches."""

    def __init__(self, kernel):
        self.kernel = kernel
        # InterpretedFunction (the interpreter) has its own argument handling; keep it.
        self._names = tuple(getattr(kernel, "arg_names", ()))
        self._values = operator.itemgetter(*self._names) if len(self._names) > 1 else None
        self._options = operator.itemgetter(*_OPTIONS)
        # Filled on the first launch: which arguments are tensors (keyed by dtype and
        # alignment) and which are not (keyed by value: finer than Triton's key, never coarser).
        self._tensors = None
        self._scalars = None
        self._compiled: dict = {}
        self._runtime = None

    def _direct(self):
        """(driver, launch hooks) when direct launches are possible here, else False."""
        if self._runtime is None:
            runtime = _direct_runtime()
            try:
                from triton.runtime.jit import JITFunction
            except ImportError:
                JITFunction = None
            usable = (runtime and JITFunction is not None
                      and isinstance(self.kernel, JITFunction) and self._values is not None)
            self._runtime = runtime if usable else False
        return self._runtime

    def _key(self, values: tuple, options: tuple):
        if self._tensors is None:
            positions = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
            others = [i for i in range(len(values)) if i not in positions]
            self._tensors = operator.itemgetter(*positions, -1)  # -1: always a tuple
            self._scalars = operator.itemgetter(*others, -1)
        tensors = self._tensors(values)[:-1]
        # A tensor where a scalar was (or the reverse) changes the key's shape: a miss, and
        # Triton's own path decides.
        return (options, self._scalars(values),
                tuple((t.dtype, t.data_ptr() % 16 == 0) for t in tensors))

    def __call__(self, grid: tuple, **arguments):
        self.launch_and_return_compiled(grid, arguments)

    def launch_and_return_compiled(self, grid: tuple, arguments: dict):
        """Launch; return the compiled kernel when it can be launched directly (else None)."""
        runtime = None if settings.current().interpret else self._direct()
        if not runtime:
            self.kernel[grid](**arguments)
            return None
        active, hooks = runtime
        values = self._values(arguments)
        try:
            key = self._key(values, self._options(_DefaultNone(arguments)))
            compiled = self._compiled.get(key)
        except (AttributeError, TypeError):  # an unhashable or unexpected argument
            key, compiled = None, None
        if compiled is None:
            compiled = self.kernel[grid](**arguments)
            if key is not None:
                if len(self._compiled) >= _MAX_ENTRIES:
                    self._compiled.clear()
                self._compiled[key] = compiled
            return compiled
        device = active.get_current_device()
        stream = active.get_current_stream(device)
        grid = (*grid, 1, 1)
        enter, leave = hooks.launch_enter_hook, hooks.launch_exit_hook
        metadata = (compiled.launch_metadata(grid, stream, *values)
                    if getattr(enter, "calls", enter) else None)
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function,
                     compiled.packed_metadata, metadata, enter, leave, *values)
        return compiled


#: Specializations remembered per kernel (the ints in the key vary with M): past this many,
#: start over.
_MAX_ENTRIES = 1024


class _DefaultNone(dict):
    """The launch options given, None for the others (itemgetter over a dict with defaults)."""

    def __missing__(self, key):
        return None


# Host-side size arithmetic. `triton.cdiv` and `triton.next_power_of_2` are Triton functions
# that cost ~20 us a call from Python (measured with Triton 3.9 on the CPU machine): a decode
# step computes ten of them, so the launchers use these.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# --- Planned launches -------------------------------------------------------------------------
#
# A fused-experts call of a given signature (shapes, strides, dtypes, alignment, parameters)
# always launches the same kernels with the same grids, scalars and specialisations; only the
# tensors' addresses change. A `LaunchPlan` is that sequence, worked out once: each `Step` keeps
# its compiled kernel and its argument list in the kernel's order with the pointer slots marked,
# so a later call fills in the addresses (ints: Triton's launcher takes a pointer as an int
# without calling back into Python or validating it) and calls the driver. What remains per
# launch is a list copy and the driver call.


class Ref:
    """A tensor argument of a planned launch: the tensor at position ``source`` of the call's
    tensors, at ``offset`` bytes from its address, seen with ``dtype``, ``shape`` and
    ``strides`` (elements). The launch-building code reads it like a tensor's metadata
    (``.shape``, ``.dtype``, ``.stride()``, ``.dim()``, ``plane(i)``)."""

    __slots__ = ("source", "dtype", "shape", "strides", "offset", "reinterpret")

    def __init__(self, source: int, dtype: torch.dtype, shape, strides, offset: int = 0,
                 reinterpret: bool = True):
        self.source = source
        self.dtype = dtype
        self.shape = tuple(shape)
        self.strides = tuple(strides)
        self.offset = offset
        # False: the source tensor itself (no view to make when launching with tensors).
        self.reinterpret = reinterpret

    @classmethod
    def of(cls, source: int, tensor: torch.Tensor) -> "Ref":
        """The source tensor itself, with its metadata."""
        return cls(source, tensor.dtype, tensor.shape, tensor.stride(), 0, reinterpret=False)

    def viewed_as(self, dtype: torch.dtype) -> "Ref":
        """The same bytes as ``dtype`` (the last dimension unit-stride; sizes and strides of the
        other dimensions scale by the element sizes)."""
        ratio_num, ratio_den = self.dtype.itemsize, dtype.itemsize
        if self.strides[-1] != 1 or (self.shape[-1] * ratio_num) % ratio_den or any(
                (s * ratio_num) % ratio_den for s in self.strides[:-1]):
            raise ValueError(f"cannot view {self.dtype} {self.shape} {self.strides} as {dtype}")
        shape = (*self.shape[:-1], self.shape[-1] * ratio_num // ratio_den)
        strides = (*(s * ratio_num // ratio_den for s in self.strides[:-1]), 1)
        return Ref(self.source, dtype, shape, strides, self.offset)

    def plane(self, index: int) -> "Ref":
        """``tensor[index]`` of a tensor of two or more dimensions."""
        offset = self.offset + index * self.strides[0] * self.dtype.itemsize
        return Ref(self.source, self.dtype, self.shape[1:], self.strides[1:], offset)

    def stride(self, dim: int | None = None):
        return self.strides if dim is None else self.strides[dim]

    def dim(self) -> int:
        return len(self.shape)

    def materialize(self, tensors) -> torch.Tensor:
        """The tensor this names among the call's ``tensors`` (a view when it reinterprets)."""
        base = tensors[self.source]
        if not self.reinterpret:
            return base
        start = base.storage_offset() * base.element_size() + self.offset
        if start % self.dtype.itemsize:
            raise ValueError(f"offset {start} is not a multiple of {self.dtype}'s size")
        view = torch.empty(0, dtype=self.dtype, device=base.device)
        return view.set_(base.untyped_storage(), start // self.dtype.itemsize, self.shape,
                         self.strides)

    def __repr__(self) -> str:
        return (f"Ref({self.source}, {self.dtype}, {self.shape}, {self.strides}, "
                f"offset={self.offset})")


class DescriptorRef:
    """A TMA tensor descriptor argument of a planned launch: the tensor ``ref`` names, in
    ``block_shape`` boxes. The first launch builds a `triton.tools.tensor_descriptor.
    TensorDescriptor` and goes through Triton; direct launches (`LaunchPlan`) pass a
    `_PlannedDescriptor` of the call's address instead, whose CUtensorMap Triton's launcher
    fills from it on the host (the shape, strides and box are the plan's: fixed per
    signature)."""

    __slots__ = ("ref", "block_shape")

    def __init__(self, ref: Ref, block_shape):
        self.ref = ref
        self.block_shape = list(block_shape)

    def materialize(self, tensors):
        from triton.tools.tensor_descriptor import TensorDescriptor

        return TensorDescriptor.from_tensor(self.ref.materialize(tensors), self.block_shape)

    def planned(self, address: int) -> "_PlannedDescriptor":
        """The descriptor of this tensor at ``address`` (a direct launch's argument)."""
        ref = self.ref
        return _PlannedDescriptor(_Address(address, ref.dtype), list(ref.shape),
                                  list(ref.strides), self.block_shape)

    def __repr__(self) -> str:
        return f"DescriptorRef({self.ref!r}, {self.block_shape})"


class _Address:
    """A device address where Triton's launcher wants a tensor: ``data_ptr()`` and ``dtype``."""

    __slots__ = ("address", "dtype")

    def __init__(self, address: int, dtype: torch.dtype):
        self.address, self.dtype = address, dtype

    def data_ptr(self) -> int:
        return self.address


class _PlannedDescriptor:
    """What Triton 3.6's launcher reads of a host `TensorDescriptor` (``base``, ``shape``,
    ``strides``, ``block_shape``, ``padding``), without its per-call validation: the plan's
    signature fixed the shape, strides and 16-byte alignment when it was first checked."""

    __slots__ = ("base", "shape", "strides", "block_shape", "padding")

    def __init__(self, base: _Address, shape, strides, block_shape):
        self.base, self.shape, self.strides = base, shape, strides
        self.block_shape, self.padding = block_shape, "zero"


#: Byte alignment of each buffer in a workspace: more than any kernel's vector accesses want.
WORKSPACE_ALIGN = 256


class Workspace:
    """Carves the scratch buffers of a plan out of one byte tensor (one allocation a call, or
    none when the plan keeps it): `take` hands out `Ref`s into the tensor at ``source``."""

    def __init__(self, source: int):
        self.source = source
        self.nbytes = 0

    def take(self, shape, dtype: torch.dtype) -> Ref:
        shape = tuple(int(s) for s in shape)
        strides, step = [], 1
        for size in reversed(shape):
            strides.append(step)
            step *= max(size, 1)
        offset = self.nbytes
        self.nbytes += cdiv(max(step, 1) * dtype.itemsize, WORKSPACE_ALIGN) * WORKSPACE_ALIGN
        return Ref(self.source, dtype, shape, tuple(reversed(strides)), offset)


class Step:
    """One kernel launch of a plan: a `Launcher`, its grid and its arguments by name (`Ref`s
    for tensors, plain values for the rest)."""

    __slots__ = ("launcher", "grid", "arguments", "compiled")

    def __init__(self, launcher: Launcher, grid: tuple, arguments: dict):
        self.launcher = launcher
        self.grid = (*grid, 1, 1)[:3]
        self.arguments = arguments
        self.compiled = None  # set by the first launch when direct launches are possible

    def launch_with_tensors(self, tensors) -> None:
        """Launch through the `Launcher` with real tensors (compiling on first use); remember
        the compiled kernel for `LaunchPlan`'s direct launches when they are possible."""
        named = {k: v.materialize(tensors) if isinstance(v, (Ref, DescriptorRef)) else v
                 for k, v in self.arguments.items()}
        # (A TensorDescriptor is not hashable: the Launcher's key misses and Triton's own path
        # launches, returning the compiled kernel all the same.)
        compiled = self.launcher.launch_and_return_compiled(self.grid, named)
        if self.compiled is None:
            self.compiled = compiled


class LaunchPlan:
    """A fixed sequence of `Step`s run on the call's tensors (a tuple whose positions the
    `Ref`s name). The first run goes through Triton (compiling as needed); once every step has
    its compiled kernel, runs launch them directly: the tensors' addresses and the steps'
    scalars go into one list, and a C-speed itemgetter per step picks its arguments from it."""

    def __init__(self, steps: list[Step]):
        self.steps = steps
        self._direct = None  # ((source, offset) per pointer, scalars, per-step launch tuples)

    def run(self, tensors, stream: int | None = None) -> None:
        """Launch every step on ``tensors``; ``stream``: the current CUDA stream's handle when
        the caller has it at hand."""
        runtime = None if settings.current().interpret else _direct_runtime()
        if not runtime or _hooked(runtime[1]):
            for step in self.steps:
                step.launch_with_tensors(tensors)
            return
        direct = self._direct
        if direct is None:
            for step in self.steps:
                step.launch_with_tensors(tensors)
            if all(step.compiled is not None for step in self.steps):
                self._direct = self._direct_launches()
            return
        pointers, scalars, descriptors, launches = direct
        if stream is None:
            active = runtime[0]
            stream = active.get_current_stream(active.get_current_device())
        sources, pointers = pointers
        addresses = [tensors[source].data_ptr() for source in sources]
        pool = [addresses[index] + offset for index, offset in pointers]
        pool += scalars
        # Descriptors last: each from its tensor's address in the pool.
        pool += [descriptor.planned(pool[at]) for at, descriptor in descriptors]
        for run, grid_x, grid_y, grid_z, function, metadata, arguments in launches:
            run(grid_x, grid_y, grid_z, stream, function, metadata, None, None, None,
                *arguments(pool))

    def _direct_launches(self):
        """Per step, its driver launch with a C-speed argument getter over one pool of the
        call's addresses and the plan's scalars; a step that cannot launch directly (a TMA
        descriptor) keeps its place in the order and goes through Triton."""
        pointers: dict = {}  # (source, offset) -> its place in the pool
        scalars: list = []
        descriptors: list = []  # (the pointer's place in the pool, DescriptorRef)
        slots = []
        for step in self.steps:
            indices = []
            for name in step.launcher._names:
                value = step.arguments[name]
                if isinstance(value, Ref):
                    indices.append(pointers.setdefault((value.source, value.offset),
                                                       len(pointers)))
                elif isinstance(value, DescriptorRef):
                    at = pointers.setdefault((value.ref.source, value.ref.offset), len(pointers))
                    indices.append(("descriptor", len(descriptors)))
                    descriptors.append((at, value))
                else:
                    indices.append(-1 - len(scalars))
                    scalars.append(value)
            slots.append(indices)
        # The pool is [pointers..., scalars..., descriptors...]: scalar i sits at
        # len(pointers) + i, descriptor j at len(pointers) + len(scalars) + j.
        base = len(pointers)
        first_descriptor = base + len(scalars)
        launches = []
        for step, indices in zip(self.steps, slots):
            indices = [first_descriptor + i[1] if isinstance(i, tuple)
                       else i if i >= 0 else base - 1 - i for i in indices]
            compiled = step.compiled
            launches.append((compiled.run, *step.grid, compiled.function,
                             compiled.packed_metadata, _getter(indices)))
        # Each source tensor's address is read once a run; its pointers add their offsets.
        sources = sorted({source for source, _ in pointers})
        by_index = tuple((sources.index(source), offset) for source, offset in pointers)
        return (tuple(sources), by_index), scalars, tuple(descriptors), tuple(launches)


def _hooked(hooks) -> bool:
    """Whether a launch hook is installed (a profiler): then launches take Triton's path, which
    builds the launch metadata the hooks read. Triton 3.6 keeps hook chains (``.calls``) that
    are present but empty when nothing is installed."""
    enter, leave = hooks.launch_enter_hook, hooks.launch_exit_hook
    return bool(getattr(enter, "calls", enter)) or bool(getattr(leave, "calls", leave))


def _getter(indices: list[int]):
    """``pool -> tuple(pool[i] for i in indices)`` at C speed (always a tuple)."""
    if len(indices) == 1:
        index = indices[0]
        return lambda pool: (pool[index],)
    return operator.itemgetter(*indices)


_RUNTIME = None


def _direct_runtime():
    """(active driver, launch hooks) when compiled kernels can be launched directly, else
    False."""
    global _RUNTIME
    if _RUNTIME is None:
        try:
            from triton import knobs
            from triton.runtime.driver import driver

            _RUNTIME = (driver.active, knobs.runtime)
        except (ImportError, AttributeError, RuntimeError):  # RuntimeError: no GPU driver
            _RUNTIME = False
    return _RUNTIME
