"""The house rules of docs/design.md "Layout", checked on the source: imports go down the stack
only, there are no import cycles, and imports inside functions are kept for cli.py (which loads
one command's modules) and for optional third-party packages."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "chatforge"

# Lowest first. A module may import its own layer or any layer below it, never one above.
LAYERS = [
    ("config", "dtypes", "console", "quantize", "causal_attention", "plots"),
    ("tokenizer",),
    ("data",),
    ("model",),
    ("checkpoint", "convert"),
    ("engine", "sample", "chat"),
    ("train",),
    ("eval",),
    ("store", "feedback"),
    ("serve",),
    ("pipelines",),
    ("cli", "__main__", "__init__"),
]
LAZY_OK = {"cli", "__main__"}  # modules that may import chatforge modules inside functions
# cli.py reads the dtype names for its flags from dtypes.py, and `chatforge --help` should not
# wait seconds for torch: dtypes imports torch only when a dtype is resolved.
TORCH_FREE = {"dtypes"}
# FSDP2, DTensor and distributed checkpoints are torch.distributed APIs of newer torch releases
# than the package requires; only --fsdp runs use them, so they are imported where they are used.
OPTIONAL_PREFIXES = ("torch.distributed.",)

# The import names of the required dependencies in pyproject.toml: importing one of these inside a
# function hides a dependency that is always there; optional packages (dev extras, llama_cpp) are
# the ones that may be imported where they are needed.
DIST_TO_MODULE = {"opencc-python-reimplemented": "opencc", "prometheus-client": "prometheus_client", "psycopg": "psycopg"}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
    return ".".join(parts)


def layer_of(mod: str) -> int:
    head = mod.split(".")[0]
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"chatforge.{mod} is in no layer of tests/test_layout.py: add it where docs/design.md puts it")


def resolve(mod: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    """The chatforge modules an import statement names (relative imports made absolute)."""
    if isinstance(node, ast.Import):
        return [a.name.removeprefix("chatforge.") for a in node.names if a.name.startswith("chatforge.")]
    if node.level == 0:
        if not (node.module or "").startswith("chatforge"):
            return []
        base = (node.module or "").removeprefix("chatforge").lstrip(".")
    else:
        pkg = mod.split(".") if is_package else mod.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
        base = ".".join([*pkg, *([node.module] if node.module else [])])
    if node.module is None or not base:  # `from . import a, b`: each name is a module
        return [f"{base}.{a.name}".lstrip(".") for a in node.names]
    return [base]


def imports() -> list[tuple[str, str, int, bool]]:
    """(importer, imported, line, inside a function) for every chatforge import in the package."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        mod = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        lazy = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in resolve(mod, node, path.name == "__init__.py"):
                    out.append((mod, target, node.lineno, id(node) in lazy))
    return out


def test_imports_go_down_the_stack():
    upward = [f"chatforge.{a} (line {line}) imports chatforge.{b}" for a, b, line, _ in imports()
              if layer_of(b) > layer_of(a)]
    assert not upward, "imports that go up the stack:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for a, b, _, lazy in imports():
        if not lazy and a != b:
            graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_lazy_imports_only_where_allowed():
    required = set()
    for dep in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        dist = dep.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip()
        required.add(DIST_TO_MODULE.get(dist, dist.replace("-", "_")))
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        mod = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for n in ast.walk(f):
                if isinstance(n, ast.ImportFrom) and n.level > 0 or isinstance(n, ast.ImportFrom) and (n.module or "").startswith("chatforge"):
                    if mod.split(".")[0] not in LAZY_OK:
                        bad.append(f"chatforge.{mod} line {n.lineno}: a chatforge import inside {f.name}()")
                elif isinstance(n, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]
                    for name in names:
                        optional = name.startswith(OPTIONAL_PREFIXES) or (mod in TORCH_FREE and name == "torch")
                        if name.split(".")[0] in required and not optional:
                            bad.append(f"chatforge.{mod} line {n.lineno}: {name} (a required dependency) imported inside {f.name}()")
    assert not bad, "imports inside functions (design.md: only in cli.py and for optional dependencies):\n" + "\n".join(bad)
