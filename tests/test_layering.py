"""The module layering of docs/architecture.md: no module of mxmoe imports from a layer above
its own, at the top of the file or inside a function (a deferred import is a dependency too).

Read with `ast` from the source, nothing imported. Modules of one layer may import each other.
The package itself (``mxmoe/__init__.py``, which resolves its public names lazily from every
layer) stands outside the layers, and ``import mxmoe`` for ``mxmoe.__version__`` is allowed
anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "mxmoe"
ARCHITECTURE = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"

#: Bottom up, as docs/architecture.md's table (which names the same modules): module or
#: package prefixes per layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("format", ("constants", "layouts", "format")),
    ("activations, problem", ("activations", "problem")),
    ("settings", ("settings", "devices", "cache", "scratch")),
    ("routing, reference", ("routing", "reference")),
    ("kernels", ("kernels", "tuning_cache", "autotune")),
    ("backends", ("backends",)),
    ("API, operator", ("validation", "api", "ops", "plans", "router")),
    ("users", ("layer", "checkpoints", "checkpoint", "integrations", "cli", "bench", "tune",
               "tune_shapes", "convert", "distributed", "testing", "tolerances")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer_of(module: str) -> int | None:
    """The index of ``module``'s layer (None for the package itself)."""
    if module == "mxmoe":
        return None
    first = module.split(".")[1]
    for index, (_, members) in enumerate(LAYERS):
        if first in members:
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layering.py (and, likely, "
                         f"not in docs/architecture.md's table)")


def _imports(path: Path, source: str) -> list[tuple[int, str]]:
    """(line, imported mxmoe module) for every import in ``source`` (the text of ``path``),
    wherever it stands."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mxmoe"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mxmoe":
                continue
            if node.module is None:  # `from .. import x`: x is a module of that package
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def _violations(path: Path, source: str | None = None) -> list[str]:
    module = _module_name(path)
    own = _layer_of(module)
    if own is None:
        return []
    out = []
    for line, target in _imports(path, path.read_text() if source is None else source):
        if target == "mxmoe.__version__" or target == "mxmoe":
            continue
        theirs = _layer_of(target)
        if theirs is not None and theirs > own:
            out.append(f"{path.relative_to(SRC)}:{line} ({LAYERS[own][0]}) imports {target} "
                       f"({LAYERS[theirs][0]})")
        if module.startswith("mxmoe.kernels._") and not target.startswith("mxmoe.kernels._"):
            out.append(f"{path.relative_to(SRC)}:{line}: a @triton.jit module imports {target} "
                       f"(kernels/_*.py import only each other)")
    return out


def test_every_module_has_a_layer_and_the_document_names_each_layers_modules():
    text = ARCHITECTURE.read_text()
    for path in SOURCES:
        _layer_of(_module_name(path))
    for name, members in LAYERS:
        row = next((line for line in text.splitlines() if line.startswith(f"| {name} |")), None)
        assert row is not None, f"docs/architecture.md has no row for the layer {name!r}"
        for member in members:
            assert f"`{member}" in row, f"docs/architecture.md's {name!r} row lacks {member}"


#: Known violations, reported to whoever owns the module; strict, so that the fix is noticed.
KNOWN: dict[str, str] = {}


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=KNOWN[str(p.relative_to(PACKAGE))]))
    if str(p.relative_to(PACKAGE)) in KNOWN else p for p in SOURCES
], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_layer_above(path):
    assert _violations(path) == []


def test_the_check_sees_deferred_relative_and_absolute_imports():
    # A kernel launcher importing the layer at the top, the API inside a function, the CLI by
    # its absolute name; and a @triton.jit module importing its launcher.
    source = ("from ..layer import MXFP4MoE\n\ndef f():\n    from .. import api\n"
              "    import mxmoe.cli.check\n")
    def targets(path):
        return [v.split(" imports ")[1].split()[0] for v in _violations(path, source)]

    assert targets(PACKAGE / "kernels" / "not_a_module.py") == [
        "mxmoe.layer", "mxmoe.api", "mxmoe.cli.check"]
    # In a package's __init__.py, "." is that package.
    assert _violations(PACKAGE / "kernels" / "__init__.py", "from .launch import x\n") == []
    assert len(_violations(PACKAGE / "kernels" / "__init__.py", "from ..api import x\n")) == 1
    jit = _violations(PACKAGE / "kernels" / "_not_a_module.py", "from . import launch\n")
    assert len(jit) == 1 and "kernels/_*.py import only each other" in jit[0]
    assert _violations(PACKAGE / "layer.py", "from .kernels import launch\n") == []
