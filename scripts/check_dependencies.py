#!/usr/bin/env python3
"""Every import is a declared dependency, and every declared dependency is used, for each part of the
repository against what a fresh install of that part has (deptry: undeclared DEP001, unused DEP002,
transitive-only DEP003, another part's dependency DEP004).

    src/    may import [project].dependencies only
    tests/  may import those and the `test` and `model-server` extras
    bench/  may import those and the `bench` and `model-server` extras
    bench/apps/langgraph/  (LangGraph's baseline) its own project's dependencies only: it has its own
            pyproject.toml and lock, because it cannot share Aura's (see that file)

A dependency that is a command or a plugin, never imported, is listed in NOT_IMPORTED with its reason;
anything else unused fails. Exit status: non-zero when any part fails.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the extras each part may use besides the main dependencies (PARTS's order is the run's)
PARTS: dict[str, tuple[str, ...]] = {"src": (), "tests": ("test", "model-server"), "bench": ("bench", "model-server")}
FIRST_PARTY = ("domain", "adapters", "app", "tests", "bench", "scripts")

# Declared for what they do outside `import`: each needs its reason.
NOT_IMPORTED: dict[str, str] = {
    # main
    "uvloop": "chosen by name at run time (app.cli imports it lazily when AURA_SERVER__EVENT_LOOP allows)",
    # bench
    "uvicorn": "runs the peer app as `python -m uvicorn` (bench/servers.py)",
    # bench/apps/langgraph
    "langgraph-cli": "command: `langgraph dev` serves the LangGraph baseline (bench/servers.py)",
    # model-server
    "llama-cpp-python": "the model server runs as `python -m llama_cpp.server`",
    # test
    "pytest-asyncio": "pytest plugin (asyncio_mode = auto)",
    "pytest-timeout": "pytest plugin (timeout = 120)",
    "import-linter": "command: lint-imports",
    "ruff": "command: ruff check",
    "mypy": "command: mypy",
    "types-pyyaml": "type stubs read by mypy",
    "types-jsonschema": "type stubs read by mypy",
    "deptry": "command: this check",
    "bandit": "command: the security linter",
    "pip-audit": "command: the vulnerability audit of the lock",
}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


LANGGRAPH_APP = "bench/apps/langgraph"


def _deptry(part: str, dev_groups: list[str], also_unused_ok: set[str], allowed: tuple[str, ...],
            project: Path = REPO) -> int:
    ignores = sorted(also_unused_ok | set(NOT_IMPORTED))
    command = [sys.executable, "-m", "deptry", str((REPO / part).relative_to(project)), "--no-ansi",
               *(f"--known-first-party={module}" for module in FIRST_PARTY),
               # deptry skips tests/ by default; each part here is checked on its own (LangGraph's
               # baseline against its own project)
               "--exclude", r"\.venv|__pycache__|node_modules|results"
               + ("|" + LANGGRAPH_APP if part == "bench" else ""),
               "--per-rule-ignores", "DEP002=" + "|".join(ignores)]
    if dev_groups:
        command += ["--optional-dependencies-dev-groups", ",".join(dev_groups)]
    uses = "its own pyproject.toml" if project != REPO else "main" + "".join(" + " + e for e in allowed)
    print(f"== deptry {part}/ (may use: {uses})", flush=True)
    return subprocess.run(command, cwd=project, check=False).returncode


project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
_MAIN = {_name(d) for d in project["dependencies"]}
_EXTRAS: dict[str, set[str]] = {extra: {_name(d) for d in deps}
                                 for extra, deps in project.get("optional-dependencies", {}).items()}
_LANGGRAPH = {_name(d) for d in tomllib.loads((REPO / LANGGRAPH_APP / "pyproject.toml").read_text(encoding="utf-8"))
              ["project"]["dependencies"]}


def main() -> int:
    failed = 0
    for part, allowed in PARTS.items():
        others = sorted(e for e in _EXTRAS if e not in allowed)
        # src uses every main dependency; tests and bench may use them without using all of them
        unused_ok = set() if part == "src" else _MAIN - set().union(*(_EXTRAS[e] for e in allowed))
        failed |= _deptry(part, others, unused_ok, allowed)
    failed |= _deptry(LANGGRAPH_APP, [], set(), (), project=REPO / LANGGRAPH_APP)
    stale = set(NOT_IMPORTED) - _MAIN - set().union(*_EXTRAS.values()) - _LANGGRAPH
    if stale:
        print(f"scripts/check_dependencies.py: NOT_IMPORTED names undeclared packages: {sorted(stale)}")
        failed = 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
