"""Git tools the agent calls, confined to a `Workspace`.

git runs as a subprocess (never through a shell) with a timeout, a bound on the output it may
produce and a scrubbed environment. No repository or host configuration can make a tool run another
program, wait for a terminal or behave differently from one host to the next:

- host configuration is not read (no system or global config, no system attributes, an environment
  built from scratch, so no inherited `GIT_*` variable);
- `-c` overrides (which win over every config file) switch off hooks, fsmonitor, pagers, signing,
  credential helpers, submodule recursion and every transport (`protocol.allow=never`: no fetch, so
  no `core.sshCommand`, `core.gitProxy`, `remote.*.uploadpack` or `ext::` URL, not even the lazy
  fetch of a partial clone);
- every diff runs with `--no-ext-diff --no-textconv` (`diff.external`, `diff.<driver>.command`,
  `diff.<driver>.textconv`), and status and diff ignore submodules, whose own config is not checked;
- the repository's effective configuration, includes (`include.path`, `includeIf`) followed, is
  read before each command and every filter driver it defines (`filter.<name>.clean`, `smudge`,
  `process`) is overridden with an empty command, so `.gitattributes` naming it runs nothing;
- a repository whose configuration moves it outside the workspace (`core.worktree`, a `.git` file
  pointing elsewhere) is refused.

Merge drivers, difftool/mergetool commands, editors and aliases are only used by commands the tools
never run.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import re
import signal
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.tools.workspace import Workspace, shown
from domain.model.errors import ToolFailure
from domain.model.tools import Tool, ToolContext, ToolSpec

# `-c` overrides applied to every git call, whatever the repository's own config says.
_CONFIG_OVERRIDES = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.pager=cat",
    "core.quotePath=false",
    "color.ui=false",
    "commit.gpgSign=false",
    "tag.gpgSign=false",
    "log.showSignature=false",
    # No background `gc --auto` / maintenance left running after a commit.
    "gc.auto=0",
    "maintenance.auto=false",
    # No transport at all: nothing that connects (ssh commands, proxies, upload-pack, ext:: URLs,
    # a partial clone's lazy fetch) can start, so nothing asks a credential helper either.
    "protocol.allow=never",
    "credential.helper=",  # an empty value clears the list of helpers
    "core.attributesFile=" + os.devnull,
    # A submodule has its own configuration, which is not checked: git must not start in it.
    "diff.ignoreSubmodules=all",
    "status.submoduleSummary=false",
    "submodule.recurse=false",
)
# Keys of the effective configuration that run a program; each found is overridden with "".
_FILTER_COMMAND = re.compile(r"filter\.(.+)\.(?:clean|smudge|process)", re.DOTALL)
# A per-protocol policy wins over `protocol.allow`; each found is overridden with "never".
_PROTOCOL_POLICY = re.compile(r"protocol\.(.+)\.allow", re.DOTALL)
# Keys that move the repository's working tree outside the workspace: no override undoes them.
_REFUSED_KEYS = frozenset({"core.worktree"})
_STDERR_LIMIT = 8192
# A repository's whole configuration; one larger than this is refused rather than half-checked.
_CONFIG_LIMIT = 1 << 20
_READ_CHUNK = 65536
_STOP_GRACE_SECONDS = 5.0
_MAX_ERROR_CHARS = 300
_MAX_SUMMARY_NAMES = 10
_REDACTED_ROOT = "<workspace>"


@dataclass(frozen=True, slots=True)
class GitOutput:
    exit_code: int
    stdout: bytes
    # True when stdout reached the size limit: the rest was never read and git was stopped.
    truncated: bool
    stderr: bytes


class GitRunner:
    """Runs one git command in a repository without blocking the event loop."""

    def __init__(
        self,
        *,
        timeout_seconds: float,
        max_output_bytes: int,
        author_name: str,
        author_email: str,
        executable: str = "git",
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        if max_output_bytes <= 0:
            raise ValueError("max_output_bytes must be positive")
        self.timeout_seconds = timeout_seconds
        self.max_output_bytes = max_output_bytes
        self._author_name = author_name
        self._author_email = author_email
        self._executable = executable

    def _environment(self, repo: Path) -> dict[str, str]:
        # Built from scratch: an inherited GIT_DIR, GIT_INDEX_FILE or GIT_WORK_TREE would silently
        # point git at another repository.
        return {
            "PATH": os.environ.get("PATH", os.defpath),
            "LC_ALL": "C",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_PAGER": "cat",
            "PAGER": "cat",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_ATTR_NOSYSTEM": "1",
            "GIT_EDITOR": ":",
            "GIT_PROTOCOL_FROM_USER": "0",
            # An empty allow-list: no transport, whatever any configuration allows.
            "GIT_ALLOW_PROTOCOL": "",
            # Never look for a repository above the one named (it may be outside the workspace).
            "GIT_CEILING_DIRECTORIES": str(repo.parent),
            # File arguments are plain paths, not pathspec magic such as ':(glob)' or '*'.
            "GIT_LITERAL_PATHSPECS": "1",
            # Read-only commands must not take index.lock and collide with a concurrent commit.
            "GIT_OPTIONAL_LOCKS": "0",
            "GIT_AUTHOR_NAME": self._author_name,
            "GIT_AUTHOR_EMAIL": self._author_email,
            "GIT_COMMITTER_NAME": self._author_name,
            "GIT_COMMITTER_EMAIL": self._author_email,
        }

    async def run(self, repo: Path, *args: str) -> GitOutput:
        neutralised = await self._repository_overrides(repo, for_command=args[0])
        return await self._run(repo, (*_CONFIG_OVERRIDES, *neutralised), args, limit=self.max_output_bytes,
                               name=args[0])

    async def _repository_overrides(self, repo: Path, *, for_command: str) -> list[str]:
        """`-c` settings that switch off every filter driver the repository's effective config
        defines; ToolFailure `repository_refused` for config no override can make safe."""
        listed = await self._run(repo, _CONFIG_OVERRIDES, ("config", "--list", "--includes", "-z"),
                                 limit=_CONFIG_LIMIT, name=for_command)
        if listed.exit_code != 0 or listed.truncated:
            raise ToolFailure("The repository's git configuration could not be read, so git was not run.",
                              code="repository_refused")
        overrides: set[str] = set()
        for entry in listed.stdout.split(b"\x00")[:-1]:
            key = entry.split(b"\n", 1)[0].decode("utf-8", errors="replace")
            if key.lower() in _REFUSED_KEYS:
                raise ToolFailure(f"The repository's git configuration sets {key}, which points git outside "
                                  "the repository, so git was not run.", code="repository_refused")
            match = _FILTER_COMMAND.fullmatch(key)
            if match is not None:
                driver = match.group(1)
                overrides.update(f"filter.{driver}.{part}=" for part in ("clean", "smudge", "process"))
                overrides.add(f"filter.{driver}.required=false")
            match = _PROTOCOL_POLICY.fullmatch(key)
            if match is not None:
                overrides.add(f"protocol.{match.group(1)}.allow=never")
        return sorted(overrides)

    async def _run(
        self, repo: Path, settings: tuple[str, ...], args: tuple[str, ...], *, limit: int, name: str,
    ) -> GitOutput:
        """git with `settings` as `-c` overrides; `name` is the command a timeout message names."""
        overrides = [part for setting in settings for part in ("-c", setting)]
        try:
            process = await asyncio.create_subprocess_exec(
                self._executable, *overrides, *args,
                cwd=repo,
                env=self._environment(repo),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                # Own process group, so a timeout kills anything git started too.
                start_new_session=True,
            )
        except OSError:
            raise ToolFailure("git could not be started.", code="git_error") from None
        assert process.stdout is not None and process.stderr is not None
        finished = False
        try:
            async with asyncio.timeout(self.timeout_seconds):
                (stdout, truncated), (stderr, _) = await asyncio.gather(
                    # Output beyond the limit is not wanted: stop git rather than read it all.
                    _read_bounded(process.stdout, limit, on_overflow=lambda: _kill(process)),
                    _read_bounded(process.stderr, _STDERR_LIMIT, on_overflow=None),
                )
                exit_code = await process.wait()
                finished = True
        except TimeoutError:
            raise ToolFailure(
                f"git {name} timed out after {self.timeout_seconds:g} s.", code="tool_timeout", retryable=True,
            ) from None
        finally:
            if not finished:  # timeout, cancellation or an unexpected error: leave nothing behind
                await _stop(process)
        return GitOutput(exit_code=exit_code, stdout=stdout, truncated=truncated, stderr=stderr)


async def _read_bounded(
    stream: asyncio.StreamReader, limit: int, *, on_overflow: Callable[[], None] | None,
) -> tuple[bytes, bool]:
    """Keep at most `limit` bytes and read the rest to end of file without keeping it. Past the
    limit, `on_overflow` is called once (to stop the producer). Reading to the end matters: asyncio
    finishes `Process.wait()` only after every pipe has reached end of file."""
    kept = bytearray()
    overflowed = False
    while True:
        # One byte past the limit tells "exactly at the limit" from "more than the limit".
        chunk = await stream.read(_READ_CHUNK if overflowed else min(_READ_CHUNK, limit + 1 - len(kept)))
        if not chunk:
            return bytes(kept[:limit]), overflowed
        if overflowed:
            continue
        kept.extend(chunk)
        if len(kept) > limit:
            overflowed = True
            del kept[limit:]
            if on_overflow is not None:
                on_overflow()


async def _stop(process: asyncio.subprocess.Process) -> None:
    """Kill git and everything it started, then drain its pipes and reap it."""
    if process.returncode is None:
        _kill(process)
    assert process.stdout is not None and process.stderr is not None
    # Bounded: once the process group is dead, the pipes only hold what the kernel buffered. The
    # grace period guards against a descendant that left the group and keeps a pipe open.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_STOP_GRACE_SECONDS):
            await asyncio.gather(_drain(process.stdout), _drain(process.stderr))
            await process.wait()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(_READ_CHUNK):
        pass


def _kill(process: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def _text(data: bytes) -> str:
    # The incremental decoder drops a multi-byte character cut in half by truncation.
    return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data, final=False)


def _short(commit: str) -> str:
    return commit[:7]


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"  # only for nouns taking -s


def _names(names: list[str]) -> str:
    if len(names) <= _MAX_SUMMARY_NAMES:
        return ", ".join(names)
    return ", ".join(names[:_MAX_SUMMARY_NAMES]) + f" and {len(names) - _MAX_SUMMARY_NAMES} more"


def _truncation_note(truncated: bool) -> str:
    return " Output truncated at the size limit." if truncated else ""


# --- arguments --------------------------------------------------------------------------------
# The registry validates arguments against the schema first; these getters still check types so a
# direct call with bad arguments fails as a ToolFailure, not as a TypeError deep inside.

def _invalid(message: str) -> ToolFailure:
    return ToolFailure(message, code="invalid_tool_arguments")


def _string(args: Mapping[str, Any], name: str, default: str | None = None) -> str:
    value = args.get(name, default)
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a string.")
    return value


def _optional_string(args: Mapping[str, Any], name: str) -> str | None:
    value = args.get(name)
    return None if value is None else _string(args, name)


def _ref(args: Mapping[str, Any], name: str, default: str | None = None) -> str:
    """A revision, branch or commit argument. A leading '-' would be read by git as an option."""
    value = _string(args, name, default)
    if not value or value.startswith("-") or any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ToolFailure(f"{name} {shown(value)} is not a valid revision or branch name.", code="invalid_ref")
    return value


def _repo_path_property() -> dict[str, Any]:
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": 1024,
        "description": "Repository directory relative to the workspace root, e.g. 'my-project' ('.' for the root).",
    }


def _schema(properties: Mapping[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": dict(properties), "required": required, "additionalProperties": False}


_READ_ONLY = "read"


class GitTool(Tool):
    """Common ground of the git tools: resolve `repo_path` in the workspace, run git, turn git's
    failures into safe ToolFailures."""

    def __init__(self, workspace: Workspace, runner: GitRunner) -> None:
        self._workspace = workspace
        self._runner = runner

    async def run(self, args: Mapping[str, Any], context: ToolContext) -> dict[str, Any]:
        repo = self._workspace.resolve_repo(_string(args, "repo_path"))
        return await self.execute(repo, args)

    @abstractmethod
    async def execute(self, repo: Path, args: Mapping[str, Any]) -> dict[str, Any]:
        """The tool's work in the resolved repository."""

    async def git(self, repo: Path, *args: str, ok_exit_codes: tuple[int, ...] = (0,)) -> GitOutput:
        output = await self._runner.run(repo, *args)
        # A truncated run was stopped by us, so its exit code says nothing about git's success.
        if not output.truncated and output.exit_code not in ok_exit_codes:
            raise ToolFailure(self._error_line(output.stderr), code="git_error")
        return output

    def _error_line(self, stderr: bytes) -> str:
        line = next((line.strip() for line in _text(stderr).splitlines() if line.strip()), "")
        if not line:
            return "git failed without an error message."
        line = line.replace(str(self._workspace.root), _REDACTED_ROOT)
        if len(line) > _MAX_ERROR_CHARS:
            line = line[:_MAX_ERROR_CHARS] + "…"
        return line


