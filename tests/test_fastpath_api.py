"""The fast path's API, checked from the sources: which implementation is active, the twins
stand alone, and `_fastpath.pyi` declares exactly the names and signatures of the pure-Python
twin (and the names of the compiled module), so the stub, the twin and the compiled module
cannot drift apart."""

from __future__ import annotations

import ast
import inspect
import os
import types

import pytest

import broker._fastpath_py as pure
from broker import fastpath
from conftest import ROOT

try:
    from broker import _fastpath as compiled
except ImportError:  # the suite requires it; test_compiled_fast_path_is_active... says so
    compiled = None

BROKER = ROOT / "broker"
# Attributes of the twin that the compiled module keeps in C (a bitmap, `Bits`), not as Python
# attributes, so the stub does not declare them: the topics announced to an outbox or node.
HELD_IN_C = {"Outbox": {"known"}, "Node": {"known"}}


def test_compiled_fast_path_is_active_in_a_normal_install():
    if os.environ.get("BROKER_PURE_PYTHON"):
        assert fastpath.IMPLEMENTATION == "python"
    else:
        assert fastpath.IMPLEMENTATION == "cython"


def test_each_twin_stands_alone():
    """Neither implementation imports the other, so parity compares two implementations."""
    compiled_sources = [BROKER / "_fastpath.pyx", *sorted(BROKER.glob("_fastpath*.pxi")), *sorted(BROKER.glob("_fastpath*.pxd"))]
    twin_sources = sorted((BROKER / "_fastpath_py").glob("*.py"))
    assert len(compiled_sources) > 2 and len(twin_sources) > 2
    for path in compiled_sources:
        for line in path.read_text().splitlines():
            words = line.split()
            if words and words[0] in ("import", "from", "cimport", "include"):
                assert "_fastpath_py" not in line, f"{path.name}: {line}"
    for path in twin_sources:
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not any("fastpath" in m for m in imported), path.name


def _parameters(args: ast.arguments) -> list[tuple[str, str, bool]]:
    """(name, kind, has a default) of each parameter of a stub's function."""
    out = []
    positional = args.posonlyargs + args.args
    defaults = [False] * (len(positional) - len(args.defaults)) + [True] * len(args.defaults)
    for arg, default in zip(positional, defaults):
        kind = "POSITIONAL_ONLY" if arg in args.posonlyargs else "POSITIONAL_OR_KEYWORD"
        out.append((arg.arg, kind, default))
    if args.vararg:
        out.append((args.vararg.arg, "VAR_POSITIONAL", False))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append((arg.arg, "KEYWORD_ONLY", default is not None))
    if args.kwarg:
        out.append((args.kwarg.arg, "VAR_KEYWORD", False))
    return out


def _signature(function) -> list[tuple[str, str, bool]]:
    return [(p.name, p.kind.name, p.default is not p.empty) for p in inspect.signature(function).parameters.values()]


def _stub() -> tuple[dict[str, ast.AST], dict[str, ast.ClassDef]]:
    tree = ast.parse((BROKER / "_fastpath.pyi").read_text())
    names: dict[str, ast.AST] = {}
    classes: dict[str, ast.ClassDef] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            names[node.name] = node
        elif isinstance(node, ast.ClassDef):
            names[node.name] = classes[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names, classes


def _public(module) -> set[str]:
    return {
        name
        for name in dir(module)
        if not name.startswith("_")
        and not isinstance(getattr(module, name), types.ModuleType)
        and getattr(getattr(module, name), "__module__", module.__name__).startswith("broker")
    }


def test_the_stub_declares_exactly_the_twins_names_and_signatures():
    names, classes = _stub()
    assert set(names) == set(pure.__all__) == _public(pure)
    assert set(fastpath.__all__) - {"IMPLEMENTATION"} <= set(names)
    for name, node in names.items():
        value = getattr(pure, name)
        if isinstance(node, ast.FunctionDef):
            assert _signature(value) == _parameters(node.args), name
        elif isinstance(node, ast.AnnAssign):
            assert not callable(value), name
    for name, node in classes.items():
        cls = getattr(pure, name)
        assert isinstance(cls, type), name
        source = ast.parse(inspect.getsource(inspect.getmodule(cls)))
        body = next(n for n in source.body if isinstance(n, ast.ClassDef) and n.name == name)
        assigned = {
            target.attr
            for n in ast.walk(body)
            for target in (n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else [])
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
        }
        declared = {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)}
        methods = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
        public_assigned = {a for a in assigned if not a.startswith("_")} - HELD_IN_C.get(name, set())
        assert declared == public_assigned - set(methods), name
        twin_methods = {
            m
            for m, v in vars(cls).items()
            if (not m.startswith("_") or m in ("__init__", "__len__")) and (callable(v) or isinstance(v, property))
        }
        assert set(methods) == twin_methods, name
        for method, stub in methods.items():
            member = vars(cls)[method]
            if isinstance(member, property):
                assert any(isinstance(d, ast.Name) and d.id == "property" for d in stub.decorator_list), f"{name}.{method}"
            else:
                assert _signature(member) == _parameters(stub.args), f"{name}.{method}"


def test_the_stub_declares_exactly_the_compiled_modules_names_and_signatures():
    if compiled is None:
        pytest.skip("compiled fast path not built")
    names, classes = _stub()
    assert set(names) == _public(compiled)
    for name, node in names.items():
        if isinstance(node, ast.FunctionDef):
            assert _signature(getattr(compiled, name)) == _parameters(node.args), name
    for name, node in classes.items():
        for stub in node.body:
            if isinstance(stub, ast.FunctionDef) and not stub.name.startswith("_") and not stub.decorator_list:
                assert _signature(getattr(getattr(compiled, name), stub.name)) == _parameters(stub.args), f"{name}.{stub.name}"
