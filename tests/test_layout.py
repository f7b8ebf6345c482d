"""The package's shape: an import graph without circles, few floors, clean bottom."""

import ast

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
    for module in ("lora_layers", "errors", "hookspecs", "mlx_lm_hookspecs"):
        assert edges[f"mlx_lm_optiq.{module}"] == set(), module
    # the shim is the backport of patches/ and nothing else
    assert edges["mlx_lm_optiq.shim"] == {"mlx_lm_optiq.mlx_lm_hookspecs"}
    # nothing but start-up reaches the shim
    users = {m for m, targets in edges.items() if "mlx_lm_optiq.shim" in targets}
    assert users == {"mlx_lm_optiq._startup"}


def test_one_exception_type():
    """Every ``raise`` of the package raises OptiqError, except where mlx-lm's
    own conventions rule: the shim and the mlx-lm hookspecs (backports of
    ``patches/``), the server's request validation, argparse's type
    functions, and programming errors (TypeError)."""
    allowed = {"OptiqError", "TypeError", "SystemExit", "argparse.ArgumentTypeError"}
    upstream = {"shim.py", "mlx_lm_hookspecs.py"}
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
                if path.name == "serve.py" and name == "ValueError":
                    continue  # mlx-lm's server answers it with a 400
                assert name in allowed, f"{path.name}:{node.lineno} raises {name}"
