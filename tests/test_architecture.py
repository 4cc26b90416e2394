"""The import rules of docs/architecture.md, checked on the code: which part of ditmoe may import which."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ditmoe"

# part -> the other parts of ditmoe it may import (a part is a subpackage or a top-level module)
ALLOWED = {
    "model": set(),
    "diffusion": {"model"},
    "data": {"model", "text", "write_errors"},
    "npz": set(),
    "cli": set(),
    "settings": set(),
    "config_file": set(),
    "write_errors": set(),
    "weights": {"model"},
    "checkpoint": {"model", "weights", "write_errors"},
    "parallel": {"model", "weights"},
    "hf": {"model", "weights", "write_errors"},
    "inference": {"model", "checkpoint", "hf"},
    "sampling": {"model"},
    "text": {"model"},
    "eval": {"data", "diffusion", "inference", "model", "npz", "sampling", "text", "write_errors"},
    "analysis": {"diffusion", "eval", "inference", "model", "sampling", "text"},
    "train": {"checkpoint", "cli", "config_file", "data", "diffusion", "eval", "inference", "model", "parallel",
              "sampling", "settings", "text", "weights", "write_errors"},
}


def part_of(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def imported_parts(path: Path, root: Path = PACKAGE) -> set[str]:
    """The parts of ditmoe (at ``root``) that the module at ``path`` imports (relative or absolute, at any depth)."""
    package = path.relative_to(root).parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[:len(package) - (node.level - 1)])
            target = base + (node.module.split(".") if node.module else [node.names[0].name])
            found.add(target[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ditmoe."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("ditmoe.")}
    return found


def test_every_part_imports_only_what_the_architecture_allows():
    modules = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)
    assert {part_of(p) for p in modules} == set(ALLOWED), "a new part of ditmoe needs a row in ALLOWED and the docs"
    bad = {f"{p.relative_to(PACKAGE)} imports {sorted(imported_parts(p) - ALLOWED[part_of(p)] - {part_of(p)})}"
           for p in modules if imported_parts(p) - ALLOWED[part_of(p)] - {part_of(p)}}
    assert not bad


def test_the_rule_check_sees_every_import_form(tmp_path):
    fake = tmp_path / "ditmoe" / "model" / "probe.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..train.trainer import Trainer\nfrom . import dit\nimport ditmoe.parallel.engine\n"
                    "def f():\n    from ditmoe.checkpoint import layout\n")
    assert imported_parts(fake, tmp_path / "ditmoe") == {"train", "model", "parallel", "checkpoint"}


def test_nothing_in_the_package_imports_tools_or_benchmarks():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] in ("tools", "benchmarks") for n in names), path
