"""Reading source files (with bad ones skipped) and chunking them, on a public-domain play excerpt."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.recipes.sources import SourceError, approx_tokens, chunk_text, read_sources

CORIOLANUS = Path(__file__).parent / "data" / "coriolanus-act1-excerpt.txt"


def test_reads_good_files_and_skips_bad_utf8_and_binary(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("Second Citizen:\nOne word, good citizens.\n", encoding="utf-8")
    (tmp_path / "a.md").write_text("# The Senate\n\nMENENIUS:\nWhat work's, my countrymen?\r\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "empty.md").write_text(" \n\n")
    (tmp_path / "notes.csv").write_text("ignored,in,a,folder\n")
    (tmp_path / ".hidden.txt").write_text("ignored too\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("All:\nSpeak, speak.\n")

    docs, skipped = read_sources([tmp_path])

    assert [Path(d.path).name for d in docs] == ["a.md", "b.txt", "c.txt"]
    md = docs[0]
    assert md.title == "The Senate" and docs[1].title == "b"
    assert "\r" not in md.text and md.n_chars == len(md.text) and md.record is None
    assert len(md.sha256) == 64
    reasons = {Path(p).name: r for p, r in skipped}
    assert set(reasons) == {"latin1.txt", "image.txt", "empty.md"}
    assert reasons["latin1.txt"] == "not UTF-8 text (byte 0xe9 at offset 3)"
    assert reasons["image.txt"] == "binary file (contains NUL bytes)"
    assert reasons["empty.md"] == "empty file"


def test_an_explicit_file_is_read_whatever_its_extension(tmp_path: Path) -> None:
    notes = tmp_path / "speech.text"
    notes.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    docs, skipped = read_sources([notes, str(notes)])  # the same file twice is read once
    assert len(docs) == 1 and docs[0].title == "speech" and skipped == []


def test_jsonl_one_document_per_line_with_bad_lines_skipped(tmp_path: Path) -> None:
    lines = [
        json.dumps({"text": "Speak, speak.", "title": "All"}),
        "{not json",
        json.dumps({"body": "no text field"}),
        "",
        json.dumps({"text": "   "}),
        json.dumps(["a", "list"]),
        json.dumps({"text": "Resolved. resolved."}),
    ]
    path = tmp_path / "lines.jsonl"
    path.write_text("\n".join(lines) + "\n")
    docs, skipped = read_sources([path])
    assert [(d.text, d.title, d.record) for d in docs] == [
        ("Speak, speak.", "All", 1),
        ("Resolved. resolved.", "lines:7", 7),
    ]
    assert [(p.rsplit(":", 1)[1], r.split(":")[0]) for p, r in skipped] == [
        ("2", "not JSON"),
        ("3", "no string field 'text'"),
        ("5", "field 'text' is empty"),
        ("6", "no string field 'text'"),
    ]
    docs, _ = read_sources([path], jsonl_field="body")
    assert [d.text for d in docs] == ["no text field"]


def test_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(SourceError, match=r"^no \.txt, \.md or \.jsonl files in .*empty_folder$"):
        read_sources([tmp_path / "empty_folder"])
    with pytest.raises(SourceError, match="^source not found: .*missing.txt$"):
        read_sources([tmp_path / "missing.txt"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SourceError) as err:
        read_sources([tmp_path / "bad"])
    assert str(err.value).startswith("nothing readable in the sources: 1 skipped (first: ")
    assert "\n" not in str(err.value)


def _assert_well_formed(text: str, chunks: list) -> None:
    """Offsets exact, in order, not overlapping; no chunk starts or ends inside a word; nothing lost."""
    previous_end = 0
    for i, chunk in enumerate(chunks):
        assert chunk.index == i
        assert text[chunk.start : chunk.end] == chunk.text
        assert chunk.text == chunk.text.strip() and chunk.text
        assert chunk.start >= previous_end
        assert text[previous_end : chunk.start].strip() == ""  # only whitespace between chunks
        assert chunk.start == 0 or text[chunk.start - 1].isspace()
        assert chunk.end == len(text) or text[chunk.end].isspace()
        previous_end = chunk.end
    assert text[previous_end:].strip() == ""


@pytest.mark.parametrize("max_tokens", [64, 128, 256, 512])
def test_chunking_the_play(max_tokens: int) -> None:
    text = CORIOLANUS.read_text(encoding="utf-8")
    chunks = chunk_text(text, max_tokens=max_tokens)
    _assert_well_formed(text, chunks)
    assert all(c.n_tokens == approx_tokens(c.text) for c in chunks)
    assert all(c.n_tokens <= max_tokens for c in chunks[:-1])
    assert chunks[-1].n_tokens <= max_tokens * 1.25  # a short tail may join the last chunk
    assert all(c.n_tokens >= 32 for c in chunks[1:-1]) or max_tokens < 128


def test_play_chunks_keep_speeches_with_their_speakers() -> None:
    text = CORIOLANUS.read_text(encoding="utf-8")
    chunks = chunk_text(text, max_tokens=256)
    assert len(chunks) == 18
    speaker = re.compile(r"^[A-Z][A-Za-z ]+:$")
    for chunk in chunks:
        first_line = chunk.text.split("\n", 1)[0]
        assert speaker.match(first_line), first_line  # every chunk opens with a speaker's name...
        last_line = chunk.text.rsplit("\n", 1)[-1]
        if speaker.match(last_line):  # ...and ends on one only where the text has an empty speech
            assert text[chunk.end - len(last_line) - 2 : chunk.end + 2] == "\n\nFirst Senator:\n\n"
    assert chunks[0].text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")


def test_a_long_paragraph_is_cut_at_sentences_then_words() -> None:
    sentences = " ".join(f"Sentence number {i} has exactly seven words." for i in range(30))
    chunks = chunk_text(sentences, max_tokens=40, min_tokens=0)
    _assert_well_formed(sentences, chunks)
    assert all(c.text.endswith("words.") for c in chunks)  # cut after sentence ends
    assert all(c.n_tokens <= 40 for c in chunks)

    run_on = " ".join(f"word{i}" for i in range(300))
    chunks = chunk_text(run_on, max_tokens=50, min_tokens=0)
    _assert_well_formed(run_on, chunks)
    assert all(c.n_tokens <= 50 for c in chunks)


def test_verse_without_sentence_ends_is_cut_at_line_breaks() -> None:
    verse = "\n".join(f"line {i} of a verse that never stops to breathe" for i in range(40))
    chunks = chunk_text(verse, max_tokens=60, min_tokens=0)
    _assert_well_formed(verse, chunks)
    assert all(c.text.startswith("line ") and c.text.endswith("breathe") for c in chunks)


def test_a_short_tail_joins_the_previous_chunk() -> None:
    text = "\n\n".join(["alpha " * 45, "beta " * 45, "gamma gamma"])  # 59, 59 and 3 tokens
    chunks = chunk_text(text, max_tokens=60, min_tokens=10)
    assert [c.text.split()[0] for c in chunks] == ["alpha", "beta"]
    assert chunks[-1].text.endswith("gamma gamma") and chunks[-1].n_tokens == 62  # over 60, within 75
    assert len(chunk_text(text, max_tokens=60, min_tokens=0)) == 3


def test_a_real_tokenizer_can_be_passed() -> None:
    chars = len  # a "tokenizer" of one token per character
    text = "Speak, speak.\n\nResolved. resolved.\n\nWe know't, we know't."
    chunks = chunk_text(text, max_tokens=20, min_tokens=0, count_tokens=chars)
    # the last sentence has 21 characters, over the limit: it is cut between words, then repacked
    assert [c.text for c in chunks] == ["Speak, speak.", "Resolved. resolved.", "We know't, we", "know't."]
    assert [c.n_tokens for c in chunks] == [13, 19, 13, 7]


def test_empty_and_whitespace_text_give_no_chunks() -> None:
    assert chunk_text("") == [] and chunk_text(" \n\n\t ") == []
    with pytest.raises(ValueError):
        chunk_text("x", max_tokens=0)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(list("ab .!?\n\t,é\u00a0\u2028")) | st.characters(), max_size=400),
    max_tokens=st.integers(min_value=1, max_value=40),
    min_tokens=st.integers(min_value=0, max_value=20),
)
def test_chunks_cover_every_non_whitespace_character_in_order(text: str, max_tokens: int, min_tokens: int) -> None:
    chunks = chunk_text(text, max_tokens=max_tokens, min_tokens=min_tokens)
    _assert_well_formed(text, chunks)
    assert "".join("".join(c.text.split()) for c in chunks) == "".join(text.split())


def test_chunks_are_cut_per_tokenizer_and_old_ones_adopted_when_they_match(tmp_path: Path, demo_model: Path, smollm2_model: Path) -> None:
    """The same source and max_tokens on two models' vocabularies give two cuts, each counted in its own tokens
    and reused by its own model; a cut stored before chunks had a tokenizer (migration 10) is adopted by the model
    whose cut it is, keeping its ids (generations refer to them), and not by another."""
    from appliance.engine.llama import Vocab
    from appliance.recipes.build import ingest_chunks
    from appliance.recipes.recipe import load_recipe
    from appliance.store import Store

    recipe = tmp_path / "r.toml"
    source = Path(__file__).resolve().parent.parent / "recipes" / "sources" / "coriolanus-act1-excerpt.txt"
    recipe.write_text(f'kind = "annotated"\nmodel = "{demo_model}"\nprompt = "p.md"\nsources = ["{source}"]\n'
                      "[chunking]\nmax_tokens = 120\nmin_tokens = 30\n")
    loaded = load_recipe(recipe)
    store = Store(tmp_path / "a.db")

    def cut(model: Path, key: str) -> list[dict]:
        with Vocab(model) as vocab:
            chunks, _ = ingest_chunks(store, loaded, vocab, key)
            for c in chunks:
                assert c["n_tokens"] == vocab.count(c["text"])  # counted in this model's tokens
        return chunks

    def ids(chunks: list[dict]) -> list[int]:
        return [c["id"] for c in chunks]

    gemma, smol = cut(demo_model, "gemma"), cut(smollm2_model, "smol")
    assert set(ids(gemma)).isdisjoint(ids(smol)) and [c["n_tokens"] for c in gemma] != [c["n_tokens"] for c in smol]
    assert ids(cut(demo_model, "gemma")) == ids(gemma) and ids(cut(smollm2_model, "smol")) == ids(smol)  # reused
    count = store.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
    store.conn.execute("UPDATE chunks SET tokenizer = NULL WHERE tokenizer = 'gemma'")  # as migration 10 leaves them
    assert ids(cut(smollm2_model, "smol-q8")) != ids(gemma)  # another cut: not adopted
    assert ids(cut(demo_model, "gemma-again")) == ids(gemma)  # its own cut: adopted, the same rows
    assert store.conn.execute("SELECT count(*) FROM chunks WHERE tokenizer IS NULL").fetchone()[0] == 0
    assert store.conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == count + len(smol)
