"""The offline model's directives: one per line, the name and its JSON arguments, whatever
whitespace surrounds them."""

from __future__ import annotations

import pytest

from adapters.offline.model import Directive, parse_directives
from domain.model.errors import ModelError


def test_each_directive_line_gives_its_name_and_arguments() -> None:
    prompt = ('Please answer.\n  @answer {"text": "hi  there ", "chunks": 2}  \n@git_status\n'
              '\t@git_log{"n": 3}\u00a0\nnot @a directive\n@answer  \u2003{"text": "x"}')
    assert parse_directives(prompt) == [
        Directive(2, "answer", {"text": "hi  there ", "chunks": 2}), Directive(3, "git_status", {}),
        Directive(4, "git_log", {"n": 3}), Directive(6, "answer", {"text": "x"})]


def test_bad_arguments_are_a_clear_error_naming_the_line() -> None:
    with pytest.raises(ModelError, match="Line 2: the arguments of @answer are not valid JSON"):
        parse_directives('ok\n@answer {"text": ')
    with pytest.raises(ModelError, match="Line 1: the arguments of @answer must be a JSON object"):
        parse_directives("@answer [1]")
