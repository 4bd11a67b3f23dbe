"""Filters on hand-written data: echo guard, emptiness, length, JSON, grounding, duplicates."""

from __future__ import annotations

import pytest

from appliance.data.filters import (
    EchoGuard,
    NearDuplicateIndex,
    QualityError,
    check_grounded,
    check_json,
    check_length,
    check_not_empty,
    check_truncated,
    cue_line,
    strip_cue,
    echo_metrics,
    grounding_score,
    summarize_echo,
)

SPEECH = """First Citizen:
We are accounted poor citizens, the patricians good.
What authority surfeits on would relieve us: if they
would yield us but the superfluity, while it were
wholesome, we might guess they relieved us humanely;
but they think we are too dear: the leanness that
afflicts us, the object of our misery, is as an
inventory to particularise their abundance; our
sufferance is a gain to them Let us revenge this with
our pikes, ere we become rakes: for the gods know I
speak this in hunger for bread, not in thirst for revenge."""

GOOD = "Write a speech in which a hungry citizen rouses the crowd against the patricians."
ECHO = (
    "Write a speech for the First Citizen saying that we are accounted poor citizens, the patricians good; "
    "what authority surfeits on would relieve us; the leanness that afflicts us, the object of our misery, "
    "is as an inventory to particularise their abundance; let us revenge this with our pikes, ere we become rakes."
)
# A paraphrase with no copied wording, but spelling out everything: as long as the speech itself.
TOO_LONG = (
    "Compose a monologue, in early modern English verse-like prose, for a starving plebeian who addresses "
    "a rioting mob. He should argue that the rulers are thought virtuous while commoners are despised, "
    "that even the leftovers of the rich would save lives if handed out while still fresh, that nobles "
    "consider the poor too costly to keep, that famine serves as a list proving aristocratic plenty, that "
    "suffering profits the powerful, and he must urge vengeance with spears before everyone grows thin as "
    "garden tools, insisting his motive is food and never bloodlust. Close with the mob shouting agreement."
)


def test_echo_metrics_measure_words_ngrams_and_runs() -> None:
    m = echo_metrics("Say: the cat sat on the mat", "The cat sat on the mat today.")
    assert (m.instruction_words, m.output_words) == (7, 7)
    assert m.length_ratio == 1.0
    assert m.ngram_overlap == pytest.approx(4 / 5)  # the cat sat / cat sat on / sat on the / on the mat
    assert m.longest_shared_run == 6


def test_echo_metrics_short_output_uses_shorter_ngrams() -> None:
    assert echo_metrics("Reply with: speak, speak", "Speak, speak.").ngram_overlap == 1.0
    assert echo_metrics("Reply", "").length_ratio == float("inf")


def test_echo_guard_keeps_a_short_instruction_that_leaves_the_writing_to_the_model() -> None:
    verdict = EchoGuard().check(GOOD, SPEECH)
    assert verdict.passed, verdict.reason
    assert verdict.filter == "echo"
    m = echo_metrics(GOOD, SPEECH)
    assert m.length_ratio < 0.2 and m.ngram_overlap < 0.05 and m.longest_shared_run <= 2


def test_echo_guard_flags_an_instruction_that_restates_the_passage() -> None:
    verdict = EchoGuard().check(ECHO, SPEECH)
    assert not verdict.passed
    assert "3-grams" in verdict.reason and "limit 30%" in verdict.reason
    assert "run of" in verdict.reason
    assert verdict.score == pytest.approx(echo_metrics(ECHO, SPEECH).ngram_overlap)
    assert "\n" not in verdict.reason


def test_echo_guard_flags_an_instruction_as_long_as_its_output() -> None:
    m = echo_metrics(TOO_LONG, SPEECH)
    assert m.ngram_overlap < 0.3 and m.longest_shared_run < 12  # not an echo by wording...
    verdict = EchoGuard().check(TOO_LONG, SPEECH)
    assert not verdict.passed  # ...but it leaves nothing to infer
    assert "x the output's length" in verdict.reason and "3-grams" not in verdict.reason


def test_echo_guard_thresholds_are_configurable() -> None:
    assert EchoGuard(max_length_ratio=2.0).check(TOO_LONG, SPEECH).passed
    assert not EchoGuard(max_ngram_overlap=0.0).check("a b c", "x a b c").passed
    assert EchoGuard(max_ngram_overlap=1.0, max_shared_run=50, max_length_ratio=5).check(ECHO, SPEECH).passed
    with pytest.raises(ValueError):
        EchoGuard.model_validate({"nonsense": 1})


def test_summarize_echo_gives_the_distribution() -> None:
    metrics = [echo_metrics(i, SPEECH) for i in (GOOD, ECHO, TOO_LONG)]
    summary = summarize_echo(metrics)
    assert summary["count"] == 3
    ratio = summary["length_ratio"]
    assert ratio["min"] <= ratio["median"] <= ratio["p90"] <= ratio["max"]
    assert ratio["max"] == max(m.length_ratio for m in metrics)
    assert summary["ngram_overlap"]["median"] == sorted(m.ngram_overlap for m in metrics)[1]
    assert summarize_echo([]) == {"count": 0}


def test_check_not_empty_and_truncated_are_separate_filters() -> None:
    assert check_not_empty("Speak, speak.").passed
    empty = check_not_empty("  \n\t")
    assert not empty.passed and (empty.filter, empty.reason) == ("not_empty", "output is empty")
    truncated = check_truncated("length")
    assert not truncated.passed and truncated.filter == "truncated" and "cut off at the token limit" in truncated.reason
    assert check_truncated("length", allow_truncated=True).passed
    assert check_truncated("stop").passed and check_truncated("eos").passed


