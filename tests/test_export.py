"""Export formats read back, leak-free deterministic splits, and the dataset card."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.data.card import dataset_card
from appliance.data.examples import (
    FORMATS,
    PREFERENCE_FORMATS,
    Example,
    ExportError,
    dedup_text,
    record_line,
    to_record,
    write_jsonl,
)
from appliance.data.splits import parse_split_spec, split_examples
from appliance.store.database import Store

WITH_SYSTEM = Example(
    id="ex1",
    instruction="Classify the intent.",
    input="turn the kitchen lights on",
    output="lights_on",
    system="You are a smart-home assistant.",
    label="lights_on",
    meta={"run": 3},
)
PLAIN = Example(id="ex2", instruction="Write the crowd's reply.", output="Speak, speak.", group="chunk-1")


def test_records_in_each_format() -> None:
    assert to_record(WITH_SYSTEM, "openai") == {
        "messages": [
            {"role": "system", "content": "You are a smart-home assistant."},
            {"role": "user", "content": "Classify the intent.\n\nturn the kitchen lights on"},
            {"role": "assistant", "content": "lights_on"},
        ]
    }
    assert to_record(PLAIN, "openai")["messages"][0] == {"role": "user", "content": "Write the crowd's reply."}
    assert to_record(WITH_SYSTEM, "sharegpt")["conversations"] == [
        {"from": "system", "value": "You are a smart-home assistant."},
        {"from": "human", "value": "Classify the intent.\n\nturn the kitchen lights on"},
        {"from": "gpt", "value": "lights_on"},
    ]
    assert to_record(PLAIN, "alpaca") == {
        "instruction": "Write the crowd's reply.",
        "input": "",
        "output": "Speak, speak.",
    }
    assert to_record(WITH_SYSTEM, "alpaca")["system"] == "You are a smart-home assistant."
    assert Example(**to_record(WITH_SYSTEM, "jsonl")) == WITH_SYSTEM
    with pytest.raises(ExportError, match="^unknown format 'csv' \\(choose from openai, sharegpt, alpaca, jsonl, dpo, openai-preference\\)$"):
        to_record(PLAIN, "csv")


def test_each_line_is_json_dumps_exactly() -> None:
    """The lines written from an example's strings directly are `json.dumps(record, ensure_ascii=False)`'s, byte
    for byte, whatever the text holds (quotes, backslashes, control characters, line separators, astral and lone
    surrogate code points), with and without a system message or input, single turns and conversations."""
    rng = random.Random(22)
    alphabet = ["a", " ", '"', "\\", "\n", "\t", "\x00", "\x1f", "\x7f", "é", "—", "“", "\u2028", "😀", "\ud800", "/", "<", "'"]

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))

    for i in range(2000):
        turns = rng.choice([None, None, [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]])
        ex = Example(id=str(i), instruction=text(), input=rng.choice(["", text()]), output=text(), system=rng.choice([None, "", text()]),
                     rejected=text(), messages=turns, label=rng.choice([None, text()]), meta={"seed": i})
        for fmt in FORMATS:
            assert record_line(ex, fmt) == json.dumps(to_record(ex, fmt), ensure_ascii=False), (ex, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_and_read_back(tmp_path: Path, fmt: str) -> None:
    examples = [
        WITH_SYSTEM,
        PLAIN,
        replace(PLAIN, id="ex3", output="Ünïcödé — “quotes”\nand a newline"),
    ]
    if fmt in PREFERENCE_FORMATS:
        examples = [replace(ex, rejected="no.") for ex in examples]
    path = tmp_path / f"data.{fmt}.jsonl"
    assert write_jsonl(path, examples, fmt) == 3
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3 and records == [to_record(ex, fmt) for ex in examples]
    assert "Ünïcödé" in lines[2]  # written as UTF-8, not \\u escapes
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


CONVERSATION = Example(
    id="c1", instruction="Who speaks first?", output="Then he speaks of Rome.", system="Answer from the passage.",
    messages=[{"role": "user", "content": "Who speaks first?"}, {"role": "assistant", "content": "A citizen."},
              {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Then he speaks of Rome."}],
)
PAIR = Example(id="p1", instruction="Name a primary colour.", output="Red.", rejected="Purple, probably.", system="Be brief.")


def test_a_conversation_in_each_format() -> None:
    turns = CONVERSATION.messages
    assert to_record(CONVERSATION, "openai") == {"messages": [{"role": "system", "content": "Answer from the passage."}, *turns]}
    assert [(t["from"], t["value"]) for t in to_record(CONVERSATION, "sharegpt")["conversations"]] == [
        ("system", "Answer from the passage."), ("human", "Who speaks first?"), ("gpt", "A citizen."),
        ("human", "And then?"), ("gpt", "Then he speaks of Rome.")]
    assert to_record(CONVERSATION, "alpaca") == {  # LLaMA-Factory's alpaca: earlier exchanges in `history`
        "instruction": "And then?", "input": "", "output": "Then he speaks of Rome.",
        "history": [["Who speaks first?", "A citizen."]], "system": "Answer from the passage."}
    assert Example(**to_record(CONVERSATION, "jsonl")) == CONVERSATION
    assert dedup_text(CONVERSATION) == "Who speaks first?\nA citizen.\nAnd then?\nThen he speaks of Rome."


def test_preference_pairs_in_trl_and_openai_form() -> None:
    context = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a primary colour."}]
    assert to_record(PAIR, "dpo") == {"prompt": context, "chosen": [{"role": "assistant", "content": "Red."}],
                                      "rejected": [{"role": "assistant", "content": "Purple, probably."}]}
    assert to_record(PAIR, "openai-preference") == {
        "input": {"messages": context}, "preferred_output": [{"role": "assistant", "content": "Red."}],
        "non_preferred_output": [{"role": "assistant", "content": "Purple, probably."}]}
    assert to_record(PAIR, "openai")["messages"][-1] == {"role": "assistant", "content": "Red."}  # SFT on the chosen one
    with pytest.raises(ExportError, match="^format dpo needs preference pairs .*example ex2"):
        to_record(PLAIN, "dpo")


def test_exported_files_load_with_hf_datasets(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    write_jsonl(tmp_path / "dpo.jsonl", [PAIR, replace(PAIR, id="p2")], "dpo")
    write_jsonl(tmp_path / "conv.jsonl", [CONVERSATION, PLAIN], "openai")
    dpo = datasets.load_dataset("json", data_files=str(tmp_path / "dpo.jsonl"), split="train")
    assert dpo.column_names == ["prompt", "chosen", "rejected"] and dpo[0]["chosen"][0]["role"] == "assistant"
    conv = datasets.load_dataset("json", data_files=str(tmp_path / "conv.jsonl"), split="train")
    assert conv.column_names == ["messages"] and len(conv[0]["messages"]) == 5


def test_write_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="^cannot write .*nowhere/data.jsonl: No such file or directory$"):
        write_jsonl(tmp_path / "nowhere" / "data.jsonl", [PLAIN], "openai")
    with pytest.raises(ExportError, match="unknown format"):
        write_jsonl(tmp_path / "data.jsonl", [PLAIN], "yaml")
    assert list(tmp_path.iterdir()) == []


def test_parse_split_spec() -> None:
    assert parse_split_spec("train=0.9,test=0.1") == {"train": 0.9, "test": 0.1}
    assert parse_split_spec(" train = 0.8 , validation=0.1, test=0.1 ") == {
        "train": 0.8,
        "validation": 0.1,
        "test": 0.1,
    }
    assert parse_split_spec("all=1") == {"all": 1.0}
    bad = {
        "train=0.9,test=0.05": "split ratios add up to 0.95, not 1",
        "train=0.9,test": "split 'test' is not NAME=RATIO (e.g. train=0.9,test=0.1)",
        "train=0.9,my-test=0.1": "split name 'my-test' is not an identifier (letters, digits, underscores)",
        "train=0.5,train=0.5": "split 'train' is named twice",
        "train=ninety": "split train: ratio 'ninety' is not a number",
        "train=1.5,test=-0.5": "split train: ratio must be above 0 and at most 1, got 1.5",
        "": "split '' is not NAME=RATIO (e.g. train=0.9,test=0.1)",
    }
    for spec, message in bad.items():
        with pytest.raises(ExportError) as err:
            parse_split_spec(spec)
        assert str(err.value) == message


WORDS = (
    "river bread lamp window garden horse winter letter market candle mountain harbor violin ladder "
    "pepper kettle meadow anchor blanket copper forest island jacket lemon mirror needle orchard "
    "pillow quarry saddle thunder tunnel valley wagon yarn zebra basket cellar desert engine feather"
).split()


def _sentence(rng: random.Random, n: int = 14) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _dataset(n: int = 120, seed: int = 5) -> list[Example]:
    """Unique examples, some sharing a group, some near-duplicate pairs, three unbalanced labels."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        label = ["common", "common", "common", "mid", "rare"][i % 5]
        group = f"chunk-{i // 4}" if i < 40 else None
        examples.append(
            Example(id=f"e{i:03d}", instruction=f"Say something {i}.", output=_sentence(rng), group=group, label=label)
        )
    for i in range(60, min(n, 80)):  # near duplicates of earlier, ungrouped examples: one word added
        source = examples[i - 15]
        update = {"instruction": source.instruction, "output": source.output + " glacier", "label": source.label}
        examples[i] = replace(examples[i], **update)
    return examples


