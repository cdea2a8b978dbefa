"""No repository or host configuration makes a git tool run another program.

Each vector builds a real repository (or host environment) whose configuration runs a program that
writes a marker file. A control run of plain git proves the vector fires; then every git tool runs
against it and the marker must never appear.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapters.tools import Workspace, git_tools
from domain.model.errors import ToolFailure
from domain.model.tools import ToolRegistry
from tests.defaults import GIT_LIMITS
from tests.unit.test_git_tools import CONTEXT, SETUP_ENV, git, init_repo

FIRST_TIME = 1_700_000_000


@dataclass(frozen=True, slots=True)
class Hostile:
    repo: Path
    marker: Path

    @property
    def command(self) -> str:
        """A shell command that leaves the marker behind (and reads its stdin, as filters do)."""
        return f"sh -c 'cat >/dev/null; touch {shlex.quote(str(self.marker))}'"

    def script(self, name: str = "evil") -> Path:
        """The same as an executable file, for keys that take a path rather than a command."""
        path = self.repo.parent / f"{self.repo.name}-{name}"
        path.write_text(f"#!/bin/sh\ntouch {shlex.quote(str(self.marker))}\nexit 1\n")
        path.chmod(0o755)
        return path

    def config(self, *pairs: tuple[str, str], file: Path | None = None) -> None:
        target = ["--file", str(file)] if file is not None else []
        for key, value in pairs:
            git(self.repo, "config", *target, key, value)


def _base(root: Path, name: str) -> Hostile:
    """A repository with one commit (README.md, app.py) and a modified, same-size README.md, so
    status must read the file (through any clean filter) to tell whether it changed."""
    repo = init_repo(root / name)
    (repo / "README.md").write_text("hello\n")
    (repo / "app.py").write_text("print('hi')\n")
    git(repo, "add", ".")
    git(repo, "commit", "--quiet", "-m", "Initial commit", when=FIRST_TIME)
    (repo / "README.md").write_text("hellp\n")
    os.utime(repo / "README.md", (FIRST_TIME + 50, FIRST_TIME + 50))
    (repo / "app.py").write_text("print('hello')\n")
    git(repo, "add", "app.py")  # something staged for git_commit
    return Hostile(repo, root.parent / f"{name}.ran")


def _attributes(hostile: Hostile, line: str, file: str = ".gitattributes") -> None:
    (hostile.repo / file).parent.mkdir(parents=True, exist_ok=True)
    (hostile.repo / file).write_text(line + "\n")


def filter_clean(h: Hostile) -> None:
    _attributes(h, "* filter=evil")
    h.config(("filter.evil.clean", h.command))


def filter_process(h: Hostile) -> None:
    _attributes(h, "* filter=evil")
    h.config(("filter.evil.process", str(h.script())))


def filter_required_mixed_case(h: Hostile) -> None:
    _attributes(h, "* filter=EvIl")
    h.config(("filter.EvIl.clean", h.command), ("filter.EvIl.required", "true"))


def filter_smudge(h: Hostile) -> None:
    _attributes(h, "* filter=evil")
    h.config(("filter.evil.smudge", h.command))


def filter_through_include_path(h: Hostile) -> None:
    _attributes(h, "* filter=evil")
    included = h.repo / "included.config"
    h.config(("filter.evil.clean", h.command), file=included)
    h.config(("include.path", str(included)))


def filter_through_include_if(h: Hostile) -> None:
    _attributes(h, "* filter=evil")
    included = h.repo.parent / f"{h.repo.name}-included.config"
    h.config(("filter.evil.clean", h.command), file=included)
    h.config(("includeIf.gitdir:/.path", str(included)))


def filter_through_info_attributes(h: Hostile) -> None:
    _attributes(h, "* filter=evil", ".git/info/attributes")
    h.config(("filter.evil.clean", h.command))


def filter_through_attributes_file(h: Hostile) -> None:
    attributes = h.repo.parent / f"{h.repo.name}-attributes"
    attributes.write_text("* filter=evil\n")
    h.config(("core.attributesFile", str(attributes)), ("filter.evil.clean", h.command))


def filter_through_worktree_config(h: Hostile) -> None:
    _attributes(h, "* filter=evil")
    h.config(("core.repositoryFormatVersion", "1"), ("extensions.worktreeConfig", "true"))
    h.config(("filter.evil.clean", h.command), file=h.repo / ".git" / "config.worktree")


def diff_external(h: Hostile) -> None:
    h.config(("diff.external", str(h.script())))


def diff_driver_command(h: Hostile) -> None:
    _attributes(h, "* diff=evil")
    h.config(("diff.evil.command", str(h.script())))


def diff_textconv(h: Hostile) -> None:
    _attributes(h, "* diff=evil")
    h.config(("diff.evil.textconv", str(h.script())))


def fsmonitor(h: Hostile) -> None:
    h.config(("core.fsmonitor", str(h.script())))


def _hooks(h: Hostile, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for hook in ("pre-commit", "prepare-commit-msg", "commit-msg", "post-commit", "reference-transaction",
                 "post-index-change", "pre-auto-gc", "post-checkout"):
        (directory / hook).write_text(f"#!/bin/sh\ntouch {shlex.quote(str(h.marker))}\n")
        (directory / hook).chmod(0o755)


def hooks_directory(h: Hostile) -> None:
    _hooks(h, h.repo / ".git" / "hooks")


def hooks_path(h: Hostile) -> None:
    directory = h.repo.parent / f"{h.repo.name}-hooks"
    _hooks(h, directory)
    h.config(("core.hooksPath", str(directory)))


def signing_program(h: Hostile) -> None:
    h.config(("commit.gpgSign", "true"), ("log.showSignature", "true"), ("gpg.program", str(h.script())),
             ("gpg.format", "openpgp"))


def ssh_signing_program(h: Hostile) -> None:
    h.config(("commit.gpgSign", "true"), ("gpg.format", "ssh"), ("gpg.ssh.program", str(h.script())),
             ("user.signingKey", "key::ssh-ed25519 AAAA"), ("gpg.ssh.defaultKeyCommand", str(h.script("key"))))


def editor_and_pager(h: Hostile) -> None:
    h.config(("core.editor", str(h.script())), ("sequence.editor", str(h.script())),
             ("core.pager", str(h.script("pager"))), ("pager.status", str(h.script("pager"))),
             ("pager.diff", str(h.script("pager"))), ("pager.log", str(h.script("pager"))),
             ("alias.st", f"!{h.command}"))


def _partial_clone(h: Hostile, url: str) -> None:
    """Make README.md's blob missing from a repository that says it may fetch it on demand."""
    blob = git(h.repo, "rev-parse", "HEAD:README.md")
    (h.repo / ".git" / "objects" / blob[:2] / blob[2:]).unlink()
    h.config(("core.repositoryFormatVersion", "1"), ("extensions.partialClone", "origin"),
             ("remote.origin.url", url), ("remote.origin.promisor", "true"),
             ("remote.origin.fetch", "+refs/heads/*:refs/remotes/origin/*"))


