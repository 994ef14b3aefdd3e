"""docs/design.md's import rule, read from the source: every import of every module of mpipar (function-level and
``TYPE_CHECKING`` ones included) goes to its own folder or to one above it in the layering table."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mpipar"
ROOT_MODULES = ("", "_lazy", "_requirements")  # the package root (``mpipar/__init__.py``) and its helpers


def layers():
    """The folders (and root modules) of docs/design.md's table, top first: ``{"registry": 0, ...}``."""
    text = (ROOT / "docs" / "design.md").read_text()
    table = text[text.index("Imports go one way"):text.index("`jobs/*.py`")]
    names = re.findall(r"^\| `mpipar/([A-Za-z_]+)(?:/|\.py)` \|", table, flags=re.MULTILINE)
    return {name: position for position, name in enumerate(names)}


def unit_of(module: str) -> str:
    """``mpipar.pipeline.schedule`` -> ``pipeline``; ``mpipar`` and ``mpipar.__init__`` -> ``""``."""
    unit = module.split(".")[1] if "." in module else ""
    return "" if unit == "__init__" else unit


def imports(module: str, is_package: bool, source: str):
    """(line, imported module) of every import in ``source``, the text of ``module``, at any depth."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([package.rsplit(".", node.level - 1)[0]] + ([base] if base else []))
            if base == "mpipar":  # from mpipar import registry, models (folders) or __version__ (the root)
                for alias in node.names:
                    child = PACKAGE / alias.name
                    is_module = child.is_dir() or child.with_suffix(".py").exists()
                    yield node.lineno, f"mpipar.{alias.name}" if is_module else "mpipar"
            else:
                yield node.lineno, base


def breaks(sources=None):
    """``file:line: unit imports module`` for every import that goes up the table (or out of the root).
    ``sources``: {path under the checkout: text}; default every module of mpipar."""
    if sources is None:
        sources = {str(p.relative_to(ROOT)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}
    order = layers()
    found = []
    for path, source in sources.items():
        parts = Path(path).with_suffix("").parts
        own = unit_of(".".join(parts))
        own = "" if own in ROOT_MODULES else own
        for line, target in imports(".".join(parts).removesuffix(".__init__"), parts[-1] == "__init__", source):
            unit = unit_of(target)
            if not target.startswith("mpipar") or unit in ROOT_MODULES or unit == own:
                continue
            if own == "" or order.get(unit, len(order)) > order.get(own, len(order)):
                found.append(f"{path}:{line}: {own or 'mpipar'} imports {target}")
    return found


def test_every_folder_has_a_row_in_the_table():
    order = layers()
    units = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    units |= {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", *ROOT_MODULES)}
    assert sorted(units - set(order)) == [], "give each a row in docs/design.md's table"
    assert order["pipeline_plan"] < order["report"] < order["cost"] < order["run"] < order["pipeline"]


def test_imports_go_down_the_table_only():
    assert breaks() == []


def test_the_checker_sees_function_level_relative_and_typing_imports():
    """Not vacuous: imports hidden in a function, behind ``TYPE_CHECKING`` or relative ones are seen."""
    probe = "\n".join(["from typing import TYPE_CHECKING", "from . import analysis", "if TYPE_CHECKING:",
                       "    from mpipar.run.loop import train", "def f():",
                       "    from ..pipeline.executor import Pipeline", "    import mpipar.cost.run",
                       "    from mpipar import diagnostics, __version__"])
    assert breaks({"mpipar/report/probe.py": probe}) == [
        "mpipar/report/probe.py:4: report imports mpipar.run.loop",
        "mpipar/report/probe.py:6: report imports mpipar.pipeline.executor",
        "mpipar/report/probe.py:7: report imports mpipar.cost.run",
    ]


def test_the_pure_pipeline_pieces_load_without_torch_or_mpi():
    import subprocess
    import sys

    code = ("import sys, mpipar.pipeline_plan.schedule, mpipar.pipeline_plan.placement, mpipar.pipeline_plan.balance; "
            "print(sorted(m for m in ('torch', 'mpi4py') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]"
