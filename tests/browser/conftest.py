"""Fixtures for the console: the app in process, the real service under hypercorn, and Chromium.

Chromium is Debian's (`apt-get install -y chromium`), driven by Playwright over CDP; Playwright's
own browser downloads are never used. A missing /usr/bin/chromium fails the tests (never skips):
a skipped browser test would hide a broken console.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from dependency_injector import providers
from playwright.sync_api import BrowserContext, ConsoleMessage, Page, sync_playwright
from quart import Quart

from adapters.http.routes.console import ConsoleConfig
from app.container import Container
from app.factory import create_app
from app.settings import Settings
from tests.aura_process import AuraProcess
from tests.support import SECRET, make_repo

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"

# ---- the app in process (routes) ---------------------------------------------------------------

@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "workspace"
    make_repo(root / "repo")
    return root


@pytest.fixture
def console_app(workspace: Path) -> Callable[[ConsoleConfig], Quart]:
    """An app serving the console with the given configuration."""

    def build(config: ConsoleConfig) -> Quart:
        settings = Settings(auth={"jwt_secret": SECRET}, tools={"workspace_root": str(workspace)})
        container = Container(settings=settings)
        app = create_app(settings, container)
        container.console_config.override(providers.Object(config))
        return app

    return build


# ---- the real service --------------------------------------------------------------------------

def start_service(workspace: Path, log_dir: Path, name: str, env: dict[str, str] | None = None) -> AuraProcess:
    """`aura serve` on a free port with `workspace` as the tools' root, serving the console."""
    child_env = dict(env or {})
    return AuraProcess(workspace=workspace, log_path=log_dir / f"{name}.log", env=child_env).start()


@pytest.fixture
def start_aura(workspace: Path, tmp_path: Path) -> Iterator[Callable[..., AuraProcess]]:
    started: list[AuraProcess] = []

    def start(env: dict[str, str] | None = None) -> AuraProcess:
        started.append(start_service(workspace, tmp_path, f"aura-{len(started)}", env))
        return started[-1]

    yield start
    for process in started:
        process.stop()


# ---- Chromium -------------------------------------------------------------------------------

def launch_chromium(playwright: Any, profile: Path) -> BrowserContext:
    if not CHROMIUM.exists():
        pytest.fail(f"Debian's Chromium is missing at {CHROMIUM}: install it with `apt-get install -y chromium` "
                    "(scripts/test must do this before running the browser tests).", pytrace=False)
    context: BrowserContext = playwright.chromium.launch_persistent_context(
        str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1400, "height": 1000}, locale="en-GB", timezone_id="UTC",
    )
    context.set_default_timeout(10_000)
    return context


class PageProblems:
    """Console errors and warnings and uncaught exceptions of a page; a CSP violation shows up
    here. A test that provokes an error on purpose allows it with `allow`."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.allowed: list[re.Pattern[str]] = []

    def watch(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.messages.append(f"uncaught: {error}"))

    def allow(self, pattern: str) -> None:
        self.allowed.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [m for m in self.messages if not any(p.search(m) for p in self.allowed)]

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.messages.append(f"{message.type}: {message.text}")


@contextmanager
def chromium(profile: Path) -> Iterator[BrowserContext]:
    with sync_playwright() as playwright:
        context = launch_chromium(playwright, profile)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    """A headless Chromium with a fresh profile."""
    with chromium(tmp_path / "chromium-profile") as context:
        yield context


@pytest.fixture
def page_problems() -> PageProblems:
    return PageProblems()


@pytest.fixture
def page(browser: BrowserContext, page_problems: PageProblems) -> Iterator[Page]:
    """The browser's page; after the test, it must not have logged an unexpected problem."""
    page = browser.pages[0] if browser.pages else browser.new_page()
    page_problems.watch(page)
    yield page
    assert page_problems.unexpected() == [], f"the page logged problems: {page_problems.unexpected()}"


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