# --- read-only tools --------------------------------------------------------------------------

_STATUS_WORDS = {
    ".": "unmodified",
    "M": "modified",
    "T": "type_changed",
    "A": "added",
    "D": "deleted",
    "R": "renamed",
    "C": "copied",
    "U": "unmerged",
}
_UNCHANGED = ("unmodified", "untracked")


class GitStatusTool(GitTool):
    spec = ToolSpec(
        name="git_status",
        description="Show the current branch and which files are staged, modified or untracked in a repository.",
        parameters=_schema({"repo_path": _repo_path_property()}, ["repo_path"]),
        requires_approval=False,
        action_type=_READ_ONLY,
    )

    async def execute(self, repo: Path, args: Mapping[str, Any]) -> dict[str, Any]:
        output = await self.git(repo, "status", "--porcelain=v2", "--branch", "-z", "--untracked-files=normal",
                                "--ignore-submodules=all")
        records = output.stdout.split(b"\x00")
        # Complete output ends with NUL; after truncation the last record may be cut short.
        records = records[:-1]
        branch: str | None = None
        entries: list[dict[str, str]] = []
        conflicted = 0
        index = 0
        while index < len(records):
            record = _text(records[index])
            index += 1
            kind = record[:1]
            if record.startswith("# branch.head "):
                head = record.removeprefix("# branch.head ")
                branch = None if head == "(detached)" else head
            elif kind in ("1", "2", "u"):
                # Field counts before the path: ordinary 8, renamed/copied 9, unmerged 10.
                fields = record.split(" ", {"1": 8, "2": 9, "u": 10}[kind])
                if kind == "2":
                    index += 1  # the original path of a rename follows as its own record
                if kind == "u":
                    conflicted += 1
                xy = fields[1]
                entries.append({
                    "path": fields[-1],
                    "index": _STATUS_WORDS.get(xy[0], xy[0]),
                    "worktree": _STATUS_WORDS.get(xy[1], xy[1]),
                })
            elif kind == "?":
                entries.append({"path": record[2:], "index": "untracked", "worktree": "untracked"})
        clean = not entries and not output.truncated
        return {
            "branch": branch,
            "clean": clean,
            "entries": entries,
            "summary": _status_summary(branch, entries, conflicted, output.truncated),
        }