def _split_of(splits: dict[str, list[Example]]) -> dict[str, str]:
    return {ex.id: name for name, split in splits.items() for ex in split}


def test_split_is_deterministic_and_independent_of_input_order() -> None:
    examples = _dataset()
    ratios = parse_split_spec("train=0.8,validation=0.1,test=0.1")
    first = split_examples(examples, ratios, seed=1)
    shuffled = examples[:]
    random.Random(99).shuffle(shuffled)
    again = split_examples(shuffled, ratios, seed=1)
    assert {k: [ex.id for ex in v] for k, v in first.items()} == {k: [ex.id for ex in v] for k, v in again.items()}
    assert sorted(ex.id for split in first.values() for ex in split) == sorted(ex.id for ex in examples)
    other = split_examples(examples, ratios, seed=2)
    assert _split_of(other) != _split_of(first)
    counts = {name: len(split) for name, split in first.items()}
    assert abs(counts["train"] - 96) <= 4 and abs(counts["test"] - 12) <= 4, counts


def test_no_group_and_no_near_duplicate_crosses_splits() -> None:
    examples = _dataset()
    where = _split_of(split_examples(examples, parse_split_spec("train=0.5,test=0.5"), seed=3))
    groups: dict[str, set[str]] = {}
    for ex in examples:
        if ex.group:
            groups.setdefault(ex.group, set()).add(where[ex.id])
    assert groups and all(len(splits) == 1 for splits in groups.values())
    for i in range(60, 80):
        assert where[f"e{i:03d}"] == where[f"e{i - 15:03d}"]


