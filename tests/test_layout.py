"""The package's shape: an import graph without circles, few floors, clean bottom,
mlx-lm's internals behind one boundary, short functions."""

import ast

import pytest

from conftest import ROOT

PACKAGE = ROOT / "mlx_lm_optiq"


def import_graph():
    """``{module: {modules of the package it imports}}``, counting imports
    inside functions and modules named in strings (``"pkg.mod:func"``)."""
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts): p
        for p in PACKAGE.rglob("*.py")
    }
    modules["mlx_lm_optiq"] = modules.pop("mlx_lm_optiq.__init__")
    edges = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                if node.level:
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                targets = [node.value.split(":")[0]]
            found |= {t for t in targets if t in modules and t != name}
        edges[name] = found - {"mlx_lm_optiq"}  # the package face holds a version
    return edges


def floors(edges):
    """``{module: floor}``: 1 for a module importing nothing of the package."""
    floor = {}

    def visit(module, path):
        assert module not in path, "import circle: " + " -> ".join(path + [module])
        if module not in floor:
            floor[module] = 1 + max(
                (visit(t, path + [module]) for t in edges[module]), default=0
            )
        return floor[module]

    for module in edges:
        visit(module, [])
    return floor


def test_no_circles_and_at_most_six_floors():
    floor = floors(import_graph())
    assert max(floor.values()) <= 6
    # the orchestrator is the top; nothing imports it
    assert floor["mlx_lm_optiq.lora_hooks"] == max(floor.values())
    assert not any("mlx_lm_optiq.lora_hooks" in t for t in import_graph().values())


def test_the_bottom_imports_nothing_of_the_package():
    edges = import_graph()
    bottom = (
        "lora_layers",
        "errors",
        "hookspecs",
        "mlx_lm_hookspecs",
        "checks",
        "layout",
    )
    for module in bottom:
        assert edges[f"mlx_lm_optiq.{module}"] == set(), module
    # the shim is the backport of patches/ and the probe of mlx-lm's conversion
    assert edges["mlx_lm_optiq.shim"] == {"mlx_lm_optiq.mlx_lm_hookspecs"}
    # start-up reaches it, and the two that ask which modules mlx-lm adapts
    users = {m for m, targets in edges.items() if "mlx_lm_optiq.shim" in targets}
    assert users == {
        "mlx_lm_optiq._startup",
        "mlx_lm_optiq.plan",
        "mlx_lm_optiq.adapter_load",
    }
    # the server's boundary is reached by the serve command alone
    users = {m for m, t in edges.items() if "mlx_lm_optiq.mlx_lm_server" in t}
    assert users == {"mlx_lm_optiq.serve"}


BOUNDARY = {"shim.py", "mlx_lm_server.py"}


def mlx_lm_internals(source):
    """``[(line, what)]`` where ``source`` reaches into mlx-lm: a private name
    of an mlx-lm module or class, an assignment to an mlx-lm module
    attribute, ``sys.modules["mlx_lm..."]``, or a private method overridden
    in a subclass of an mlx-lm class."""
    tree = ast.parse(source)
    names = set()  # local names bound to mlx-lm modules or their members
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "mlx_lm":
                    names.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "mlx_lm"
        ):
            for a in node.names:
                names.add(a.asname or a.name)
                if a.name.startswith("_"):
                    found.append((node.lineno, f"imports {a.name}"))

    def rooted(expr):
        while isinstance(expr, ast.Attribute):
            expr = expr.value
        return isinstance(expr, ast.Name) and expr.id in names

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and rooted(node.value):
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append((node.lineno, f"uses {ast.unparse(node)}"))
            if isinstance(node.ctx, ast.Store):
                found.append((node.lineno, f"assigns {ast.unparse(node)}"))
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in (
            "setattr",
            "delattr",
        ):
            if node.args and rooted(node.args[0]):
                found.append((node.lineno, f"{ast.unparse(node.func)} on mlx-lm"))
        elif (
            isinstance(node, ast.Subscript) and ast.unparse(node.value) == "sys.modules"
        ):
            key = node.slice
            if isinstance(key, ast.Constant) and str(key.value).startswith("mlx_lm"):
                found.append((node.lineno, f"sys.modules[{key.value!r}]"))
        elif isinstance(node, ast.ClassDef) and any(rooted(b) for b in node.bases):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name.startswith("_") \
                        and not item.name.startswith("__"):  # fmt: skip
                    found.append((item.lineno, f"overrides {node.name}.{item.name}"))
    return found


@pytest.mark.parametrize(
    "source",
    [
        "import mlx_lm.server as s\ns._run_http_server(1)",
        "from mlx_lm import server\nserver.run = 1",
        "import sys\nsys.modules['mlx_lm.tuner.utils']",
        "import mlx_lm.tuner.utils as u\nsetattr(u, 'LoRALinear', 1)",
        "from mlx_lm.utils import _parse_size",
        "from mlx_lm.server import ModelProvider\nclass P(ModelProvider):\n"
        "    def _load(self): pass",
    ],
)
def test_the_internals_check_finds_each_kind(source):
    assert len(mlx_lm_internals(source)) == 1


def test_mlx_lm_internals_only_behind_the_boundary():
    """Only the shim (training) and mlx_lm_server (serving) reach into mlx-lm."""
    seen = {}
    for path in PACKAGE.rglob("*.py"):
        found = mlx_lm_internals(path.read_text())
        if found:
            seen[path.name] = found
    assert set(seen) <= BOUNDARY, {k: v for k, v in seen.items() if k not in BOUNDARY}
    assert set(seen) == BOUNDARY  # both do reach in: the check sees them


def test_functions_are_short():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.name}:{node.name} ({lines} lines)")
    assert long == []


def test_one_exception_type():
    """Every ``raise`` of the package raises OptiqError, except where mlx-lm's
    own conventions rule: the shim and the mlx-lm hookspecs (backports of
    ``patches/``), the server's request validation, argparse's type
    functions, and programming errors (TypeError)."""
    allowed = {"OptiqError", "TypeError", "SystemExit", "argparse.ArgumentTypeError"}
    upstream = {"shim.py", "mlx_lm_hookspecs.py"}
    answered_400 = {"serve_api.py", "mlx_lm_server.py"}  # mlx-lm's server: a 400
    for path in PACKAGE.rglob("*.py"):  # and the kinds of OptiqError
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                ast.unparse(b) == "OptiqError" for b in node.bases
            ):
                allowed.add(node.name)
    for path in PACKAGE.rglob("*.py"):
        if path.name in upstream:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                name = ast.unparse(node.exc.func)
                if path.name in answered_400 and name == "ValueError":
                    continue
                assert name in allowed, f"{path.name}:{node.lineno} raises {name}"