def _status_summary(branch: str | None, entries: list[dict[str, str]], conflicted: int, truncated: bool) -> str:
    where = f"On branch {branch}" if branch is not None else "HEAD is detached"
    if not entries and not truncated:
        return f"{where}; the working tree is clean."
    staged = sum(1 for e in entries if e["index"] not in _UNCHANGED and e["index"] != "unmerged")
    unstaged = sum(1 for e in entries if e["worktree"] not in _UNCHANGED and e["worktree"] != "unmerged")
    untracked = sum(1 for e in entries if e["index"] == "untracked")
    counts = [
        f"{count} {label}"
        for count, label in ((staged, "staged"), (unstaged, "unstaged"), (untracked, "untracked"),
                             (conflicted, "conflicted"))
        if count
    ]
    listed = ", ".join(counts) if counts else "no complete entries"
    return f"{where}; {listed}.{_truncation_note(truncated)}"


class GitLogTool(GitTool):
    MAX_LIMIT = 200

    spec = ToolSpec(
        name="git_log",
        description="List the most recent commits of a branch (or any revision), newest first.",
        parameters=_schema(
            {
                "repo_path": _repo_path_property(),
                "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 10,
                          "description": f"How many commits to list (1 to {MAX_LIMIT})."},
                "branch": {"type": "string", "minLength": 1, "maxLength": 256, "default": "HEAD",
                           "description": "Branch, tag or commit to start from."},
            },
            ["repo_path"],
        ),
        requires_approval=False,
        action_type=_READ_ONLY,
    )

    async def execute(self, repo: Path, args: Mapping[str, Any]) -> dict[str, Any]:
        branch = _ref(args, "branch", "HEAD")
        limit = args.get("limit", 10)
        # JSON Schema counts 5.0 as an integer; bool is an int subclass in Python but not in JSON.
        is_integer = (isinstance(limit, int) and not isinstance(limit, bool)) or (
            isinstance(limit, float) and limit.is_integer())
        if not is_integer or not 1 <= limit <= self.MAX_LIMIT:
            raise _invalid(f"limit must be an integer from 1 to {self.MAX_LIMIT}.")
        output = await self.git(
            repo, "log", f"--max-count={int(limit)}", "-z", "--format=%H%x1f%an%x1f%at%x1f%s",
            "--end-of-options", branch, "--",
        )
        commits = []
        # Records end with NUL; after truncation the last one may be cut short.
        for record in output.stdout.split(b"\x00")[:-1]:
            fields = _text(record).split("\x1f")
            if len(fields) != 4:
                continue
            sha, author, timestamp, subject = fields
            commits.append({"commit": sha, "author": author, "timestamp": int(timestamp), "subject": subject})
        return {"commits": commits, "summary": _log_summary(branch, commits, output.truncated)}


