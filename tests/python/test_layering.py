"""How the package's modules depend on each other: functional is the only one that calls the ops
(by their schemas' argument names, through functional.call_op), nn never imports distributed
(distributed swaps the layers' core instead), and no module uses another's private names."""
import ast
import os

import pytest
import torch

import retention
from retention.functional import call_op

ROOT = os.path.dirname(os.path.abspath(retention.__file__))


def _sources():
    for dirpath, _, files in os.walk(ROOT):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                with open(path) as fh:
                    yield os.path.relpath(path, ROOT), ast.parse(fh.read())


def _package_modules():
    return {f.split(".")[0] for _, _, files in os.walk(ROOT) for f in files
            if f.endswith((".py", ".so", ".pyd"))}


def test_no_module_uses_another_modules_private_names():
    modules, bad = _package_modules(), []
    for name, tree in _sources():
        siblings = set()  # names this module binds to the package's modules and their contents
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                for a in node.names:
                    if a.name.startswith("_") and a.name not in modules:
                        bad.append(f"{name}:{node.lineno} imports {a.name}")
                    siblings.add(a.asname or a.name)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in siblings and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, bad


def test_only_functional_calls_the_ops():
    bad = []
    for name, tree in _sources():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == "ops"
                    and isinstance(node.value, ast.Name) and node.value.id == "torch"
                    and name not in ("functional.py", "__init__.py")):  # (__init__: retention.ops)
                bad.append(f"{name}:{node.lineno}")
        if name == "functional.py":
            call = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "call_op")
            inside = {id(n) for n in ast.walk(call)}
            uses = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "_ops"
                    and isinstance(n.ctx, ast.Load) and id(n) not in inside]
            bad += [f"functional.py:{line} calls an op outside call_op" for line in uses]
    assert not bad, bad


def test_layers_do_not_import_distributed():
    for name, tree in _sources():
        if name not in ("nn.py", "functional.py", "checkpoint.py"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
                assert not any("distributed" in n for n in names), f"{name}:{node.lineno}"


def test_call_op_uses_the_schema_names():
    q, k, v = torch.randn(1, 7, 2, 8), torch.randn(1, 7, 2, 8), torch.randn(1, 7, 2, 4)
    ld = retention.retnet_log_decay(2)
    o, s = call_op("chunk_forward", q=q, k=k, v=v, log_decay=ld, scale=None, chunk_size=4,
                   initial_state=None)
    o_ref, s_ref = torch.ops.retention.chunk_forward(q, k, v, ld, 8 ** -0.5, 4, None)
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref)
    y = call_op("msr_forward", q=q, k=k, v=v, g=None, log_decay=ld, scale=0.5, form="parallel",
                chunk_size=64, initial_state=None, offsets=None, cu_seqlens=None, rotary="neox",
                norm=True, norm_weight=None, eps=1e-6, decay_norm=False)[0]
    y_ref = torch.ops.retention.msr_forward(q, k, v, None, ld, 0.5, 1, 64, None, None, None, 2,
                                            True, None, 1e-6, False)[0]
    assert torch.equal(y, y_ref)
    with pytest.raises((RuntimeError, TypeError)):  # a name the schema does not have
        call_op("chunk_forward", q=q, k=k, v=v, log_decay=ld, scale=None, chunk_size=4,
                init_state=None)
    with pytest.raises(ValueError, match="form must be"):
        retention.msr(q, k, v, None, ld, form="quadratic")


def _module_of(path):  # "models/retnet_fla.py" -> "retention.models.retnet_fla"
    parts = ["retention"] + path[:-3].split(os.sep)
    return ".".join(p for p in parts if p != "__init__")


def _imported_modules(path, tree, modules):
    """The package modules that the module at `path` imports (relative imports, at any depth of
    the code: a function-level import closes a circle as surely as a top-level one)."""
    name = _module_of(path)
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level):
            continue
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
        for a in node.names:  # `from . import nn` imports module nn; `from . import f`, the package
            sub = f"{target}.{a.name}"
            yield sub if sub in modules else target


def test_no_import_circle():
    sources = list(_sources())
    modules = {_module_of(path) for path, _ in sources}
    edges = {_module_of(path): set(_imported_modules(path, tree, modules)) - {_module_of(path)}
             for path, tree in sources}
    # A package's __init__ imports its modules; a module that imports the package root (or a
    # module that leads back to it) closes a circle.
    state, circles = {}, []

    def visit(m, path):
        state[m] = "open"
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                circles.append(" -> ".join(path[path.index(n):] + [n]))
            elif state.get(n) is None:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(modules):
        if state.get(m) is None:
            visit(m, [m])
    assert not circles, circles