def lazy_fetch_ext_transport(h: Hostile) -> None:
    _partial_clone(h, f"ext::{h.script()}")
    h.config(("protocol.ext.allow", "always"), ("protocol.allow", "always"))


def lazy_fetch_upload_pack(h: Hostile) -> None:
    _partial_clone(h, str(h.repo))
    h.config(("remote.origin.uploadpack", str(h.script())))


def lazy_fetch_ssh_command(h: Hostile) -> None:
    _partial_clone(h, "ssh://git@example.invalid/repo.git")
    h.config(("core.sshCommand", str(h.script())), ("protocol.ssh.allow", "always"))


def lazy_fetch_git_proxy(h: Hostile) -> None:
    _partial_clone(h, "git://example.invalid/repo.git")
    h.config(("core.gitProxy", str(h.script())))


def submodule_with_its_own_filter(h: Hostile) -> None:
    sub = _base(h.repo, "sub")
    _attributes(Hostile(sub.repo, h.marker), "* filter=evil")
    git(sub.repo, "config", "filter.evil.clean", h.command)
    commit = git(sub.repo, "rev-parse", "HEAD")
    git(h.repo, "update-index", "--add", "--cacheinfo", f"160000,{commit},sub")


@dataclass(frozen=True, slots=True)
class Vector:
    build: Callable[[Hostile], None]
    # Plain git commands (with host configuration off, as in the tools) that run the program:
    # the proof that the vector is real. None where only a command the tools never run fires it.
    control: tuple[str, ...] | None


