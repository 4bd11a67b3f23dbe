"""The batched engine on the real demo model: agreement with sequential decoding, stop reasons,
grammar-constrained JSON, isolation between sequences, and refusal/retry on a full context."""

from __future__ import annotations

import json
import pytest

from appliance.engine import Engine, Request, SamplingParams
from appliance.errors import GenerationError
from appliance.gguf_reader import read_gguf
from appliance.hardware import detect_hardware
from appliance.planner import Plan, make_plan
from appliance.schema import load_json_schema

WORDS = ["apple", "river", "candle", "tiger", "violin", "pepper", "rocket", "garden"]
FEWSHOT = (
    "Each line repeats its word three times.\n"
    "Word: stone -> stone stone stone\n"
    "Word: cloud -> cloud cloud cloud\n"
    "Word: {w} ->"
)


def plan(n_parallel: int, n_ctx: int = 2048) -> Plan:
    from appliance.models import demo_model_path

    return make_plan(read_gguf(demo_model_path()), detect_hardware(), n_ctx=n_ctx, n_parallel=n_parallel, n_gpu_layers=0).require()


@pytest.fixture(scope="module")
def engines(demo_model):
    made: dict[int, Engine] = {}

    def get(n_parallel: int, n_ctx: int = 2048) -> Engine:
        key = (n_parallel, n_ctx)
        if key not in made:
            made[key] = Engine(demo_model, plan(n_parallel, n_ctx))
        return made[key]

    yield get
    for engine in made.values():
        engine.close()


def run(engine: Engine, prompts: list[str], params: SamplingParams, n_parallel: int | None = None) -> dict[int, object]:
    requests = [Request(key=i, prompt=p, seed=1000 + i) for i, p in enumerate(prompts)]
    return {c.key: c for c in engine.generate(requests, params, n_parallel=n_parallel)}


def test_batched_greedy_agrees_with_sequential(engines):
    prompts = [FEWSHOT.format(w=w) for w in WORDS] + [f"A short story about a {w}:" for w in WORDS]
    params = SamplingParams(temperature=0, max_tokens=24)
    sequential = run(engines(1), prompts, params)
    batched = run(engines(8), prompts, params)
    same = sum(sequential[i].text == batched[i].text for i in range(len(prompts)))
    rate = same / len(prompts)
    print(f"greedy agreement batched(8) vs sequential: {same}/{len(prompts)} = {rate:.0%}")
    # llama.cpp's matmuls accumulate in a different order for different batch sizes, so the last bits of
    # the logits differ and near-ties in a 270M model flip after a few tokens (measured: 62% of 24-token
    # outputs identical). Confident continuations must agree exactly; the overall rate has a floor.
    for i in range(len(WORDS)):
        assert sequential[i].text.split("\n")[0] == batched[i].text.split("\n")[0]
    assert rate >= 0.5


def test_same_seed_same_text_at_any_parallelism_is_measured(engines):
    prompts = [FEWSHOT.format(w=w) for w in WORDS]
    params = SamplingParams(temperature=0.8, max_tokens=16)
    a = run(engines(1), prompts, params)
    b = run(engines(4), prompts, params)
    c = run(engines(4), prompts, params)
    assert all(b[i].text == c[i].text for i in b)  # the same parallelism reproduces exactly
    same = sum(a[i].text == b[i].text for i in a)
    first_line = sum(a[i].text.split("\n")[0] == b[i].text.split("\n")[0] for i in a)
    print(f"sampled agreement parallel 1 vs 4 with equal seeds: {same}/{len(a)} whole, {first_line}/{len(a)} first line")
    assert first_line >= len(a) * 3 // 4


def test_every_sequence_ends_with_a_reason(engines):
    prompts = [FEWSHOT.format(w=w) for w in WORDS]
    params = SamplingParams(temperature=0.9, max_tokens=12, stop=["\n"])
    out = run(engines(4), prompts, params)
    assert sorted(out) == list(range(len(prompts)))
    for c in out.values():
        assert c.finish_reason in {"stop", "eos", "length"}
        if c.finish_reason == "length":
            assert c.tokens_out == 12
        else:
            assert c.tokens_out <= 12
        assert "\n" not in c.text
        assert c.tokens_in > 10 and c.ms >= 0


def test_sequences_do_not_read_each_others_tokens(engines):
    prompts = [FEWSHOT.format(w=w) for w in WORDS]
    out = run(engines(8), prompts, SamplingParams(temperature=0, max_tokens=6, stop=["\n"]))
    for i, w in enumerate(WORDS):
        text = out[i].text
        assert w in text, (w, text)
        assert not any(other in text for other in WORDS if other != w), (w, text)


def test_schema_constrained_batched_outputs_all_parse(engines, demo_model, tmp_path):
    schema_file = tmp_path / "s.json"
    schema_file.write_text(json.dumps({
        "type": "object",
        "properties": {"word": {"type": "string", "enum": WORDS}, "count": {"type": "integer"}},
        "required": ["word", "count"],
    }))
    schema, grammar = load_json_schema(schema_file)
    engine = Engine(demo_model, plan(4), grammar=grammar)
    try:
        prompts = [f'Word: {w}\nJSON: ' for w in WORDS]
        out = run(engine, prompts, SamplingParams(temperature=0.8, max_tokens=48))
    finally:
        engine.close()
    for c in out.values():
        data = json.loads(c.text)
        assert data["word"] in WORDS and isinstance(data["count"], int)


def test_prompt_longer_than_context_is_refused_before_decoding(engines):
    engine = engines(2, 512)
    before = engine.stats.decode_calls
    with pytest.raises(GenerationError, match="needs .* tokens of context, but the plan gives 512"):
        list(engine.generate([Request(0, "word " * 600, 1)], SamplingParams(max_tokens=8)))
    assert engine.stats.decode_calls == before  # refused before anything was decoded


def test_decode_without_kv_room_shrinks_the_batch_and_loses_nothing(engines, monkeypatch):
    engine = engines(4)
    real = engine._decode
    calls = {"n": 0}

    def flaky() -> int:
        calls["n"] += 1
        if calls["n"] == 3:  # after the shared prefix and the first step: "no KV slot for this batch"
            return 1
        return real()

    monkeypatch.setattr(engine, "_decode", flaky)
    prompts = [FEWSHOT.format(w=w) for w in WORDS[:6]]
    out = run(engine, prompts, SamplingParams(temperature=0, max_tokens=6, stop=["\n"]))
    assert sorted(out) == list(range(6))
    assert engine.stats.retries and "retried with 3" in engine.stats.retries[-1]
    for i, w in enumerate(WORDS[:6]):
        assert w in out[i].text
