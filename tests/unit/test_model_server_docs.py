"""docs/operators.md's model server examples are settings Aura really reads, exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "operators.md"


def examples() -> list[dict[str, str]]:
    text = DOC.read_text()
    section = text[text.index("## Model servers"):text.index("## Health and readiness")]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    return [dict(line.split("=", 1) for line in block.strip().splitlines()) for block in blocks]


def test_every_flavour_has_an_example() -> None:
    assert sorted(e["AURA_MODEL__FLAVOUR"] for e in examples()) == ["azure", "llamacpp", "ollama", "openai", "vllm"]


@pytest.mark.parametrize("example", examples(), ids=lambda e: e["AURA_MODEL__FLAVOUR"])
def test_each_example_names_real_settings_and_loads(example: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in example:
        section, _, field = name.removeprefix("AURA_").lower().partition("__")
        assert field in type(getattr(Settings(), section)).model_fields, name
    for name, value in example.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.model.provider == "openai" and settings.model.base_url == example["AURA_MODEL__BASE_URL"]
    if "AURA_MODEL__CONTEXT_WINDOW" in example:
        assert settings.model.context_window == int(example["AURA_MODEL__CONTEXT_WINDOW"])


def test_the_token_settings_table_names_real_settings() -> None:
    text = DOC.read_text()
    table = text[text.index("### Context window and tokens"):text.index("### Plans, tools and small models")]
    named = set(re.findall(r"`(AURA_MODEL__[A-Z_]+)`", table))
    assert named >= {"AURA_MODEL__CONTEXT_WINDOW", "AURA_MODEL__PLAN_MAX_TOKENS", "AURA_MODEL__STEP_MAX_TOKENS",
                     "AURA_MODEL__ANSWER_MAX_TOKENS"}
    for name in named:
        assert name.removeprefix("AURA_MODEL__").lower() in type(Settings().model).model_fields, name