VECTORS = {
    "filter.clean": Vector(filter_clean, ("status",)),
    "filter.process": Vector(filter_process, ("status",)),
    "filter.required, mixed-case driver": Vector(filter_required_mixed_case, ("diff",)),
    "filter.smudge": Vector(filter_smudge, ("checkout", "--", "README.md")),
    "include.path": Vector(filter_through_include_path, ("status",)),
    "includeIf": Vector(filter_through_include_if, ("status",)),
    "info/attributes": Vector(filter_through_info_attributes, ("status",)),
    "core.attributesFile": Vector(filter_through_attributes_file, ("status",)),
    "config.worktree": Vector(filter_through_worktree_config, ("status",)),
    "diff.external": Vector(diff_external, ("diff",)),
    "diff.<driver>.command": Vector(diff_driver_command, ("diff",)),
    "diff.<driver>.textconv": Vector(diff_textconv, ("diff", "--no-ext-diff")),
    "core.fsmonitor": Vector(fsmonitor, ("status",)),
    "hooks in .git/hooks": Vector(hooks_directory, ("commit", "--quiet", "-m", "x")),
    "core.hooksPath": Vector(hooks_path, ("branch", "x")),
    "gpg.program": Vector(signing_program, ("commit", "--quiet", "-m", "x")),
    "gpg.ssh.program": Vector(ssh_signing_program, ("commit", "--quiet", "-m", "x")),
    "editor, pager, alias": Vector(editor_and_pager, ("commit", "--quiet")),
    "ext:: transport (lazy fetch)": Vector(lazy_fetch_ext_transport, ("cat-file", "blob", "HEAD:README.md")),
    "remote.uploadpack (lazy fetch)": Vector(lazy_fetch_upload_pack, ("cat-file", "blob", "HEAD:README.md")),
    "core.sshCommand (lazy fetch)": Vector(lazy_fetch_ssh_command, ("cat-file", "blob", "HEAD:README.md")),
    "core.gitProxy (lazy fetch)": Vector(lazy_fetch_git_proxy, ("cat-file", "blob", "HEAD:README.md")),
    "submodule's own filter": Vector(submodule_with_its_own_filter, ("status",)),
}

# Every tool, read-only and approved ones alike, as the agent would call them.
CALLS: list[tuple[str, dict[str, object]]] = [
    ("git_status", {}),
    ("git_diff", {}),
    ("git_diff", {"file_path": "README.md"}),
    ("git_diff", {"branch": "HEAD~0"}),
    ("git_log", {"limit": 5}),
    ("git_show_file", {"file_path": "README.md"}),
    ("git_show_file", {"file_path": ".gitattributes"}),
    ("git_branches", {"remote": True}),
    ("git_create_branch", {"name": "agent-branch"}),
    ("git_commit", {"message": "Agent commit"}),
]


def _prove_it_fires(h: Hostile, args: tuple[str, ...]) -> None:
    """Run plain git on a copy of the repository and check the marker appears."""
    copy = h.repo.parent / f"{h.repo.name}-control"
    shutil.copytree(h.repo, copy, symlinks=True)
    env = {**SETUP_ENV, "GIT_EDITOR": str(h.script("editor"))}
    subprocess.run(["git", *args], cwd=copy, env=env, capture_output=True, stdin=subprocess.DEVNULL,
                   timeout=30, check=False)
    shutil.rmtree(copy)
    assert h.marker.exists(), f"the vector did not fire under plain git {' '.join(args)}"
    h.marker.unlink()


def _prove_host_config_fires(h: Hostile, environment: dict[str, str]) -> None:
    subprocess.run(["git", "status"], cwd=h.repo, env={"PATH": os.environ["PATH"], **environment},
                   capture_output=True, check=False)
    assert h.marker.exists(), "the host configuration did not fire under plain git"
    h.marker.unlink()


