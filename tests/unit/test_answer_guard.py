"""The answer guard fed piece by piece, as the agent feeds it while the model writes, gives the same
verdicts as on the whole answer at once, however the answer is cut into pieces."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from domain.services.prompts import _TEMPLATE_LINES, TURN_MARKERS, AnswerGuard, answer_cut

ECHO = _TEMPLATE_LINES[0]


def echo_fragments() -> st.SearchStrategy[str]:
    """Pieces of Aura's instructions and of turn markers, whole or begun, in any case and spacing."""
    needle = st.sampled_from([*_TEMPLATE_LINES, *TURN_MARKERS])
    begun = st.tuples(needle, st.integers(1, 200)).map(lambda pair: pair[0][:pair[1]])
    spaced = st.tuples(begun, st.sampled_from([" ", "  ", "\n", " \t "]), st.booleans()).map(
        lambda t: (t[0].upper() if t[2] else t[0]).replace(" ", t[1]))
    return spaced


TEXT = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(["the ", "answer", " ", "\n", "<", "[", "İ"]),
                          echo_fragments()), max_size=12).map("".join)


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