def test_cue_echo_is_found_and_stripped() -> None:
    prompt = "Product: a wool blanket\nTone: calm\nReview: Soft and warm.\n\nProduct: a lamp\nTone: calm\nReview:"
    assert cue_line(prompt) == "Review:" and cue_line(prompt + "\n") == "Review:"
    assert cue_line("Write a poem about the sea.") is None  # no cue: nothing is stripped
    assert strip_cue(" Review: Bright enough.", "Review:") == ("Bright enough.", 1)
    assert strip_cue("Review:\nreview: Bright.", "Review:") == ("Bright.", 2)
    assert strip_cue("Reviews are mixed.", "Review:") == ("Reviews are mixed.", 0)
    assert strip_cue("A Review: nested", "Review:") == ("A Review: nested", 0)
    assert strip_cue("Review:", None) == ("Review:", 0)


def test_check_length() -> None:
    assert check_length("one two three", min_words=2, max_words=3).passed
    short = check_length("one", min_words=2)
    assert not short.passed and short.reason == "1 words, fewer than 2"
    assert not check_length("one two three", max_words=2).passed
    assert not check_length("abc", min_chars=4).passed
    assert not check_length("abcdef", max_chars=5).passed
    assert check_length("anything").passed


def test_check_json_without_schema() -> None:
    assert check_json('{"intent": "lights_on"}').passed
    bad = check_json('{"intent": ')
    assert not bad.passed and bad.reason.startswith("not valid JSON") and "\n" not in bad.reason


SCHEMA = {
    "type": "object",
    "properties": {
        "intent": {"enum": ["lights_on", "lights_off"]},
        "slots": {"type": "array", "items": {"type": "object", "required": ["name"]}},
    },
    "required": ["intent"],
    "additionalProperties": False,
}


def test_check_json_with_schema_names_the_path() -> None:
    assert check_json('{"intent": "lights_on", "slots": [{"name": "room"}]}', SCHEMA).passed
    wrong_enum = check_json('{"intent": "dance"}', SCHEMA)
    assert not wrong_enum.passed and wrong_enum.reason.startswith("schema: $.intent:")
    missing = check_json('{"intent": "lights_off", "slots": [{"value": 1}]}', SCHEMA)
    assert not missing.passed and missing.reason == "schema: $.slots[0]: 'name' is a required property"
    assert check_json('{"slots": []}', SCHEMA).reason == "schema: $: 'intent' is a required property"
    assert not check_json('{"intent": "lights_on", "extra": 1}', SCHEMA).passed
    assert not check_json("[1, 2]", SCHEMA).passed


def test_check_json_rejects_an_invalid_schema_in_one_line() -> None:
    with pytest.raises(QualityError) as err:
        check_json("{}", {"type": "no-such-type"})
    assert "invalid JSON schema" in str(err.value) and "\n" not in str(err.value)


SOURCE = (
    "Caius Marcius is chief enemy to the people. The citizens are resolved rather to die than to famish, "
    "and they mean to kill him and have corn at their own price."
)


def test_grounding() -> None:
    grounded = "Marcius is the people's chief enemy; the citizens mean to have corn at their own price."
    assert grounding_score(grounded, SOURCE) == 1.0
    assert check_grounded(grounded, SOURCE).passed
    invented = "The emperor ordered new taxes on wine and olive oil across distant provinces."
    verdict = check_grounded(invented, SOURCE)
    assert not verdict.passed and verdict.score == 0.0 and verdict.reason.startswith("0 of 10 content words (0%)")
    assert grounding_score("Marcius loves olive oil", SOURCE) == pytest.approx(1 / 4)
    empty = check_grounded("It is what it is.", SOURCE)
    assert not empty.passed and empty.reason == "answer has no content words"


NEWS = (
    "The river flooded the lower town on Tuesday night after three days of heavy rain. Residents were "
    "moved to the school gym, and the mayor said the bridge will stay closed until engineers inspect it. "
    "Volunteers handed out blankets and hot soup, and the weather service expects the water to fall by Friday."
)


def test_near_duplicate_index_catches_exact_and_light_edits() -> None:
    index = NearDuplicateIndex()
    assert index.add("a", NEWS) is None
    shouted = NEWS.upper().replace(",", ";").replace(" ", "  ")
    assert index.add("b", shouted) == "a"
    edited = NEWS.replace("Tuesday", "Wednesday")
    verdict = index.check("c", edited)
    assert not verdict.passed and verdict.reason.startswith("near-duplicate of item a (estimated Jaccard 0.")
    assert verdict.score is not None and 0.8 <= verdict.score < 1
    exact = index.check("d", NEWS)
    assert not exact.passed and exact.reason == "exact duplicate of item a" and exact.score == 1.0
    unrelated = index.check("e", "A recipe for bread: mix flour, water, salt and yeast, then let it rise overnight.")
    assert unrelated.passed and unrelated.reason == "no earlier duplicate"
    assert len(index) == 2  # duplicates are not indexed


def test_near_duplicate_index_short_texts_and_determinism() -> None:
    index = NearDuplicateIndex()
    assert index.add("a", "lights on") is None
    assert index.add("b", "Lights on!") == "a"
    assert index.add("c", "lights off") is None
    assert index.add("d", "...") is None
    assert index.add("e", "?!") == "d"  # no words: exact match on the empty normalized text only

    def run() -> list:
        index = NearDuplicateIndex(seed=3)
        return [
            index.add(str(i), NEWS.replace("Tuesday", day)) for i, day in enumerate(["Monday", "Thursday", "Sunday"])
        ]

    assert run() == run() == [None, "0", "0"]
    with pytest.raises(ValueError):
        index.insert("a", "again")
