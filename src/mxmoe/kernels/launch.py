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

from .. import settings

__all__ = ["Launcher"]

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
            try:
                from triton import knobs
                from triton.runtime.driver import driver
                from triton.runtime.jit import JITFunction

                usable = isinstance(self.kernel, JITFunction) and self._values is not None
                self._runtime = (driver.active, knobs.runtime) if usable else False
            except (ImportError, AttributeError):
                self._runtime = False
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
        runtime = None if settings.current().interpret else self._direct()
        if not runtime:
            return self.kernel[grid](**arguments)
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
            return
        device = active.get_current_device()
        stream = active.get_current_stream(device)
        grid = (*grid, 1, 1)
        enter, leave = hooks.launch_enter_hook, hooks.launch_exit_hook
        metadata = (compiled.launch_metadata(grid, stream, *values)
                    if getattr(enter, "calls", enter) else None)
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function,
                     compiled.packed_metadata, metadata, enter, leave, *values)


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
