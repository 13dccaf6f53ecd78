"""A digest of the code a rule actually runs: its entry module and every project module it imports.

Snakemake's code trigger sees a rule's shell text, not the Python modules behind
`python -m mnistflow.train`. Each rule passes `code_digest(<its entry module>)` as a
param, so editing the model retrains, editing evaluation re-evaluates, and editing a
module neither imports reruns nothing. Imports are found statically (every `import`
statement anywhere in the module, lazy ones inside functions included), without
importing anything.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sys
from pathlib import Path

PACKAGE = "mnistflow"
ROOT = Path(__file__).resolve().parent


def _module_path(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = ROOT.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


@functools.lru_cache(maxsize=None)
def _all_imports(name: str, path: Path) -> frozenset[str]:
    """Every module named by an import statement in `path`, relative ones resolved. Parsed
    once a process: the Snakefile asks for several entry points' closures, which share modules."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y, from . import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import model`
    return frozenset(found)


def _imports(name: str, path: Path) -> set[str]:
    return {m for m in _all_imports(name, path) if _module_path(m)}


def closure(entry: str) -> list[str]:
    """The project modules `entry` runs, itself included, sorted."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        path = _module_path(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        todo.extend(_imports(name, path) - seen)
    return sorted(seen)


@functools.lru_cache(maxsize=None)
def code_digest(entry: str) -> str:
    """sha256 over the names and sources of `closure(entry)`; 16 hex digits."""
    digest = hashlib.sha256()
    for name in closure(entry):
        digest.update(name.encode() + b"\0" + _module_path(name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def third_party_imports(entry: str) -> list[str]:
    """The top-level names of the packages outside the project and the standard library
    that `closure(entry)` imports (e.g. torch, numpy), sorted."""
    names = set()
    for module in closure(entry):
        names.update(m.split(".")[0] for m in _all_imports(module, _module_path(module)) if m)
    return sorted(n for n in names if n != PACKAGE and n not in sys.stdlib_module_names and n != "__future__")


if __name__ == "__main__":
    for entry in sys.argv[1:] or ["mnistflow.train", "mnistflow.evaluate", "mnistflow.data", "mnistflow.summarize", "mnistflow.envinfo"]:
        print(f"{entry}: {code_digest(entry)} <- {', '.join(closure(entry))}; imports {', '.join(third_party_imports(entry))}")