def _log_summary(branch: str, commits: list[dict[str, Any]], truncated: bool) -> str:
    if not commits:
        return f"No commits found from {branch}.{_truncation_note(truncated)}"
    newest = commits[0]
    return (f"{_plural(len(commits), 'commit')} from {branch}, newest first; latest is "
            f"{_short(newest['commit'])} by {newest['author']}: {newest['subject']}{_truncation_note(truncated)}")


_FILES_CHANGED = re.compile(r"(\d+) files? changed")


class GitDiffTool(GitTool):
    spec = ToolSpec(
        name="git_diff",
        description="Show the differences between the working tree (staged and unstaged changes) and a branch "
                    "or commit, optionally for one file.",
        parameters=_schema(
            {
                "repo_path": _repo_path_property(),
                "branch": {"type": "string", "minLength": 1, "maxLength": 256, "default": "HEAD",
                           "description": "Branch, tag or commit to compare the working tree with."},
                "file_path": {"type": ["string", "null"], "minLength": 1, "maxLength": 4096, "default": None,
                              "description": "Only this file or directory, relative to the repository; "
                                             "null for all files."},
            },
            ["repo_path"],
        ),
        requires_approval=False,
        action_type=_READ_ONLY,
    )

    async def execute(self, repo: Path, args: Mapping[str, Any]) -> dict[str, Any]:
        branch = _ref(args, "branch", "HEAD")
        given_path = _optional_string(args, "file_path")
        pathspec = [] if given_path is None else [self._workspace.resolve_inside(repo, given_path)]
        common = ("--no-ext-diff", "--no-textconv", "--no-color", "--ignore-submodules=all", "--end-of-options",
                  branch, "--", *pathspec)
        stat = await self.git(repo, "diff", "--shortstat", *common)
        diff = await self.git(repo, "diff", *common)
        shortstat = _text(stat.stdout).strip()
        match = _FILES_CHANGED.search(shortstat)
        files_changed = int(match.group(1)) if match else 0
        scope = "" if given_path is None else f" in {shown(given_path)}"
        if files_changed:
            summary = f"{shortstat} between the working tree and {branch}{scope}."
        else:
            summary = f"No differences between the working tree and {branch}{scope}."
        return {
            "diff": _text(diff.stdout),
            "truncated": diff.truncated,
            "files_changed": files_changed,
            "summary": summary + _truncation_note(diff.truncated),
        }


