"""The import rule of docs/architecture.md, read from the source: every import of a fastsample
module goes to the same or a lower layer, the packages form no cycle, no private name crosses a
package boundary, and no module outside a family's own files names a family."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fastsample"

# docs/architecture.md: the layers, lowest first. A top-level package or module of fastsample
# belongs to exactly one.
LAYERS = (
    ("__init__", "sde", "kernels", "checkpoint", "io"),
    ("nets", "data", "metrics"),
    ("samplers",),
    ("models",),
    ("train",),
    ("runtime",),
    ("export",),
    ("serve",),
    ("cli", "__main__"),
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
# Read from the registry, so a new family is checked without editing this file; the four
# original families must stay registered.
from fastsample.models.registry import FAMILIES  # noqa: E402

assert {"ddgan", "cld", "lsgm", "ddpm"} <= set(FAMILIES)


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        yield ".".join(parts), path


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    """(target module, imported names, line) of every fastsample import, lazy ones included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "fastsample":
            names = [a.name for a in node.names]
            if node.module == "fastsample":
                for n in names:     # `from fastsample import samplers` imports a package
                    yield (f"fastsample.{n}" if n != "__version__" else "fastsample"), [], \
                        node.lineno
            else:
                yield node.module, names, node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "fastsample":
                    yield a.name, [], node.lineno


def _edges():
    for module, path in _modules():
        for target, names, line in _imports(path):
            yield module, path, target, names, line


def test_every_package_has_a_layer():
    missing = sorted({_package(m) for m, _ in _modules()} - set(LAYER))
    assert not missing, f"packages without a layer in docs/architecture.md: {missing}"


def test_imports_point_down():
    bad = [f"{path.relative_to(PKG.parent)}:{line}: {_package(m)} (layer {LAYER[_package(m)]}) "
           f"imports {t} (layer {LAYER[_package(t)]})"
           for m, path, t, _, line in _edges() if LAYER[_package(t)] > LAYER[_package(m)]]
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_no_package_cycle():
    graph: dict[str, set] = {}
    for m, _, t, _, _ in _edges():
        a, b = _package(m), _package(t)
        if a != b:
            graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(n, trail):
        if state.get(n) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail + [n]))
        if state.get(n) == 2:
            return
        state[n] = 1
        for k in sorted(graph.get(n, ())):
            visit(k, trail + [n])
        state[n] = 2

    for n in sorted(graph):
        visit(n, [])


def test_no_private_name_crosses_a_package():
    bad = []
    for m, path, t, names, line in _edges():
        if _package(m) == _package(t):
            continue
        hidden = [n for n in names if n.startswith("_")]
        hidden += [p for p in t.split(".")[1:] if p.startswith("_")]
        if hidden:
            bad.append(f"{path.relative_to(PKG.parent)}:{line}: {t} {hidden}")
    assert not bad, "private names imported across packages:\n" + "\n".join(bad)


def _own_files(family: str) -> set:
    module = family.replace("-", "_")     # latent-cld lives in latent_cld.py
    return {PKG / "models" / f"{module}.py", PKG / "samplers" / f"{module}.py"}


def test_no_family_name_outside_its_own_files():
    """A family is named only in its own model/sampler modules and its registry entry; every
    other module asks the registry (a literal "ddgan" elsewhere is a branch waiting to drift)."""
    allowed_everywhere = {PKG / "models" / "registry.py"}
    bad = []
    for _, path in _modules():
        if path in allowed_everywhere:
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr)
                and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in FAMILIES and id(node) not in docs \
                    and path not in _own_files(node.value):
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}: {node.value!r}")
    assert not bad, "family names outside their own files:\n" + "\n".join(bad)


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_entry_is_complete(family):
    """Every family the tests know is registered, with its samplers, default and engine set."""
    from fastsample.models import registry
    e = registry.get(family)
    sampler, _ = e.default
    assert sampler in e.samplers
    assert set(e.engine) <= set(e.samplers) | {"decode"}
    assert e.module.Model.family == family
    assert e.sampling.family == family
