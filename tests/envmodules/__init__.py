"""Offline TEST DOUBLE for environment modules (``snakemake --sdm env-modules``).

``module.bash`` defines the bash function ``module`` (purge, load, is-loaded: only what
Snakemake 9.27.1 and the workflow's jobs call). :func:`module_double_env` exports it to
Snakemake's job shells the way Lmod and Environment Modules do, as the environment
variable ``BASH_FUNC_module%%``. Modulefiles are sh snippets under ``MODULEPATH``
(:func:`write_modulefile`), not Tcl or Lua: the double shows how the workflow reacts to a
module that loads or fails to load, nothing about a site's module tree.
"""

from __future__ import annotations

import json
from pathlib import Path

FUNCTION_FILE = Path(__file__).resolve().parent / "module.bash"


def function_value() -> str:
    """The exported value of ``module``: the function's text from ``() {`` on."""
    text = FUNCTION_FILE.read_text()
    return text[text.index("module() {") + len("module") :].rstrip() + "\n"


def module_double_env(base_env: dict, modulepath: Path, log_path: Path | None = None) -> dict:
    """``base_env`` with the ``module`` double exported, ``MODULEPATH`` set and no module loaded."""
    env = {
        k: v for k, v in base_env.items() if not k.startswith(("BASH_FUNC_module", "BASH_FUNC_ml", "_LMOD", "LMOD_"))
    }
    env.pop("LOADEDMODULES", None)
    env["BASH_FUNC_module%%"] = function_value()
    env["MODULEPATH"] = str(modulepath)
    if log_path is not None:
        env["MODULE_DOUBLE_LOG"] = str(log_path)
    return env


def write_modulefile(modulepath: Path, name: str, text: str) -> Path:
    """``MODULEPATH/name`` (``name`` may hold a ``/`` version), sourced by ``module load name``."""
    path = Path(modulepath) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def events(log_path: Path) -> list[dict]:
    if not Path(log_path).exists():
        return []
    return [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