def test_exact_duplicates_with_different_punctuation_stay_together() -> None:
    a = Example(id="a", instruction="Reply.", output="Speak, speak!")
    b = Example(id="b", instruction="reply", output="speak speak")
    others = [Example(id=f"x{i}", instruction=f"Task {i}", output=_sentence(random.Random(i))) for i in range(10)]
    where = _split_of(split_examples([a, b, *others], {"train": 0.5, "test": 0.5}, seed=0))
    assert where["a"] == where["b"]


def test_stratified_split_matches_label_proportions() -> None:
    examples = _dataset(n=200, seed=11)
    splits = split_examples(examples, parse_split_spec("train=0.75,test=0.25"), seed=4)
    overall = Counter(ex.label for ex in examples)
    for name, ratio in (("train", 0.75), ("test", 0.25)):
        labels = Counter(ex.label for ex in splits[name])
        for label, total in overall.items():
            assert abs(labels[label] - ratio * total) <= 4, (name, label, labels[label], ratio * total)


def test_every_split_gets_an_example_when_there_are_enough_groups() -> None:
    examples = [
        Example(id=str(i), instruction=f"Task {i}", output=_sentence(random.Random(i)), label="only") for i in range(5)
    ]
    splits = split_examples(examples, parse_split_spec("train=0.9,validation=0.05,test=0.05"), seed=0)
    assert all(splits.values()) and sum(map(len, splits.values())) == 5
    one = split_examples(examples[:1], {"train": 0.9, "test": 0.1})
    assert len(one["train"]) + len(one["test"]) == 1
    assert split_examples([], {"train": 0.9, "test": 0.1}) == {"train": [], "test": []}


