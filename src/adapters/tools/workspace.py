"""The directory tree the git tools may touch, and the path checks that keep them inside it."""

from __future__ import annotations

import posixpath
from pathlib import Path, PurePosixPath

from domain.model.errors import ToolFailure

# Paths come from a model; keep error messages short even when the path is not.
_MAX_SHOWN_PATH = 200


def shown(path: str) -> str:
    """A caller-given path quoted and bounded for an error message or summary."""
    if len(path) > _MAX_SHOWN_PATH:
        path = path[:_MAX_SHOWN_PATH] + "…"
    return repr(path)


class Workspace:
    """A root directory holding git repositories. Every repository and file path a tool receives
    is relative to it and must stay inside it, symlinks included. Error messages quote only the
    relative path the caller gave, never the absolute root."""

    def __init__(self, root: Path) -> None:
        resolved = root.resolve()
        if not resolved.is_dir():
            # A configuration error, raised at start-up rather than on the first tool call.
            raise ValueError(f"workspace root {root} is not a directory")
        self._root = resolved

    @property
    def root(self) -> Path:
        return self._root

    def resolve_repo(self, repo_path: str) -> Path:
        """The absolute, symlink-free path of the repository at `repo_path` (relative to the root;
        "." is the root itself). Only the top directory of a git work tree is accepted: git must
        never discover a repository above the one named, least of all outside the workspace."""
        _reject_unusable(repo_path, "Repository path")
        if PurePosixPath(repo_path).is_absolute():
            raise _outside(f"Repository path {shown(repo_path)} must be relative to the workspace.")
        candidate = _resolve(self._root / repo_path, repo_path, "Repository path")
        if not candidate.is_relative_to(self._root):
            raise _outside(f"Repository path {shown(repo_path)} is outside the workspace.")
        if not candidate.is_dir():
            raise ToolFailure(f"Repository {shown(repo_path)} does not exist in the workspace.",
                              code="repo_not_found")
        if not (candidate / ".git").exists():
            raise ToolFailure(f"{shown(repo_path)} is not a git repository (no .git at its top).",
                              code="not_a_repository")
        if not self._git_dir_inside(candidate):
            # Its configuration, hooks and objects would come from outside the workspace.
            raise _outside(f"The git directory of {shown(repo_path)} is outside the workspace.")
        return candidate

    def _git_dir_inside(self, repo: Path) -> bool:
        """Whether `.git` (a directory, a symlink, or a file naming the git directory as linked
        worktrees and submodules have it) and the common directory it names stay in the workspace."""
        dot_git = repo / ".git"
        try:
            git_dir = dot_git.resolve()
            if dot_git.is_file():
                pointer = dot_git.read_text("utf-8", errors="replace").strip()
                if not pointer.startswith("gitdir:"):
                    return False
                git_dir = (repo / pointer.removeprefix("gitdir:").strip()).resolve()
            common = git_dir / "commondir"
            if common.is_file():
                if not git_dir.is_relative_to(self._root):
                    return False
                git_dir = (git_dir / common.read_text("utf-8", errors="replace").strip()).resolve()
        except (OSError, RuntimeError):
            return False
        return git_dir.is_relative_to(self._root)

    def resolve_inside(self, repo: Path, file_path: str) -> str:
        """`file_path` as a normalised path relative to `repo` (a path from `resolve_repo`), the
        form git expects. The path may name a file that no longer exists (a deleted file, an old
        commit); it is refused when it leaves the repository lexically or through a symlink."""
        _reject_unusable(file_path, "File path")
        if not repo.is_relative_to(self._root):
            raise _outside("The repository is outside the workspace.")
        if PurePosixPath(file_path).is_absolute():
            raise _outside(f"File path {shown(file_path)} must be relative to the repository.")
        # git reads pathspecs and tree paths lexically, so this is the path it will use.
        relative = posixpath.normpath(file_path)
        if relative == ".." or relative.startswith("../"):
            raise _outside(f"File path {shown(file_path)} is outside the repository.")
        if not _resolve(repo / relative, file_path, "File path").is_relative_to(repo):
            raise _outside(f"File path {shown(file_path)} leads outside the repository through a symlink.")
        return relative


def _reject_unusable(path: str, what: str) -> None:
    if not path:
        raise ToolFailure(f"{what} must not be empty.", code="invalid_path")
    if "\x00" in path:
        # The OS refuses NUL bytes in paths and argv; say so instead of failing deep inside.
        raise ToolFailure(f"{what} must not contain NUL characters.", code="invalid_path")


def _resolve(path: Path, given: str, what: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python 3.11)
        raise ToolFailure(f"{what} {shown(given)} cannot be resolved.", code="invalid_path") from None


def _outside(message: str) -> ToolFailure:
    return ToolFailure(message, code="path_outside_workspace")
