"""The answer guard fed piece by piece, as the agent feeds it while the model writes, gives the same
verdicts as on the whole answer at once, however the answer is cut into pieces."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from domain.services.prompts import _ECHOES, _TEMPLATE_LINES, ECHO_MIN_CHARS, TURN_MARKERS, AnswerGuard, answer_cut

ECHO = _TEMPLATE_LINES[0]


def echo_fragments() -> st.SearchStrategy[str]:
    """Pieces of Aura's instructions and of turn markers, whole or begun, in any case and spacing."""
    needle = st.sampled_from([*_TEMPLATE_LINES, *TURN_MARKERS])
    begun = st.tuples(needle, st.integers(1, 200)).map(lambda pair: pair[0][:pair[1]])
    spaced = st.tuples(begun, st.sampled_from([" ", "  ", "\n", " \t "]), st.booleans()).map(
        lambda t: (t[0].upper() if t[2] else t[0]).replace(" ", t[1]))
    return spaced


# Printable ASCII (the pieces the guard normalises by str methods) beside any text, control
# characters and whitespace runs included.
PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24)
TEXT = st.lists(st.one_of(st.text(max_size=8), PRINTABLE,
                          st.sampled_from(["the ", "answer", " ", "  ", "\n", "\x1f", "\x01", "<", "[", "İ"]),
                          echo_fragments()), max_size=12).map("".join)


class StepByStepGuard:
    """The guard's definition, character by character with the automaton's `step` (the guard
    normalises ASCII pieces with str methods and looks its moves up in a table instead)."""

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.length = 0
        self.space = False
        self.state = 0

    def feed(self, piece: str, *, final: bool = False) -> tuple[int, bool]:
        echo_start: int | None = None
        for index, char in enumerate(piece, self.length):
            if char.isspace():
                if self.space:
                    continue
                char = " "
            self.space = char == " "
            for lowered in char.lower():
                self.positions.append(index)
                self.state = _ECHOES.step(self.state, lowered)
                if _ECHOES.longest_match[self.state]:
                    start = len(self.positions) - _ECHOES.longest_match[self.state]
                    echo_start = start if echo_start is None else min(echo_start, start)
        self.length += len(piece)
        if echo_start is not None:
            return self.positions[echo_start], True
        held = _ECHOES.held[self.state]
        if final:
            return (self.positions[-held], True) if held >= ECHO_MIN_CHARS else (self.length, False)
        return (self.positions[-held] if held else self.length), False


@given(text=TEXT, cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_the_guard_gives_the_verdicts_of_its_step_by_step_definition(text: str, cuts: list[int]) -> None:
    bounds = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    guard, definition = AnswerGuard(), StepByStepGuard()
    for start, end in pairwise(bounds):
        verdict = guard.feed(text[start:end])
        assert verdict == definition.feed(text[start:end])
        if verdict[1]:
            return
    assert guard.feed("", final=True) == definition.feed("", final=True)


@given(text=TEXT, cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_pieces_give_the_verdicts_of_the_whole_answer(text: str, cuts: list[int]) -> None:
    bounds = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    guard = AnswerGuard()
    for start, end in pairwise(bounds):
        verdict = guard.feed(text[start:end])
        assert verdict == answer_cut(text[:end], final=False)
        if verdict[1]:
            return
    assert guard.feed("", final=True) == answer_cut(text, final=True)


def test_an_echo_split_across_pieces_ends_the_answer_where_it_began() -> None:
    guard = AnswerGuard()
    assert guard.feed("Done. ") == (6, False)
    half = len(ECHO) // 2
    assert guard.feed(ECHO[:half].upper()) == (6, False)  # held back: it may be an echo
    assert guard.feed(ECHO[half:] + " more") == (6, True)


def test_text_that_only_began_like_an_echo_is_shown_when_it_goes_elsewhere() -> None:
    guard = AnswerGuard()
    assert guard.feed("Sure <") == (5, False)  # "<" may begin a turn marker
    assert guard.feed("3 apples") == (14, False)
    assert guard.feed("", final=True) == (14, False)


def test_states_where_an_echo_is_complete_are_numbered_last() -> None:
    """The guard tells such a state by `state >= _ECHOES.echoed` alone."""
    complete = [state for state, length in enumerate(_ECHOES.longest_match) if length]
    assert complete == list(range(_ECHOES.echoed, len(_ECHOES.longest_match)))
    assert _ECHOES.longest_match[0] == 0 and _ECHOES.step(0, ECHO[0]) != 0


def test_an_answer_of_printable_pieces_keeps_one_stretch_of_positions() -> None:
    """Where each normalised character stands is kept per stretch, not per character: a long answer
    in ordinary pieces keeps one, and one more per whitespace run it folds."""
    guard = AnswerGuard()
    for _ in range(500):
        assert guard.feed("Plain words, 20 char")[1] is False
    assert guard._starts == [0] and guard._origins == [0]
    assert guard.feed("s \n  then more") == answer_cut("Plain words, 20 char" * 500 + "s \n  then more", final=False)
    assert guard._starts == [0, 10_000 + 2] and guard._origins == [0, 10_000 + 5]
