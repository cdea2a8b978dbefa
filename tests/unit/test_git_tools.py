"""The git tools against real repositories built with the git binary in a temporary workspace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from adapters.tools import (
    GitLogTool,
    GitRunner,
    GitShowFileTool,
    Workspace,
    git_tools,
)
from domain.model.errors import InvalidInput, ToolFailure
from domain.model.identity import Principal
from domain.model.tools import Tool, ToolContext, ToolRegistry
from tests.defaults import DEFAULTS, GIT_LIMITS

CONTEXT = ToolContext(
    principal=Principal(user_id="u1", tenant_id="t1", actor_id="u1"),
    trace_id="trace-1",
    run_id="run-1",
)
FIRST_TIME = 1_700_000_000
SECOND_TIME = 1_700_000_100
SETUP_ENV = {
    "PATH": os.environ.get("PATH", os.defpath),
    "LC_ALL": "C",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "Alice",
    "GIT_AUTHOR_EMAIL": "alice@example.com",
    "GIT_COMMITTER_NAME": "Alice",
    "GIT_COMMITTER_EMAIL": "alice@example.com",
}


def git(repo: Path, *args: str, when: int | None = None) -> str:
    """Set up repositories with the real git binary, independent of the code under test."""
    env = dict(SETUP_ENV)
    if when is not None:
        env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = f"{when} +0000"
    done = subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def init_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "--quiet", "--initial-branch=main")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    workspace_root = tmp_path / "workspace"
    workspace_root.mkdir()
    return workspace_root


@pytest.fixture
def project(root: Path) -> Path:
    """main: 'Initial commit' (README.md) then 'Add app' (app.py); branch 'feature' at the first."""
    repo = init_repo(root / "project")
    (repo / "README.md").write_text("hello\n")
    git(repo, "add", "README.md")
    git(repo, "commit", "--quiet", "-m", "Initial commit", when=FIRST_TIME)
    git(repo, "branch", "feature")
    (repo / "app.py").write_text("print('hi')\n")
    git(repo, "add", "app.py")
    git(repo, "commit", "--quiet", "-m", "Add app", when=SECOND_TIME)
    return repo


@pytest.fixture
def workspace(root: Path) -> Workspace:
    return Workspace(root)


@pytest.fixture
def registry(workspace: Workspace) -> ToolRegistry:
    return ToolRegistry(git_tools(workspace, **GIT_LIMITS))


async def call(registry: ToolRegistry, name: str, args: Mapping[str, Any]) -> Any:
    """Validate like the agent does, run, and check the result crosses the wire as JSON."""
    result = await registry.get(name).run(registry.validate(name, args), CONTEXT)
    assert json.loads(json.dumps(result)) == result
    return result


async def failure(registry: ToolRegistry, name: str, args: Mapping[str, Any]) -> ToolFailure:
    with pytest.raises(ToolFailure) as caught:
        await call(registry, name, args)
    return caught.value


# --- workspace ---------------------------------------------------------------------------------

def test_resolve_repo_returns_the_real_path_of_a_repository(workspace: Workspace, project: Path) -> None:
    assert workspace.resolve_repo("project") == project.resolve()
    assert workspace.resolve_repo("./other/../project") == project.resolve()


def test_the_root_itself_may_be_a_repository(tmp_path: Path) -> None:
    repo = init_repo(tmp_path / "single")
    assert Workspace(repo).resolve_repo(".") == repo.resolve()


def test_workspace_root_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        Workspace(tmp_path / "missing")


@pytest.mark.parametrize(
    ("repo_path", "code", "message"),
    [
        ("/etc", "path_outside_workspace", "Repository path '/etc' must be relative to the workspace."),
        ("../outside", "path_outside_workspace", "Repository path '../outside' is outside the workspace."),
        ("project/../..", "path_outside_workspace", "Repository path 'project/../..' is outside the workspace."),
        ("escape", "path_outside_workspace", "Repository path 'escape' is outside the workspace."),
        ("missing", "repo_not_found", "Repository 'missing' does not exist in the workspace."),
        ("notes.txt", "repo_not_found", "Repository 'notes.txt' does not exist in the workspace."),
        ("plain", "not_a_repository", "'plain' is not a git repository (no .git at its top)."),
        ("project/src", "not_a_repository", "'project/src' is not a git repository (no .git at its top)."),
        ("", "invalid_path", "Repository path must not be empty."),
        ("pro\x00ject", "invalid_path", "Repository path must not contain NUL characters."),
    ],
)
def test_resolve_repo_refusals(
    workspace: Workspace, root: Path, project: Path, tmp_path: Path, repo_path: str, code: str, message: str,
) -> None:
    (root / "escape").symlink_to(init_repo(tmp_path / "outside"))  # a real repository, but outside
    (root / "notes.txt").write_text("not a directory\n")
    (root / "plain").mkdir()
    (project / "src").mkdir()
    with pytest.raises(ToolFailure) as caught:
        workspace.resolve_repo(repo_path)
    assert (caught.value.code, caught.value.message) == (code, message)
    assert str(tmp_path) not in caught.value.message


def test_resolve_inside_returns_a_normalised_repository_relative_path(workspace: Workspace, project: Path) -> None:
    repo = workspace.resolve_repo("project")
    assert workspace.resolve_inside(repo, "src/../README.md") == "README.md"
    assert workspace.resolve_inside(repo, "./docs/guide.md") == "docs/guide.md"
    assert workspace.resolve_inside(repo, "deleted-long-ago.txt") == "deleted-long-ago.txt"


@pytest.mark.parametrize(
    ("file_path", "code", "message"),
    [
        ("/etc/passwd", "path_outside_workspace", "File path '/etc/passwd' must be relative to the repository."),
        ("../other/file", "path_outside_workspace", "File path '../other/file' is outside the repository."),
        ("a/../../x", "path_outside_workspace", "File path 'a/../../x' is outside the repository."),
        ("secret", "path_outside_workspace", "File path 'secret' leads outside the repository through a symlink."),
        ("", "invalid_path", "File path must not be empty."),
    ],
)
def test_resolve_inside_refusals(
    workspace: Workspace, project: Path, tmp_path: Path, file_path: str, code: str, message: str,
) -> None:
    (project / "secret").symlink_to(tmp_path / "outside-file")
    with pytest.raises(ToolFailure) as caught:
        workspace.resolve_inside(workspace.resolve_repo("project"), file_path)
    assert (caught.value.code, caught.value.message) == (code, message)


# --- specs and schemas ----------------------------------------------------------------------------

def test_the_tools_their_approval_flags_and_action_types(workspace: Workspace) -> None:
    tools = git_tools(workspace, **GIT_LIMITS)
    specs = {tool.spec.name: (tool.spec.requires_approval, tool.spec.action_type) for tool in tools}
    assert specs == {
        "git_status": (False, "read"),
        "git_log": (False, "read"),
        "git_diff": (False, "read"),
        "git_show_file": (False, "read"),
        "git_branches": (False, "read"),
        "git_create_branch": (True, "git_create_branch"),
        "git_commit": (True, "git_commit"),
    }
    registry = ToolRegistry(git_tools(workspace, **GIT_LIMITS))
    assert registry.needs_approval("git_commit", {}) is True
    assert registry.needs_approval("git_create_branch", {}) is True
    assert registry.needs_approval("git_log", {}) is False


def test_every_schema_is_a_closed_object_with_described_properties(workspace: Workspace) -> None:
    for tool in git_tools(workspace, **GIT_LIMITS):
        schema = tool.spec.parameters
        assert schema["type"] == "object"
        assert schema["additionalProperties"] is False
        assert "repo_path" in schema["required"]
        for name, prop in schema["properties"].items():
            assert prop["description"], f"{tool.spec.name}.{name} has no description"
            assert (name in schema["required"]) != ("default" in prop), f"{tool.spec.name}.{name}"


@pytest.mark.parametrize(
    ("name", "args", "filled"),
    [
        ("git_status", {"repo_path": "p"}, {"repo_path": "p"}),
        ("git_log", {"repo_path": "p"}, {"repo_path": "p", "limit": 10, "branch": "HEAD"}),
        ("git_diff", {"repo_path": "p"}, {"repo_path": "p", "branch": "HEAD", "file_path": None}),
        ("git_show_file", {"repo_path": "p", "file_path": "f"}, {"repo_path": "p", "file_path": "f", "commit": "HEAD"}),
        ("git_branches", {"repo_path": "p"}, {"repo_path": "p", "remote": False}),
        ("git_create_branch", {"repo_path": "p", "name": "b"}, {"repo_path": "p", "name": "b", "start_point": "HEAD"}),
        ("git_commit", {"repo_path": "p", "message": "m"}, {"repo_path": "p", "message": "m"}),
    ],
)
def test_validation_fills_defaults(
    registry: ToolRegistry, name: str, args: dict[str, Any], filled: dict[str, Any],
) -> None:
    assert registry.validate(name, args) == filled


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("git_status", {"repo_path": "p", "force": True},
         "Invalid arguments for git_status at arguments: "
         "Additional properties are not allowed ('force' was unexpected)"),
        ("git_log", {"repo_path": "p", "limit": 0},
         "Invalid arguments for git_log at limit: 0 is less than the minimum of 1"),
        ("git_log", {"repo_path": "p", "limit": 201},
         "Invalid arguments for git_log at limit: 201 is greater than the maximum of 200"),
        ("git_log", {"repo_path": "p", "limit": "5"},
         "Invalid arguments for git_log at limit: '5' is not of type 'integer'"),
        ("git_show_file", {"repo_path": "p"},
         "Invalid arguments for git_show_file at arguments: 'file_path' is a required property"),
        ("git_commit", {"repo_path": "p", "message": ""},
         "Invalid arguments for git_commit at message: '' should be non-empty"),
    ],
)
def test_schema_rejections(registry: ToolRegistry, name: str, args: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        registry.validate(name, args)
    assert (caught.value.code, caught.value.message) == ("invalid_tool_arguments", message)


# --- git_status ------------------------------------------------------------------------------------

async def test_status_of_a_clean_repository(registry: ToolRegistry, project: Path) -> None:
    assert await call(registry, "git_status", {"repo_path": "project"}) == {
        "branch": "main",
        "clean": True,
        "entries": [],
        "summary": "On branch main; the working tree is clean.",
    }


async def test_status_lists_staged_unstaged_and_untracked_files(registry: ToolRegistry, project: Path) -> None:
    (project / "README.md").write_text("hello again\n")
    git(project, "add", "README.md")
    (project / "README.md").write_text("hello a third time\n")
    (project / "app.py").unlink()
    (project / "new file.txt").write_text("new\n")
    assert await call(registry, "git_status", {"repo_path": "project"}) == {
        "branch": "main",
        "clean": False,
        "entries": [
            {"path": "README.md", "index": "modified", "worktree": "modified"},
            {"path": "app.py", "index": "unmodified", "worktree": "deleted"},
            {"path": "new file.txt", "index": "untracked", "worktree": "untracked"},
        ],
        "summary": "On branch main; 1 staged, 2 unstaged, 1 untracked.",
    }


async def test_status_reports_renames_by_their_new_path(registry: ToolRegistry, project: Path) -> None:
    git(project, "mv", "app.py", "main.py")
    result = await call(registry, "git_status", {"repo_path": "project"})
    assert result["entries"] == [{"path": "main.py", "index": "renamed", "worktree": "unmodified"}]
    assert result["summary"] == "On branch main; 1 staged."


async def test_status_reports_merge_conflicts(registry: ToolRegistry, project: Path) -> None:
    git(project, "checkout", "--quiet", "feature")
    (project / "README.md").write_text("feature side\n")
    git(project, "commit", "--quiet", "-am", "Feature readme")
    git(project, "checkout", "--quiet", "main")
    (project / "README.md").write_text("main side\n")
    git(project, "commit", "--quiet", "-am", "Main readme")
    with pytest.raises(subprocess.CalledProcessError):
        git(project, "merge", "feature")
    result = await call(registry, "git_status", {"repo_path": "project"})
    assert result["entries"] == [{"path": "README.md", "index": "unmerged", "worktree": "unmerged"}]
    assert result["summary"] == "On branch main; 1 conflicted."


async def test_status_on_a_detached_head(registry: ToolRegistry, project: Path) -> None:
    git(project, "checkout", "--quiet", "--detach", "HEAD~1")
    result = await call(registry, "git_status", {"repo_path": "project"})
    assert (result["branch"], result["clean"], result["summary"]) == (
        None, True, "HEAD is detached; the working tree is clean.")


async def test_status_truncated_output_is_never_called_clean(workspace: Workspace, project: Path) -> None:
    for number in range(20):
        (project / f"untracked-{number:02}.txt").write_text("x\n")
    status = ToolRegistry(git_tools(workspace, timeout_seconds=DEFAULTS.tools.timeout_seconds, max_output_bytes=100))
    result = await call(status, "git_status", {"repo_path": "project"})
    assert result["clean"] is False
    assert result["entries"] == [
        {"path": "untracked-00.txt", "index": "untracked", "worktree": "untracked"},
    ]
    assert result["summary"] == "On branch main; 1 untracked. Output truncated at the size limit."


# --- git_log ---------------------------------------------------------------------------------------

async def test_log_defaults_to_head_newest_first(registry: ToolRegistry, project: Path) -> None:
    first, second = git(project, "rev-parse", "HEAD~1"), git(project, "rev-parse", "HEAD")
    assert await call(registry, "git_log", {"repo_path": "project"}) == {
        "commits": [
            {"commit": second, "author": "Alice", "timestamp": SECOND_TIME, "subject": "Add app"},
            {"commit": first, "author": "Alice", "timestamp": FIRST_TIME, "subject": "Initial commit"},
        ],
        "summary": f"2 commits from HEAD, newest first; latest is {second[:7]} by Alice: Add app",
    }


async def test_log_limit_and_branch(registry: ToolRegistry, project: Path) -> None:
    first = git(project, "rev-parse", "HEAD~1")
    assert await call(registry, "git_log", {"repo_path": "project", "branch": "feature", "limit": 1}) == {
        "commits": [{"commit": first, "author": "Alice", "timestamp": FIRST_TIME, "subject": "Initial commit"}],
        "summary": f"1 commit from feature, newest first; latest is {first[:7]} by Alice: Initial commit",
    }
    result = await call(registry, "git_log", {"repo_path": "project", "limit": 1})
    assert [commit["subject"] for commit in result["commits"]] == ["Add app"]


@pytest.mark.parametrize("branch", ["--all", "-p", "--output=/tmp/pwned"])
async def test_log_refuses_option_injection(registry: ToolRegistry, project: Path, branch: str) -> None:
    error = await failure(registry, "git_log", {"repo_path": "project", "branch": branch})
    assert (error.code, error.message) == ("invalid_ref", f"branch {branch!r} is not a valid revision or branch name.")


async def test_log_of_an_unknown_branch_is_a_git_error(registry: ToolRegistry, project: Path) -> None:
    error = await failure(registry, "git_log", {"repo_path": "project", "branch": "nope"})
    assert (error.code, error.message) == ("git_error", "fatal: bad revision 'nope'")


async def test_log_refuses_a_repository_outside_the_workspace(registry: ToolRegistry, project: Path) -> None:
    error = await failure(registry, "git_log", {"repo_path": "../project"})
    assert error.code == "path_outside_workspace"


# --- git_diff --------------------------------------------------------------------------------------

def _blob(repo: Path, spec: str) -> str:
    return git(repo, "rev-parse", "--short=7", spec)


async def test_diff_compares_the_working_tree_with_head(registry: ToolRegistry, project: Path) -> None:
    old_blob = _blob(project, "HEAD:README.md")
    (project / "README.md").write_text("hello\nworld\n")
    git(project, "add", "README.md")  # staged changes count too: the working tree is compared
    (project / "app.py").write_text("print('bye')\n")
    readme_blob = git(project, "hash-object", "README.md")[:7]
    app_old, app_new = _blob(project, "HEAD:app.py"), git(project, "hash-object", "app.py")[:7]
    assert await call(registry, "git_diff", {"repo_path": "project"}) == {
        "diff": (
            "diff --git a/README.md b/README.md\n"
            f"index {old_blob}..{readme_blob} 100644\n"
            "--- a/README.md\n"
            "+++ b/README.md\n"
            "@@ -1 +1,2 @@\n"
            " hello\n"
            "+world\n"
            "diff --git a/app.py b/app.py\n"
            f"index {app_old}..{app_new} 100644\n"
            "--- a/app.py\n"
            "+++ b/app.py\n"
            "@@ -1 +1 @@\n"
            "-print('hi')\n"
            "+print('bye')\n"
        ),
        "truncated": False,
        "files_changed": 2,
        "summary": "2 files changed, 2 insertions(+), 1 deletion(-) between the working tree and HEAD.",
    }


async def test_diff_of_one_file_against_a_branch(registry: ToolRegistry, project: Path) -> None:
    (project / "README.md").write_text("changed\n")
    result = await call(registry, "git_diff", {"repo_path": "project", "branch": "feature", "file_path": "app.py"})
    assert result["files_changed"] == 1
    assert result["diff"].startswith("diff --git a/app.py b/app.py\nnew file mode 100644\n")
    assert "README.md" not in result["diff"]
    assert result["summary"] == "1 file changed, 1 insertion(+) between the working tree and feature in 'app.py'."


async def test_diff_without_changes(registry: ToolRegistry, project: Path) -> None:
    assert await call(registry, "git_diff", {"repo_path": "project"}) == {
        "diff": "",
        "truncated": False,
        "files_changed": 0,
        "summary": "No differences between the working tree and HEAD.",
    }


async def test_diff_file_path_is_literal_not_a_pathspec_pattern(registry: ToolRegistry, project: Path) -> None:
    (project / "README.md").write_text("changed\n")
    result = await call(registry, "git_diff", {"repo_path": "project", "file_path": "*.md"})
    assert (result["files_changed"], result["diff"]) == (0, "")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ({"file_path": "../../etc/passwd"}, "path_outside_workspace"),
        ({"file_path": "/etc/passwd"}, "path_outside_workspace"),
        ({"branch": "--output=/tmp/x"}, "invalid_ref"),
    ],
)
async def test_diff_refusals(registry: ToolRegistry, project: Path, args: dict[str, Any], code: str) -> None:
    error = await failure(registry, "git_diff", {"repo_path": "project", **args})
    assert error.code == code


async def test_diff_is_truncated_at_the_output_limit(workspace: Workspace, project: Path) -> None:
    (project / "README.md").write_text("".join(f"line {number}\n" for number in range(1000)))
    small = ToolRegistry(git_tools(workspace, timeout_seconds=DEFAULTS.tools.timeout_seconds, max_output_bytes=100))
    result = await call(small, "git_diff", {"repo_path": "project"})
    assert result["truncated"] is True
    assert len(result["diff"].encode()) == 100
    assert result["diff"].startswith("diff --git a/README.md b/README.md\n")
    assert result["files_changed"] == 1
    assert result["summary"] == (
        "1 file changed, 1000 insertions(+), 1 deletion(-) between the working tree and HEAD. "
        "Output truncated at the size limit."
    )


# --- git_show_file ---------------------------------------------------------------------------------

async def test_show_file_at_head_and_at_an_older_commit(registry: ToolRegistry, project: Path) -> None:
    (project / "README.md").write_text("uncommitted\n")  # the working tree is not what is shown
    assert await call(registry, "git_show_file", {"repo_path": "project", "file_path": "README.md"}) == {
        "content": "hello\n",
        "truncated": False,
        "summary": "'README.md' at HEAD: 1 line, 6 bytes.",
    }
    git(project, "commit", "--quiet", "-am", "Rewrite readme")
    result = await call(registry, "git_show_file", {"repo_path": "project", "file_path": "./README.md",
                                                    "commit": "HEAD~1"})
    assert (result["content"], result["summary"]) == ("hello\n", "'README.md' at HEAD~1: 1 line, 6 bytes.")


async def test_show_file_that_does_not_exist_at_the_commit(registry: ToolRegistry, project: Path) -> None:
    error = await failure(registry, "git_show_file", {"repo_path": "project", "file_path": "gone.py",
                                                      "commit": "feature"})
    assert (error.code, error.message) == ("git_error", "fatal: path 'gone.py' does not exist in 'feature'")


async def test_show_file_of_a_binary_file(registry: ToolRegistry, project: Path) -> None:
    (project / "logo.bin").write_bytes(b"\x89PNG\x00\x01\x02")
    git(project, "add", "logo.bin")
    git(project, "commit", "--quiet", "-m", "Add logo")
    assert await call(registry, "git_show_file", {"repo_path": "project", "file_path": "logo.bin"}) == {
        "content": "",
        "truncated": False,
        "summary": "'logo.bin' at HEAD is a binary file; its content is not shown.",
    }


async def test_show_file_is_truncated_without_splitting_a_character(workspace: Workspace, project: Path) -> None:
    (project / "notes.txt").write_text("é" * 100)  # two bytes each
    git(project, "add", "notes.txt")
    git(project, "commit", "--quiet", "-m", "Add notes")
    small = ToolRegistry(git_tools(workspace, timeout_seconds=DEFAULTS.tools.timeout_seconds, max_output_bytes=11))
    assert await call(small, "git_show_file", {"repo_path": "project", "file_path": "notes.txt"}) == {
        "content": "é" * 5,
        "truncated": True,
        "summary": "'notes.txt' at HEAD: the first 11 bytes are shown. Output truncated at the size limit.",
    }


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ({"file_path": "../outside.txt"}, "path_outside_workspace"),
        ({"file_path": "README.md", "commit": "-p"}, "invalid_ref"),
        ({"file_path": "README.md", "commit": "HEAD\n--all"}, "invalid_ref"),
    ],
)
async def test_show_file_refusals(registry: ToolRegistry, project: Path, args: dict[str, Any], code: str) -> None:
    error = await failure(registry, "git_show_file", {"repo_path": "project", **args})
    assert error.code == code


# --- git_branches ----------------------------------------------------------------------------------

async def test_branches_lists_local_branches(registry: ToolRegistry, project: Path) -> None:
    assert await call(registry, "git_branches", {"repo_path": "project"}) == {
        "current": "main",
        "branches": ["feature", "main"],
        "summary": "2 local branches: feature, main; current: main.",
    }


async def test_branches_with_remote_tracking_branches(registry: ToolRegistry, project: Path) -> None:
    git(project, "update-ref", "refs/remotes/origin/main", "HEAD")
    git(project, "symbolic-ref", "refs/remotes/origin/HEAD", "refs/remotes/origin/main")
    assert (await call(registry, "git_branches", {"repo_path": "project"}))["branches"] == ["feature", "main"]
    assert await call(registry, "git_branches", {"repo_path": "project", "remote": True}) == {
        "current": "main",
        "branches": ["feature", "main", "origin/main"],
        "summary": "3 local and remote-tracking branches: feature, main, origin/main; current: main.",
    }


async def test_branches_on_a_detached_head(registry: ToolRegistry, project: Path) -> None:
    git(project, "checkout", "--quiet", "--detach", "HEAD")
    result = await call(registry, "git_branches", {"repo_path": "project"})
    assert (result["current"], result["summary"]) == (
        None, "2 local branches: feature, main; HEAD is detached or has no commits.")


# --- git_create_branch -----------------------------------------------------------------------------

async def test_create_branch_really_creates_it_without_checking_it_out(registry: ToolRegistry, project: Path) -> None:
    head = git(project, "rev-parse", "HEAD")
    assert await call(registry, "git_create_branch", {"repo_path": "project", "name": "topic/login"}) == {
        "branch": "topic/login",
        "commit": head,
        "summary": f"Created branch topic/login at {head[:7]} from HEAD (not checked out).",
    }
    assert git(project, "rev-parse", "refs/heads/topic/login") == head
    assert git(project, "symbolic-ref", "--short", "HEAD") == "main"


async def test_create_branch_from_a_start_point(registry: ToolRegistry, project: Path) -> None:
    first = git(project, "rev-parse", "HEAD~1")
    result = await call(registry, "git_create_branch",
                        {"repo_path": "project", "name": "hotfix", "start_point": "feature"})
    assert (result["branch"], result["commit"]) == ("hotfix", first)
    assert git(project, "rev-parse", "refs/heads/hotfix") == first


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ({"name": "feature"}, "branch_exists", "Branch 'feature' already exists."),
        ({"name": "-D"}, "invalid_ref", "name '-D' is not a valid revision or branch name."),
        ({"name": "bad..name"}, "invalid_ref", "'bad..name' is not a valid branch name."),
        ({"name": "has space"}, "invalid_ref", "'has space' is not a valid branch name."),
        ({"name": "@{-1}"}, "invalid_ref", "'@{-1}' is not a valid branch name."),
        ({"name": "ok", "start_point": "--orphan"}, "invalid_ref",
         "start_point '--orphan' is not a valid revision or branch name."),
        ({"name": "ok", "start_point": "nope"}, "git_error", "Start point 'nope' is not a known commit."),
    ],
)
async def test_create_branch_refusals(
    registry: ToolRegistry, project: Path, args: dict[str, Any], code: str, message: str,
) -> None:
    error = await failure(registry, "git_create_branch", {"repo_path": "project", **args})
    assert (error.code, error.message) == (code, message)
    assert git(project, "for-each-ref", "--format=%(refname:short)", "refs/heads") == "feature\nmain"


# --- git_commit ------------------------------------------------------------------------------------

async def test_commit_records_what_is_staged_with_the_configured_author(registry: ToolRegistry, project: Path) -> None:
    (project / "README.md").write_text("staged\n")
    git(project, "add", "README.md")
    (project / "app.py").write_text("not staged\n")
    result = await call(registry, "git_commit", {"repo_path": "project", "message": "Update readme\n\nBecause."})
    head = git(project, "rev-parse", "HEAD")
    assert result == {"commit": head, "summary": f"Committed {head[:7]}: Update readme"}
    assert git(project, "log", "-1", "--format=%an <%ae>|%cn <%ce>|%B") == (
        "Aura <aura@localhost>|Aura <aura@localhost>|Update readme\n\nBecause.")
    assert git(project, "show", "--name-only", "--format=", "HEAD") == "README.md"
    assert git(project, "status", "--porcelain") == "M app.py"


async def test_commit_with_a_custom_author_and_a_message_that_looks_like_an_option(
    workspace: Workspace, project: Path,
) -> None:
    registry = ToolRegistry(git_tools(workspace, **GIT_LIMITS, author_name="Bot", author_email="bot@example.com"))
    (project / "README.md").write_text("staged\n")
    git(project, "add", "README.md")
    await call(registry, "git_commit", {"repo_path": "project", "message": "--amend"})
    assert git(project, "log", "-1", "--format=%an <%ae>|%s") == "Bot <bot@example.com>|--amend"
    assert git(project, "rev-list", "--count", "HEAD") == "3"


async def test_commit_with_nothing_staged(registry: ToolRegistry, project: Path) -> None:
    (project / "README.md").write_text("changed but not staged\n")
    head = git(project, "rev-parse", "HEAD")
    error = await failure(registry, "git_commit", {"repo_path": "project", "message": "Nothing"})
    assert (error.code, error.message) == ("nothing_to_commit", "Nothing is staged, so there is nothing to commit.")
    assert git(project, "rev-parse", "HEAD") == head


async def test_the_first_commit_of_an_empty_repository(registry: ToolRegistry, root: Path) -> None:
    repo = init_repo(root / "fresh")
    (repo / "a.txt").write_text("a\n")
    git(repo, "add", "a.txt")
    result = await call(registry, "git_commit", {"repo_path": "fresh", "message": "First"})
    assert result["commit"] == git(repo, "rev-parse", "HEAD")
    assert await call(registry, "git_branches", {"repo_path": "fresh"}) == {
        "current": "main", "branches": ["main"], "summary": "1 local branch: main; current: main.",
    }


async def test_commit_ignores_repository_hooks(registry: ToolRegistry, project: Path) -> None:
    hook = project / ".git" / "hooks" / "pre-commit"
    hook.write_text(f"#!/bin/sh\necho ran > {project / 'hook-ran'}\nexit 1\n")
    hook.chmod(0o755)
    (project / "README.md").write_text("staged\n")
    git(project, "add", "README.md")
    await call(registry, "git_commit", {"repo_path": "project", "message": "Hooks stay off"})
    assert git(project, "log", "-1", "--format=%s") == "Hooks stay off"
    assert not (project / "hook-ran").exists()


async def test_a_blank_message_is_refused(registry: ToolRegistry, project: Path) -> None:
    error = await failure(registry, "git_commit", {"repo_path": "project", "message": "  \n"})
    assert (error.code, error.message) == ("invalid_tool_arguments", "message must not be blank.")


# --- git errors, environment, limits -------------------------------------------------------------

async def test_git_errors_never_show_the_absolute_workspace_path(
    registry: ToolRegistry, workspace: Workspace, project: Path,
) -> None:
    (project / "README.md").write_text("staged\n")
    git(project, "add", "README.md")
    (project / ".git" / "index.lock").write_text("")  # another git process seems to be running
    error = await failure(registry, "git_commit", {"repo_path": "project", "message": "Blocked"})
    assert error.code == "git_error"
    assert error.message == "fatal: Unable to create '<workspace>/project/.git/index.lock': File exists."
    assert str(workspace.root) not in error.message


async def test_an_inherited_git_environment_cannot_redirect_the_tools(
    registry: ToolRegistry, project: Path, root: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = init_repo(root / "other")
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    monkeypatch.setenv("GIT_WORK_TREE", str(other))
    result = await call(registry, "git_log", {"repo_path": "project", "limit": 1})
    assert [commit["subject"] for commit in result["commits"]] == ["Add app"]


def _fake_git(tmp_path: Path, body: str) -> str:
    """An executable standing in for git, to make it hang or flood its output. It answers the
    runner's reading of the repository's configuration with an empty one."""
    script = tmp_path / "fake-git"
    script.write_text(f"#!{sys.executable}\nimport sys\nif 'config' in sys.argv: sys.exit(0)\n{body}\n")
    script.chmod(0o755)
    return str(script)


async def test_a_hanging_git_is_killed_at_the_timeout(workspace: Workspace, project: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    # The shell records its pid at once, then becomes a Python process that waits for a signal.
    fake = tmp_path / "fake-git"
    fake.write_text(f"#!/bin/sh\necho $$ > '{pid_file}'\nexec '{sys.executable}' -c 'import signal; signal.pause()'\n")
    fake.chmod(0o755)
    runner = GitRunner(timeout_seconds=0.5, max_output_bytes=1000, author_name="A", author_email="a@b",
                       executable=str(fake))
    tool: Tool = GitLogTool(workspace, runner)
    with pytest.raises(ToolFailure) as caught:
        await tool.run({"repo_path": "project"}, CONTEXT)
    assert (caught.value.code, caught.value.message, caught.value.retryable) == (
        "tool_timeout", "git log timed out after 0.5 s.", True)
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(int(pid_file.read_text()), 0)


async def test_endless_output_is_cut_at_the_limit_and_git_is_stopped(
    workspace: Workspace, project: Path, tmp_path: Path,
) -> None:
    # Without stopping the producer at the limit this would end in a timeout, not a result.
    fake = _fake_git(tmp_path, "import sys\nwhile True:\n    sys.stdout.write('y\\n' * 1000)")
    runner = GitRunner(timeout_seconds=30, max_output_bytes=4096, author_name="A", author_email="a@b", executable=fake)
    tool: Tool = GitShowFileTool(workspace, runner)
    result = await tool.run({"repo_path": "project", "file_path": "README.md"}, CONTEXT)
    assert result == {
        "content": "y\n" * 2048,
        "truncated": True,
        "summary": "'README.md' at HEAD: the first 4096 bytes are shown. Output truncated at the size limit.",
    }


async def test_a_missing_git_binary_is_a_tool_failure(workspace: Workspace, project: Path, tmp_path: Path) -> None:
    runner = GitRunner(timeout_seconds=5, max_output_bytes=100, author_name="A", author_email="a@b",
                       executable=str(tmp_path / "no-such-git"))
    with pytest.raises(ToolFailure) as caught:
        await GitLogTool(workspace, runner).run({"repo_path": "project"}, CONTEXT)
    assert (caught.value.code, caught.value.message) == ("git_error", "git could not be started.")


@pytest.mark.parametrize(("timeout", "size"), [(0, 100), (1, 0)])
def test_runner_limits_must_be_positive(timeout: float, size: int) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        GitRunner(timeout_seconds=timeout, max_output_bytes=size, author_name="A", author_email="a@b")
