"""Replays a Dockerfile's stages outside Docker (no engine runs here), close enough to prove that the
image's own steps install and start Aura.

Each stage gets a directory standing for its filesystem; every absolute path the Dockerfile names
(WORKDIR, COPY destinations, ENV values, bind-mount targets) is moved under it, in RUN commands too.
The base image's Python is a fresh virtualenv of this machine's Python (same minor version) whose pip
reads no configuration of this machine but how it reaches PyPI. What only a root filesystem can do
(apt-get, users, chown) runs through recording stand-ins: the caller checks what was asked of them.
USER is recorded, not switched.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

SYSTEM_COMMANDS = ("apt-get", "groupadd", "useradd", "chown")
# how this machine reaches PyPI (its certificate authorities, proxies), as a build host passes them on
NETWORK_ENVIRONMENT = ("SSL_CERT_FILE", "SSL_CERT_DIR", "PIP_CERT", "REQUESTS_CA_BUNDLE", "HTTP_PROXY",
                       "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
# the base image's programs are this machine's; every other absolute path is the image's own
KEPT_TOPS = {"/bin", "/usr", "/dev", "/proc"}
_ABSOLUTE = re.compile(r"(?<![\w.:%/-])(/[A-Za-z][\w.-]*)")


@dataclass
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    name: str
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str | None = None
    command: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)


def instructions(text: str) -> list[Instruction]:
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    result = []
    for line in logical:
        keyword, _, rest = line.strip().partition(" ")
        result.append(Instruction(keyword.upper(), rest.strip()))
    return result


class Replay:
    def __init__(self, dockerfile: Path, context: Path, work: Path, ignore_file: Path | None = None) -> None:
        self.dockerfile, self.context, self.work = dockerfile, context, work
        self.ignore_file = ignore_file
        self.args: dict[str, str] = {}
        self.stages: dict[str, Stage] = {}
        self.system_calls = work / "system-calls.log"
        self.tops = sorted(set(_ABSOLUTE.findall(dockerfile.read_text(encoding="utf-8"))) - KEPT_TOPS,
                           key=len, reverse=True)
        self.shims = work / "shims"
        self._make_shims()

    def _make_shims(self) -> None:
        self.shims.mkdir(parents=True, exist_ok=True)
        for name in SYSTEM_COMMANDS:
            shim = self.shims / name
            shim.write_text(f'#!/bin/sh\necho "{name} $*" >> "{self.system_calls}"\n')
            shim.chmod(0o755)

    # -- paths -------------------------------------------------------------------------------------
    def _inside(self, stage: Stage, path: str) -> Path:
        absolute = path if path.startswith("/") else f"{stage.workdir.rstrip('/')}/{path}"
        return stage.root / absolute.lstrip("/")

    def _relocate(self, stage: Stage, text: str) -> str:
        """The Dockerfile's own text with its absolute paths moved under the stage's directory."""
        for top in self.tops:
            text = re.sub(rf"(?<![\w.:%/-]){re.escape(top)}(?=/|\s|:|$|[\"'*])", str(stage.root) + top, text)
        return text

    # -- the Dockerfile ----------------------------------------------------------------------------
    def _expand(self, text: str, stage: Stage | None) -> str:
        values = {**self.args, **(stage.env if stage else {})}
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)

    def run(self) -> dict[str, Stage]:
        stage: Stage | None = None
        for step in instructions(self.dockerfile.read_text(encoding="utf-8")):
            handler = getattr(self, f"_{step.keyword.lower()}", None)
            if handler is None:
                raise NotImplementedError(f"the replay does not know {step.keyword}")
            stage = handler(step.arguments, stage) or stage
        return self.stages

    def _arg(self, arguments: str, stage: Stage | None) -> None:
        name, _, default = arguments.partition("=")
        self.args[name] = default

    def _from(self, arguments: str, stage: Stage | None) -> Stage:
        _image, _, name = self._expand(arguments, None).partition(" AS ")
        root = self.work / name.strip()
        python = root / "usr" / "local"
        venv.EnvBuilder(with_pip=True).create(python)
        new = Stage(name.strip(), root, env={
            "PATH": f"{self.shims}:{python / 'bin'}:/usr/bin:/bin",
            "HOME": str(root / "root"),
            "PIP_CONFIG_FILE": os.devnull,  # the image's pip knows no find-links or constraints of this machine
            **{name: os.environ[name] for name in NETWORK_ENVIRONMENT if name in os.environ},
        })
        self.stages[new.name] = new
        return new

    def _env(self, arguments: str, stage: Stage | None) -> None:
        assert stage is not None
        for item in shlex.split(arguments):
            name, _, value = item.partition("=")
            stage.env[name] = self._expand(self._relocate(stage, value), stage)

    def _workdir(self, arguments: str, stage: Stage | None) -> None:
        assert stage is not None
        stage.workdir = self._expand(arguments, stage)
        self._inside(stage, stage.workdir).mkdir(parents=True, exist_ok=True)

    def _copy(self, arguments: str, stage: Stage | None) -> None:
        assert stage is not None
        parts = shlex.split(arguments)
        source_stage = None
        while parts[0].startswith("--"):
            option = parts.pop(0)
            if option.startswith("--from="):
                source_stage = self.stages[option.removeprefix("--from=")]
        *sources, destination = parts
        target = self._inside(stage, destination)
        for source in sources:
            if source_stage is not None:
                matches = [Path(p) for p in glob(str(self._inside(source_stage, source)))]
            else:
                matches = [Path(p) for p in glob(str(self.context / source))]
                matches = [m for m in matches if self._in_context(m)]
            if not matches and not any(c in source for c in "*?["):
                raise FileNotFoundError(f"COPY {source}: not in the build context")
            for match in matches:
                into = target / match.name if destination.endswith("/") or len(matches) > 1 else target
                if match.is_dir():
                    shutil.copytree(match, into if destination.endswith("/") else target, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
                else:
                    into.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(match, into)

    def _in_context(self, path: Path) -> bool:
        """What the .dockerignore lets into the build context (its `*` then `!path` form)."""
        if self.ignore_file is None:
            return True
        allowed = [line[1:].rstrip("/") for line in self.ignore_file.read_text().splitlines() if line.startswith("!")]
        relative = path.relative_to(self.context).as_posix()
        return any(relative == a or relative.startswith(a + "/") for a in allowed)

    def _run(self, arguments: str, stage: Stage | None) -> None:
        assert stage is not None
        mounts = []
        while arguments.startswith("--"):
            option, _, arguments = arguments.partition(" ")
            if option.startswith("--mount="):
                spec = dict(item.split("=", 1) for item in option.removeprefix("--mount=").split(","))
                mounts.append(spec)
        command = self._expand(self._relocate(stage, arguments.strip()), stage)
        for spec in mounts:
            source = self._inside(self.stages[spec["from"]], spec["source"])
            link = self._inside(stage, spec["target"])
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(source, target_is_directory=True)
        subprocess.run(["/bin/sh", "-ec", command], cwd=self._inside(stage, stage.workdir), env=stage.env, check=True,
                       stdout=sys.stderr, stderr=sys.stderr)
        for spec in mounts:  # a bind mount is gone after its RUN
            self._inside(stage, spec["target"]).unlink()

    def _user(self, arguments: str, stage: Stage | None) -> None:
        assert stage is not None
        stage.user = arguments

    def _expose(self, arguments: str, stage: Stage | None) -> None:
        return None

    def _stopsignal(self, arguments: str, stage: Stage | None) -> None:
        return None

    def _healthcheck(self, arguments: str, stage: Stage | None) -> None:
        assert stage is not None
        stage.healthcheck = json.loads(arguments.split(" CMD ", 1)[1])

    def _cmd(self, arguments: str, stage: Stage | None) -> None:
        assert stage is not None
        stage.command = json.loads(arguments)

    def system_calls_made(self) -> list[str]:
        return self.system_calls.read_text().splitlines() if self.system_calls.exists() else []
