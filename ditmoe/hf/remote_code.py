"""The code an exported folder runs under ``trust_remote_code``: the Hugging Face wrappers and every module
of the package they import relatively, found by walking the imports with ``ast``. transformers loads the
folder's files as siblings, so each relative import is rewritten flat (``from ..model.dit import`` ->
``from .dit import``)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("hf/configuration_ditmoe.py", "hf/modeling_ditmoe.py")


def required_files(root: Path = PACKAGE, entries: tuple[str, ...] = ENTRY_POINTS) -> list[Path]:
    """The entry modules and every module they import relatively, transitively (sorted, relative to ``root``)."""
    root = root.resolve()
    todo, seen = [root / entry for entry in entries], set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(target for _, target in relative_imports(path, root))
    files = sorted(path.relative_to(root) for path in seen)
    names = [path.name for path in files]
    clashes = sorted({str(path) for path in files if names.count(path.name) > 1})
    if clashes:
        raise ValueError(f"remote code files must have distinct names once flattened: {clashes}")
    return files


def relative_imports(path: Path, root: Path) -> list[tuple[ast.ImportFrom, Path]]:
    """Each relative ``from ... import`` in the module at ``path``, with the module file of ``root`` it names."""
    path, root, found = path.resolve(), root.resolve(), []
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if _imports_package_absolutely(node, root.name):
            raise ValueError(f"{path}:{node.lineno}: remote code must import {root.name} relatively")
        if isinstance(node, ast.ImportFrom) and node.level:
            found.append((node, _resolve(node, path, root)))
    return found


def flat_source(path: Path, root: Path = PACKAGE) -> str:
    """The module's source with each relative import rewritten as ``from .<module file stem> import ...``."""
    source = path.read_bytes()
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    edits = sorted(((starts[node.lineno - 1] + node.col_offset, starts[node.end_lineno - 1] + node.end_col_offset,
                     ast.unparse(ast.ImportFrom(module=target.stem, names=node.names, level=1)))
                    for node, target in relative_imports(path, root)), reverse=True)
    for begin, end, statement in edits:
        source = source[:begin] + statement.encode() + source[end:]
    return source.decode()


def write_remote_code(out: Path, root: Path = PACKAGE, entries: tuple[str, ...] = ENTRY_POINTS) -> list[str]:
    """Write the flattened remote code into ``out``; returns the file names."""
    names = []
    for relative in required_files(root, entries):
        (out / relative.name).write_text(flat_source(root / relative, root), encoding="utf-8")
        names.append(relative.name)
    return names


def _resolve(node: ast.ImportFrom, path: Path, root: Path) -> Path:
    """The module file that ``from <dots><module> import ...`` in ``path`` names."""
    where = f"{path}:{node.lineno}: from {'.' * node.level}{node.module or ''} import"
    base = path.parent
    for _ in range(node.level - 1):
        base = base.parent
    if not base.is_relative_to(root):
        raise ValueError(f"{where}: leaves the package {root}")
    if node.module is None:
        raise ValueError(f"{where}: transformers copies only 'from .module import name' imports; name the module")
    target = base.joinpath(*node.module.split(".")).with_suffix(".py")
    if not target.is_file():
        raise ValueError(f"{where}: not a module file of the package (a package's __init__ cannot be flattened)")
    return target


def _imports_package_absolutely(node: ast.AST, package: str) -> bool:
    if isinstance(node, ast.Import):
        modules = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level:
        modules = [node.module]
    else:
        return False
    return any(module == package or module.startswith(package + ".") for module in modules)
