"""`aura serve --dev` without a workspace of one's own: a throw-away workspace whose root and whose
`demo` folder are git repositories, so the README's examples (`"repo_path": "demo"`) and the offline
model's keyword plans (the workspace root) work on a fresh machine. It is removed when Aura exits."""

from __future__ import annotations

import atexit
import shutil
import subprocess  # nosec B404 # runs git only, with fixed arguments, never a shell
import tempfile
from pathlib import Path

_AUTHOR = ["-c", "user.name=Aura Demo", "-c", "user.email=demo@aura.invalid", "-c", "commit.gpgsign=false"]


def _git(repo: Path, *args: str) -> None:
    git = shutil.which("git") or "git"
    subprocess.run([git, *_AUTHOR, *args], cwd=repo, check=True, capture_output=True, timeout=30)  # nosec B603 # fixed arguments


def _repository(path: Path, files: dict[str, str], message: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    _git(path, "init", "-q", "-b", "main")
    for name, text in files.items():
        (path / name).write_text(text, encoding="utf-8")
    _git(path, "add", "--", *files)
    _git(path, "commit", "-q", "-m", message)


def demo_workspace() -> Path | None:
    """A new demo workspace, or None when git is not installed (the git tools need it anyway)."""
    if shutil.which("git") is None:
        return None
    root = Path(tempfile.mkdtemp(prefix="aura-dev-workspace-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    _repository(root, {"README.md": "# A throw-away workspace of `aura serve --dev`\n"}, "Start the workspace")
    demo = root / "demo"
    _repository(demo, {"README.md": "# demo\n\nA small repository to try Aura's git tools on.\n",
                       "app.py": "print('hello')\n"}, "Initial commit")
    (demo / "app.py").write_text("print('hello, Aura')\n", encoding="utf-8")
    _git(demo, "add", "app.py")
    _git(demo, "commit", "-q", "-m", "Greet Aura")
    (demo / "notes.txt").write_text("an untracked file\n", encoding="utf-8")
    (demo / "README.md").write_text("# demo\n\nA small repository to try Aura's git tools on (edited).\n",
                                    encoding="utf-8")
    return root