def test_split_refuses_duplicate_ids_and_bad_ratios() -> None:
    with pytest.raises(ExportError, match="example id 'ex2' appears more than once"):
        split_examples([PLAIN, PLAIN], {"train": 1.0})
    with pytest.raises(ExportError, match="add up to 0.9, not 1"):
        split_examples([PLAIN], {"train": 0.9})


def test_task_data_with_one_shared_instruction_is_not_one_big_cluster() -> None:
    instruction = (
        "Classify the intent of this smart-home command. Answer with one label: lights_on, lights_off, heat_up."
    )
    rng = random.Random(0)
    examples = [
        Example(id=f"t{i}", instruction=instruction, input=_sentence(rng, 6), output="lights_on", label="lights_on")
        for i in range(20)
    ]
    splits = split_examples(examples, {"train": 0.5, "test": 0.5})
    assert len(splits["train"]) == len(splits["test"]) == 10


def test_dataset_card_shows_counts_lengths_drops_and_plain_text_examples() -> None:
    examples = _dataset(n=40)
    splits = split_examples(examples, parse_split_spec("train=0.8,test=0.2"), seed=0)
    card = dataset_card(
        "coriolanus-instructions", splits, {"echo": 7, "duplicate": 2, "json": 0}, "openai", {"seed": 0}
    )
    assert card.startswith("# coriolanus-instructions\n")
    assert "- format: `openai`" in card and "- seed: 0" in card and "- examples: 40" in card
    assert f"| train | {len(splits['train'])} |" in card and f"| test | {len(splits['test'])} |" in card
    label_counts = Counter(ex.label for ex in examples)
    assert f"| common | {sum(ex.label == 'common' for ex in splits['train'])} |" in card
    assert f"| {label_counts['rare']} |" in card
    assert "| instruction | 3 | 3 | 3.0 | 3 |" in card and "| output | 14 | 14 | 14.0 | 14 |" in card
    assert "| echo | 7 |\n| duplicate | 2 |" in card and "| json |" not in card
    assert card.count("### Example ") == 3
    first = splits["train"][0]
    assert f"**Instruction**\n\n```text\n{first.instruction}\n```" in card
    assert f"**Output**\n\n```text\n{first.output}\n```" in card
    assert '"messages"' not in card and "{" not in card


def test_dataset_card_fences_survive_backticks_and_nothing_dropped() -> None:
    code = Example(id="c", instruction="Show a code block.", output="```python\nprint('hi')\n```")
    card = dataset_card("code", {"train": [code]}, {}, "alpaca")
    assert "````text\n```python\nprint('hi')\n```\n````" in card
    assert "Nothing was dropped." in card
    empty = dataset_card("empty", {"train": [], "test": []}, {}, "jsonl")
    assert "No examples." in empty and "| train | 0 | - | 0 |" in empty


# ---------------------------------------------------------------------------------------------
# A run's stored splits (task runs) survive export: the leak of issue 13.


def _task_like_run(path: Path, n: int = 20) -> tuple[Store, int]:
    """A real SQLite file holding a run whose kept examples carry stored splits, as a task run stores them."""
    store = Store(path)
    run_id = store.start_run(kind="task", name="intents", requested=n, config={"spec": {"split": "train=0.7,test=0.3"}})
    rng = random.Random(3)
    with store.transaction() as conn:
        for i in range(n):
            gen = conn.execute(
                "INSERT INTO generations (run_id, item_key, item_index, rendered_prompt, output, seed, tokens_in, tokens_out, ms, "
                "finish_reason, created_at) VALUES (?, ?, ?, 'p', 'o', ?, 1, 1, 1, 'stop', 'now')", [run_id, f"k{i}", i, i]).lastrowid
            label = "lights_on" if i % 2 else "lights_off"
            conn.execute(
                "INSERT INTO examples (run_id, generation_id, instruction, output, label, task, group_key, kept, split, created_at) "
                "VALUES (?, ?, ?, ?, ?, 'intent', ?, 1, 'train', 'now')",
                [run_id, gen, _sentence(rng, 7), label, label, f"intent:{i}"])
    return store, run_id


