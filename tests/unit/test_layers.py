"""The layer order, enforced (in the manner of diffusers' utils/check_*.py): every import of a
distillkit module, deferred (function-local) ones included, points down this list or stays in
its own unit. README "Where things live" explains each layer.

Plugins are found by name, not imported upward: ``registry`` imports the recipe, family and
model-source packages with importlib when asked for one (as entry points would).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "distillkit"

# lowest first; a unit may import its own modules and any unit of a lower layer
LAYERS: list[tuple[str, ...]] = [
    ("errors", "schema", "faults"),
    ("tensors", "images", "clip", "diffusion", "plan_arch"),
    ("registry",),
    ("config",),
    ("teachers",),
    ("data", "students"),
    ("recipes",),
    ("export",),
    ("evaluation",),
    ("engine",),
    ("plan",),
    ("benchmark",),
    ("cli",),
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__init__" else "distillkit"


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "distillkit"]


def _violations(package: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent)
        unit = _unit(".".join(rel.with_suffix("").parts))
        if unit == "distillkit":  # the package's own __init__
            continue
        assert unit in RANK, f"{rel}: unit {unit!r} has no layer; add it to LAYERS and README"
        for line, name in _imports(path):
            target = _unit(name)
            if target == unit:
                continue
            if target not in RANK or RANK[target] >= RANK[unit]:
                bad.append(f"{rel}:{line} imports {name} ({unit} may not import {target})")
    return bad


def test_imports_follow_the_layer_order() -> None:
    bad = _violations()
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_check_sees_deferred_imports(tmp_path: Path) -> None:
    """A function-local upward import is caught like a top-level one."""
    fake = tmp_path / "distillkit"
    (fake / "teachers").mkdir(parents=True)
    (fake / "teachers" / "x.py").write_text("def f():\n    from distillkit.engine import loop\n")
    assert _violations(fake) == [
        "distillkit/teachers/x.py:2 imports distillkit.engine (teachers may not import engine)"
    ]