async def _every_tool(registry: ToolRegistry, repo_path: str) -> None:
    for name, args in CALLS:
        try:
            await registry.get(name).run(registry.validate(name, {"repo_path": repo_path, **args}), CONTEXT)
        except ToolFailure:
            pass  # a refusal or a git error is fine; running the program is not


@pytest.mark.parametrize("name", list(VECTORS))
async def test_no_repository_configuration_makes_a_tool_run_a_program(tmp_path: Path, name: str) -> None:
    vector = VECTORS[name]
    root = tmp_path / "workspace"
    root.mkdir()
    hostile = _base(root, "repo")
    vector.build(hostile)
    if vector.control is not None:
        _prove_it_fires(hostile, vector.control)

    await _every_tool(ToolRegistry(git_tools(Workspace(root), **GIT_LIMITS)), "repo")

    assert not hostile.marker.exists()


async def test_the_host_environment_and_configuration_make_no_tool_run_a_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "workspace"
    root.mkdir()
    hostile = _base(root, "repo")
    _attributes(hostile, "* filter=evil diff=evil")
    home = tmp_path / "home"
    (home / ".config" / "git").mkdir(parents=True)
    for config in (home / ".gitconfig", home / ".config" / "git" / "config"):
        hostile.config(("filter.evil.clean", hostile.command), ("core.fsmonitor", str(hostile.script())),
                       ("diff.external", str(hostile.script())), file=config)
    (home / ".config" / "git" / "attributes").write_text("* filter=evil\n")
    environment = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "GIT_CONFIG_PARAMETERS": f"'filter.evil.clean'='{hostile.script()}'",
        "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "core.fsmonitor", "GIT_CONFIG_VALUE_0": str(hostile.script()),
        "GIT_EXTERNAL_DIFF": str(hostile.script()),
        "GIT_SSH_COMMAND": str(hostile.script()),
        "GIT_PAGER": str(hostile.script()), "PAGER": str(hostile.script()), "GIT_EDITOR": str(hostile.script()),
        "GIT_ASKPASS": str(hostile.script()),
    }
    _prove_host_config_fires(hostile, environment)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)

    await _every_tool(ToolRegistry(git_tools(Workspace(root), **GIT_LIMITS)), "repo")

    assert not hostile.marker.exists()


async def test_a_repository_whose_config_moves_its_work_tree_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "workspace"
    root.mkdir()
    hostile = _base(root, "repo")
    outside = init_repo(tmp_path / "outside")
    hostile.config(("core.worktree", str(outside)))
    registry = ToolRegistry(git_tools(Workspace(root), **GIT_LIMITS))

    for name, args in CALLS:
        with pytest.raises(ToolFailure) as caught:
            await registry.get(name).run(registry.validate(name, {"repo_path": "repo", **args}), CONTEXT)
        assert caught.value.code == "repository_refused"
        assert "core.worktree" in caught.value.message


@pytest.mark.parametrize("pointer", ["gitdir: {outside}", "gitdir: ../../outside/.git", "not a pointer"])
async def test_a_git_file_pointing_outside_the_workspace_is_refused(tmp_path: Path, pointer: str) -> None:
    root = tmp_path / "workspace"
    root.mkdir()
    outside = init_repo(tmp_path / "outside")
    hostile = Hostile(root / "repo", tmp_path / "ran")
    hostile.repo.mkdir()
    (hostile.repo / ".git").write_text(pointer.format(outside=outside / ".git") + "\n")
    registry = ToolRegistry(git_tools(Workspace(root), **GIT_LIMITS))

    with pytest.raises(ToolFailure) as caught:
        await registry.get("git_status").run({"repo_path": "repo"}, CONTEXT)

    assert caught.value.code == "path_outside_workspace"


async def test_a_linked_worktree_inside_the_workspace_still_works(tmp_path: Path) -> None:
    root = tmp_path / "workspace"
    root.mkdir()
    main = _base(root, "main").repo
    git(main, "worktree", "add", "--quiet", str(root / "linked"), "-b", "linked")
    registry = ToolRegistry(git_tools(Workspace(root), **GIT_LIMITS))

    result = await registry.get("git_status").run({"repo_path": "linked"}, CONTEXT)

    assert result["branch"] == "linked"