def _ids(path: Path) -> set[str]:
    return {json.loads(line)["id"] for line in path.read_text().splitlines()}


def test_export_keeps_a_runs_stored_splits_so_no_test_item_is_trained_on(tmp_path: Path) -> None:
    from appliance.export import export_run

    store, run_id = _task_like_run(tmp_path / "a.db")
    # Today's leak, reproduced: splitting again at export (what `export --split` did) puts items in train that
    # the run stored as test, the split `eval` scores. Store as test some items that the re-split puts in train.
    again = export_run(store, run_id, "jsonl", tmp_path / "again.jsonl", "train=0.7,test=0.3", seed=0, resplit=True)
    stored_test = sorted(_ids(again.files["train"][0]), key=int)[:6]
    with store.transaction() as conn:
        conn.execute(f"UPDATE examples SET split = 'test' WHERE id IN ({', '.join(stored_test)})")
    leaked = export_run(store, run_id, "jsonl", tmp_path / "leak.jsonl", "train=0.7,test=0.3", seed=0, resplit=True)
    assert set(stored_test) & _ids(leaked.files["train"][0])  # the leak, now only on explicit request
    card = leaked.card.read_text()
    assert "RE-SPLIT with --resplit, ignoring the run's stored splits (train=0.7,test=0.3)" in card

    # Without --split the stored splits are written as they are: no stored test item in a training file.
    kept = export_run(store, run_id, "jsonl", tmp_path / "d.jsonl")
    assert set(kept.files) == {"train", "test"}
    assert _ids(kept.files["test"][0]) == set(stored_test) and not set(stored_test) & _ids(kept.files["train"][0])
    assert kept.files["train"][0] == tmp_path / "d.train.jsonl"
    assert "- splits: as stored by run 1 (train=0.7,test=0.3), the splits `eval` uses" in kept.card.read_text()
    # The same ratios as stored are the stored splits; different ones are refused, naming the stored splits.
    same = export_run(store, run_id, "jsonl", tmp_path / "s.jsonl", "test=0.3,train=0.7", seed=5)
    assert _ids(same.files["test"][0]) == set(stored_test)
    with pytest.raises(ExportError) as err:
        export_run(store, run_id, "jsonl", tmp_path / "x.jsonl", "train=0.8,test=0.2")
    assert str(err.value) == ("run 1 stored its splits (train=0.7,test=0.3; `eval` tests on them): export without --split "
                              "to keep them, or add --resplit to split again (the card records it)")
    with pytest.raises(ExportError, match="--resplit needs --split"):
        export_run(store, run_id, "jsonl", tmp_path / "x.jsonl", resplit=True)


def test_card_measures_near_duplicates_across_splits_and_records_provenance(tmp_path: Path) -> None:
    from appliance.export import export_run

    store, run_id = _task_like_run(tmp_path / "a.db", n=6)
    with store.transaction() as conn:  # item 5 repeats item 1 (text and label), but the run stored them in different splits
        text = conn.execute("SELECT instruction FROM examples WHERE id = 1").fetchone()[0]
        conn.execute("UPDATE examples SET instruction = ?, split = 'test' WHERE id = 5", [text])
    card = export_run(store, run_id, "jsonl", tmp_path / "d.jsonl").card.read_text()
    assert "- near-duplicates across splits: 2 of 6 examples (33.3%) have a near-duplicate" in card
    assert "## Provenance" in card and "- appliance 0.1.0, llama-cpp-python " in card
    assert "- task spec: `-`, sha256 `-`" in card and "- prompt: built from the task spec" in card