class GitShowFileTool(GitTool):
    spec = ToolSpec(
        name="git_show_file",
        description="Show the content of a file as it is in a given commit or branch.",
        parameters=_schema(
            {
                "repo_path": _repo_path_property(),
                "file_path": {"type": "string", "minLength": 1, "maxLength": 4096,
                              "description": "File path relative to the repository root."},
                "commit": {"type": "string", "minLength": 1, "maxLength": 256, "default": "HEAD",
                           "description": "Commit, branch or tag to read the file from."},
            },
            ["repo_path", "file_path"],
        ),
        requires_approval=False,
        action_type=_READ_ONLY,
    )

    async def execute(self, repo: Path, args: Mapping[str, Any]) -> dict[str, Any]:
        commit = _ref(args, "commit", "HEAD")
        given_path = _string(args, "file_path")
        path = self._workspace.resolve_inside(repo, given_path)
        # cat-file prints the stored blob as is: no textconv, no filters.
        output = await self.git(repo, "cat-file", "blob", "--end-of-options", f"{commit}:{path}")
        data = output.stdout
        if b"\x00" in data:
            return {
                "content": "",
                "truncated": output.truncated,
                "summary": f"{shown(path)} at {commit} is a binary file; its content is not shown.",
            }
        content = _text(data)
        if output.truncated:
            summary = f"{shown(path)} at {commit}: the first {len(data)} bytes are shown.{_truncation_note(True)}"
        else:
            lines = content.count("\n") + (0 if content.endswith("\n") or not content else 1)
            summary = f"{shown(path)} at {commit}: {_plural(lines, 'line')}, {_plural(len(data), 'byte')}."
        return {"content": content, "truncated": output.truncated, "summary": summary}


