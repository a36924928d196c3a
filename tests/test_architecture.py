"""The package's imports flow one way, with no cycle (in-function imports included).

Layers, lowest first: basics <- detectors, aligner, networks, head <- face pipeline, model <-
predictor <- training, export <- apps and the public API. A module may import its own layer
or lower ones, never a higher one, and nothing may import the apps.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "facerace"

LAYERS = [
    ("errors", "files", "version", "labels", "images", "results", "parallel", "textout", "quantify", "csvread"),
    ("detect", "align", "head", "backbones"),
    ("faces", "model"),
    ("predictor",),
    ("training", "export"),
    ("apps", "__init__", "__main__"),
]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _rank(module: str) -> int:
    head = module.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if head in names)


def _imports(path: Path) -> set[str]:
    """The facerace modules a file imports anywhere in it (relative imports resolved)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = _module(path).split(".")[: -node.level or None] if path.name != "__init__.py" else \
                    _module(path).split(".")[: len(_module(path).split(".")) - node.level + 1]
                name = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and (node.module == "facerace" or node.module.startswith("facerace.")):
                name = node.module.removeprefix("facerace").lstrip(".")
            else:
                continue
            found.add(name or "__init__")
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("facerace.") for a in node.names if a.name.startswith("facerace.")}
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = "__init__" if path == PACKAGE / "__init__.py" else _module(path)
        graph[module] = {m for m in _imports(path) if m != module}
    return graph


def test_imports_never_go_up_a_layer():
    upward = [f"{m} (layer {_rank(m)}) imports {t} (layer {_rank(t)})"
              for m, targets in _graph().items() for t in targets if _rank(t) > _rank(m)]
    assert not upward, "\n".join(upward)


def test_nothing_imports_the_apps():
    graph = _graph()
    bad = [f"{m} imports {t}" for m, targets in graph.items() for t in targets
           if t.startswith("apps") and not m.startswith("apps") and m not in ("__main__", "__init__")]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_walk_sees_every_module():
    """Guards the test itself: every module is in a layer, and known edges are found."""
    graph = _graph()
    assert all(isinstance(_rank(m), int) for m in graph)
    assert "faces" in graph["predictor"] and "backbones.base" in graph["backbones.dlib"]
    assert "files" in graph["backbones.dlib_onnx"]  # an in-function import


def test_no_function_takes_more_than_twelve_parameters():
    """Settings travel in config objects (TrainConfig, HeadParams, ModelConfig), not long keyword lists."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs) if x.arg not in ("self", "cls")]
                if len(names) > 12:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({len(names)})")
    assert not long, "\n".join(long)
