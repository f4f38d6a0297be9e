"""Launch a ``@triton.jit`` kernel by keyword at little more than the cost of its driver call.

``kernel[grid](...)`` binds every argument, computes Triton's specialization key, hashes it and
looks up the compiled kernel on each call: 16-23 us of host time per launch on the GPU machine
(Triton 3.6), against ~13 us for launching the compiled kernel directly. A decode step launches
four or five kernels, so that difference is a large share of an eager call.

`Launcher` keeps the compiled kernel of each specialization and launches it directly. Its key is
at least as fine as Triton's own: each tensor's dtype and 16-byte alignment, each int's
``== 1`` / ``% 16 == 0`` / 32-bit range, the constexpr values and the launch options; so it
never reuses a kernel Triton would have compiled differently (it may compile one more than
needed, never one fewer). The first call of a specialization goes through ``kernel[grid]``,
which compiles and launches and hands back the compiled kernel.

Under ``TRITON_INTERPRET=1`` (or a Triton without these internals) it is ``kernel[grid](...)``.
"""

from __future__ import annotations

import torch

from .. import settings

__all__ = ["Launcher"]

#: Launch options that change the compiled kernel; part of the key when given.
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _tensor_key(t):
    return (t.dtype, t.data_ptr() % 16 == 0)


def _int_key(x):
    return ("i", x == 1, x % 16 == 0, -(2**31) <= x < 2**31)


_KEYS = {
    torch.Tensor: _tensor_key,
    torch.nn.Parameter: _tensor_key,
    bool: lambda x: ("b", x),
    int: _int_key,
    float: lambda x: "f",
    type(None): lambda x: None,
}


class Launcher:
    """``Launcher(kernel)(grid, **arguments, num_warps=..., num_stages=...)`` launches."""

    def __init__(self, kernel):
        self.kernel = kernel
        # InterpretedFunction (the interpreter) has its own argument handling; keep it.
        self._names = tuple(getattr(kernel, "arg_names", ()))
        self._constexpr = tuple(i in set(getattr(kernel, "constexprs", ())) for i in
                                range(len(self._names)))
        self._compiled: dict = {}
        self._runtime = None

    def _direct(self):
        """(driver, launch hooks) when direct launches are possible here, else None."""
        if self._runtime is None:
            try:
                from triton import knobs
                from triton.runtime.driver import driver
                from triton.runtime.jit import JITFunction

                usable = isinstance(self.kernel, JITFunction)
                self._runtime = (driver.active, knobs.runtime) if usable else False
            except (ImportError, AttributeError):
                self._runtime = False
        return self._runtime

    def __call__(self, grid: tuple, **arguments):
        runtime = None if settings.current().interpret else self._direct()
        if not runtime:
            return self.kernel[grid](**arguments)
        active, hooks = runtime
        values = [arguments[name] for name in self._names]
        key = [active.get_current_device(), *(arguments.get(o) for o in _OPTIONS)]
        for value, constexpr in zip(values, self._constexpr):
            key.append(value if constexpr else _KEYS.get(type(value), _other_key)(value))
        key = tuple(key)
        compiled = self._compiled.get(key)
        if compiled is None:
            self._compiled[key] = self.kernel[grid](**arguments)
            return
        device = key[0]
        stream = active.get_current_stream(device)
        grid = (*grid, 1, 1)
        enter, leave = hooks.launch_enter_hook, hooks.launch_exit_hook
        metadata = (compiled.launch_metadata(grid, stream, *values)
                    if getattr(enter, "calls", enter) else None)
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function,
                     compiled.packed_metadata, metadata, enter, leave, *values)


def _other_key(value):
    # Anything else (a str, a tl.dtype, a jit function passed as a constexpr-like value): by
    # value, as Triton keys it.
    return value