class GitBranchesTool(GitTool):
    spec = ToolSpec(
        name="git_branches",
        description="List the branches of a repository and tell which one is checked out.",
        parameters=_schema(
            {
                "repo_path": _repo_path_property(),
                "remote": {"type": "boolean", "default": False,
                           "description": "Also list remote-tracking branches such as 'origin/main'."},
            },
            ["repo_path"],
        ),
        requires_approval=False,
        action_type=_READ_ONLY,
    )

    async def execute(self, repo: Path, args: Mapping[str, Any]) -> dict[str, Any]:
        remote = args.get("remote", False)
        if not isinstance(remote, bool):
            raise _invalid("remote must be a boolean.")
        namespaces = ["refs/heads", "refs/remotes"] if remote else ["refs/heads"]
        output = await self.git(
            repo, "for-each-ref", "--format=%(refname:short)%00%(HEAD)%00%(symref)", *namespaces,
        )
        current: str | None = None
        branches: list[str] = []
        lines = output.stdout.split(b"\n")[:-1]  # the last line is empty or, when truncated, partial
        for line in lines:
            fields = _text(line).split("\x00")
            if len(fields) != 3 or fields[2]:
                continue  # a symbolic ref such as origin/HEAD is an alias, not a branch
            name, head_marker, _ = fields
            branches.append(name)
            if head_marker == "*":
                current = name
        where = f"current: {current}" if current is not None else "HEAD is detached or has no commits"
        scope = "local and remote-tracking" if remote else "local"
        noun = "branch" if len(branches) == 1 else "branches"
        listed = f": {_names(branches)}" if branches else ""
        summary = f"{len(branches)} {scope} {noun}{listed}; {where}."
        return {"current": current, "branches": branches, "summary": summary + _truncation_note(output.truncated)}


# --- tools that change the repository (human approval first) ----------------------------------

class GitCreateBranchTool(GitTool):
    spec = ToolSpec(
        name="git_create_branch",
        description="Create a new local branch at a commit, without checking it out.",
        parameters=_schema(
            {
                "repo_path": _repo_path_property(),
                "name": {"type": "string", "minLength": 1, "maxLength": 200,
                         "description": "Name of the new branch, e.g. 'feature/login'."},
                "start_point": {"type": "string", "minLength": 1, "maxLength": 256, "default": "HEAD",
                                "description": "Branch, tag or commit the new branch starts at."},
            },
            ["repo_path", "name"],
        ),
        requires_approval=True,
        action_type="git_create_branch",
    )

    async def execute(self, repo: Path, args: Mapping[str, Any]) -> dict[str, Any]:
        name = _ref(args, "name")
        start_point = _ref(args, "start_point", "HEAD")
        checked = await self.git(repo, "check-ref-format", "--branch", name, ok_exit_codes=(0, 1, 128))
        # check-ref-format also expands shorthands such as '@{-1}'; only a literal name is accepted.
        if checked.exit_code != 0 or _text(checked.stdout).strip() != name:
            raise ToolFailure(f"{shown(name)} is not a valid branch name.", code="invalid_ref")
        exists = await self.git(repo, "show-ref", "--verify", "--quiet", f"refs/heads/{name}", ok_exit_codes=(0, 1))
        if exists.exit_code == 0:
            raise ToolFailure(f"Branch {shown(name)} already exists.", code="branch_exists")
        resolved = await self.git(
            repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{start_point}^{{commit}}",
            ok_exit_codes=(0, 1),
        )
        if resolved.exit_code != 0:
            raise ToolFailure(f"Start point {shown(start_point)} is not a known commit.", code="git_error")
        commit = _text(resolved.stdout).strip()
        await self.git(repo, "branch", "--no-track", "--end-of-options", name, commit)
        return {
            "branch": name,
            "commit": commit,
            "summary": f"Created branch {name} at {_short(commit)} from {start_point} (not checked out).",
        }


class GitCommitTool(GitTool):
    spec = ToolSpec(
        name="git_commit",
        description="Commit the changes that are already staged, with the given message.",
        parameters=_schema(
            {
                "repo_path": _repo_path_property(),
                "message": {"type": "string", "minLength": 1, "maxLength": 10000,
                            "description": "Commit message; its first line is the subject."},
            },
            ["repo_path", "message"],
        ),
        requires_approval=True,
        action_type="git_commit",
    )

    async def execute(self, repo: Path, args: Mapping[str, Any]) -> dict[str, Any]:
        message = _string(args, "message")
        if not message.strip():
            raise _invalid("message must not be blank.")
        if "\x00" in message:
            raise _invalid("message must not contain NUL characters.")
        staged = await self.git(repo, "diff", "--cached", "--quiet", "--no-ext-diff", "--no-textconv",
                                ok_exit_codes=(0, 1))
        if staged.exit_code == 0:
            raise ToolFailure("Nothing is staged, so there is nothing to commit.", code="nothing_to_commit")
        # `--message=...` is one argv entry, so a message starting with '-' stays a message.
        await self.git(repo, "commit", "--quiet", "--no-verify", "--no-gpg-sign", f"--message={message}")
        head = await self.git(repo, "rev-parse", "--verify", "HEAD")
        commit = _text(head.stdout).strip()
        subject = message.strip().splitlines()[0]
        return {"commit": commit, "summary": f"Committed {_short(commit)}: {subject}"}


def git_tools(
    workspace: Workspace,
    *,
    timeout_seconds: float,
    max_output_bytes: int,
    author_name: str = "Aura",
    author_email: str = "aura@localhost",
) -> list[Tool]:
    """All git tools, sharing one runner and confined to `workspace`."""
    runner = GitRunner(
        timeout_seconds=timeout_seconds,
        max_output_bytes=max_output_bytes,
        author_name=author_name,
        author_email=author_email,
    )
    return [
        GitStatusTool(workspace, runner),
        GitLogTool(workspace, runner),
        GitDiffTool(workspace, runner),
        GitShowFileTool(workspace, runner),
        GitBranchesTool(workspace, runner),
        GitCreateBranchTool(workspace, runner),
        GitCommitTool(workspace, runner),
    ]
