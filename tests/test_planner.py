"""appliance.plan.planner: the estimate's formulas, the choices it makes, and the demo model against llama.cpp."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.errors import PlanError
from appliance.plan.estimate import GiB, MiB, format_bytes
from appliance.models.info import GGUFInfo
from appliance.models.gguf import read_gguf
from appliance.plan.hardware import GPUInfo, HardwareInfo
from appliance.plan.planner import make_plan

KiB = 1 << 10


def mistral_7b_q4_k_m() -> GGUFInfo:
    """Mistral 7B v0.1 as a Q4_K_M file: 32 layers, 32 heads, 8 KV heads of 128, 32k vocabulary."""
    layer, embd, output = 130_800_000, 73_728_000, 107_520_000
    return GGUFInfo(
        path="mistral-7b.Q4_K_M.gguf",
        file_size=4_368_438_976,
        gguf_version=3,
        architecture="llama",
        file_type="Q4_K_M",
        n_tensors=291,
        n_params=7_241_732_096,
        weights_bytes=32 * layer + embd + output,
        layer_bytes=[layer] * 32,
        input_bytes=embd,
        output_bytes=output,
        token_embd_bytes=embd,
        context_length=32768,
        block_count=32,
        embedding_length=4096,
        feed_forward_length=14336,
        head_count=32,
        head_count_kv=8,
        key_length=128,
        value_length=128,
        vocab_size=32000,
        data_offset=0,
    )


def machine(ram_gib: float, gpus: list[GPUInfo] | None = None) -> HardwareInfo:
    ram = int(ram_gib * GiB)
    return HardwareInfo(
        cpu_physical_cores=8,
        cpu_threads=16,
        ram_total_bytes=ram,
        ram_available_bytes=ram,
        effective_available_bytes=ram,
        gpus=gpus or [],
        gpu_offload_supported=bool(gpus),
    )


@pytest.fixture(scope="module")
def demo_info(demo_model: Path) -> GGUFInfo:
    return read_gguf(demo_model)


def test_kv_cache_matches_the_design_note() -> None:
    # 32 layers * 8 KV heads * (128 + 128) * 2 bytes = 128 KiB a token in f16.
    plan = make_plan(mistral_7b_q4_k_m(), machine(64), n_ctx=4096, n_parallel=1)
    assert plan.kv_cache_bytes == 4096 * 128 * KiB
    q8 = make_plan(mistral_7b_q4_k_m(), machine(64), n_ctx=4096, n_parallel=1, type_k="q8_0", type_v="q8_0")
    assert q8.kv_cache_bytes == 4096 * 32 * 8 * 256 * 34 // 32
    assert q8.flash_attn  # llama.cpp refuses a quantized V cache without it


def test_context_is_padded_and_defaults_to_4096() -> None:
    assert make_plan(mistral_7b_q4_k_m(), machine(64), n_ctx=1000, n_parallel=1).n_ctx == 1024
    plan = make_plan(mistral_7b_q4_k_m(), machine(64))
    assert plan.n_ctx == 4096 and plan.n_seq_max == plan.n_parallel + 1 == plan.n_outputs_max


def test_sliding_window_cache_follows_llama_cpp(demo_info: GGUFInfo) -> None:
    # Gemma 3 270M: layers 5, 11, 17 global (4096 cells), 15 sliding layers get
    # pad(min(4096, 512 * n_seq_max + n_ubatch), 256) = 2560 cells with n_seq_max 4; 1 KiB a cell a layer.
    plan = make_plan(demo_info, machine(16), n_ctx=4096, n_parallel=3)
    assert plan.kv_swa_cells == 2560 and not plan.swa_full
    assert plan.kv_cache_bytes == (3 * 4096 + 15 * 2560) * KiB  # 12 MiB + 37.5 MiB, as llama.cpp logs
    full = make_plan(demo_info, machine(16), n_ctx=4096, n_parallel=3, swa_full=True)
    assert full.kv_swa_cells == 4096 and full.kv_cache_bytes == 18 * 4096 * KiB


def test_workload_sizes_the_context(demo_info: GGUFInfo) -> None:
    plan = make_plan(demo_info, machine(16), prefix_tokens=382, seq_tokens=100)
    assert plan.fits and plan.n_parallel == 16
    assert plan.n_ctx == 2048  # 382 + 16 * 100 = 1982, padded
    assert not plan.swa_full  # 482 tokens a sequence stay inside the 512-token window
    long = make_plan(demo_info, machine(16), prefix_tokens=382, seq_tokens=300, max_parallel=3)
    assert long.n_parallel == 3 and long.n_ctx == 1536 and long.swa_full
    too_long = make_plan(demo_info, machine(16), prefix_tokens=30000, seq_tokens=5000)
    assert not too_long.fits and "trained for 32768" in too_long.verdict
    assert too_long.suggestions[0].startswith("at most 2768 tokens a sequence")


def test_huge_context_does_not_fit_and_the_suggested_one_does() -> None:
    info, hw = mistral_7b_q4_k_m(), machine(8)
    plan = make_plan(info, hw, n_ctx=32768, n_parallel=4)
    assert not plan.fits
    assert plan.cpu_bytes > plan.available_bytes - plan.margin_bytes
    ctx = int(re.fullmatch(r"--ctx (\d+) fits", plan.suggestions[0])[1])
    assert ctx < 32768
    assert make_plan(info, hw, n_ctx=ctx, n_parallel=4).fits
    assert not make_plan(info, hw, n_ctx=ctx + 256, n_parallel=4).fits


def test_too_many_sequences_suggest_fewer() -> None:
    info, hw = mistral_7b_q4_k_m(), machine(8)
    plan = make_plan(info, hw, n_parallel=16, prefix_tokens=1000, seq_tokens=1500)
    assert not plan.fits and plan.n_ctx == 25088  # 1000 + 16 * 1500, padded
    parallel = int(re.fullmatch(r"--parallel (\d+) fits", plan.suggestions[0])[1])
    assert 1 <= parallel < 16
    assert make_plan(info, hw, n_parallel=parallel, prefix_tokens=1000, seq_tokens=1500).fits
    assert make_plan(info, hw, prefix_tokens=1000, seq_tokens=1500).n_parallel <= parallel  # 16, 8, 4, 2 or 1


def test_parallel_shrinks_with_ram() -> None:
    info = mistral_7b_q4_k_m()
    ram = (64, 16, 12, 9, 7)
    chosen = [make_plan(info, machine(gib), prefix_tokens=500, seq_tokens=1500).n_parallel for gib in ram]
    assert chosen == sorted(chosen, reverse=True)
    assert chosen[0] == 16 and chosen[-1] < 16
    assert make_plan(info, machine(64), prefix_tokens=500, seq_tokens=1500, max_parallel=5).n_parallel == 5


def test_nothing_fits_suggests_a_smaller_quant(demo_info: GGUFInfo) -> None:
    f16 = {"file_type": "F16", "weights_bytes": 14 * GiB, "layer_bytes": [GiB * 13 // 32] * 32}
    info = mistral_7b_q4_k_m().model_copy(update=f16)
    plan = make_plan(info, machine(12), n_ctx=2048)
    assert not plan.fits
    assert re.fullmatch(r"a Q8_0 quant would need about [\d.]+ GiB of RAM", plan.suggestions[-1])
    # The demo file is already Q4_K_M (its Q8_0 embedding makes it 7.4 bits a weight): no Q4_K_M advice.
    small = make_plan(demo_info, machine(0.6), n_ctx=512)
    assert not small.fits and not any("Q4_K_M" in s or "Q5" in s for s in small.suggestions)


def test_gpu_layers_fill_a_4_gib_gpu() -> None:
    info = mistral_7b_q4_k_m()
    free = 4 * GiB - 200 * MiB
    gpu = GPUInfo(index=0, name="Test 4 GiB", backend="cuda", vram_total_bytes=4 * GiB, vram_free_bytes=free)
    hw = machine(32, [gpu])
    plan = make_plan(info, hw, n_ctx=4096, n_parallel=4)
    assert plan.fits and plan.flash_attn
    assert 1 < plan.n_gpu_layers < 33  # the whole 4.2 GB model does not fit
    assert plan.gpu_margin_bytes == int(0.4 * GiB)  # 10% of a small GPU, not 1 GiB
    assert plan.gpu_bytes <= free - plan.gpu_margin_bytes
    more = make_plan(info, hw, n_ctx=4096, n_parallel=4, n_gpu_layers=plan.n_gpu_layers + 1)
    assert not more.fits and "GPU memory" in more.verdict
    assert f"--gpu-layers {plan.n_gpu_layers} fits" in more.suggestions
    # llama.cpp offloads the output layer first: one GPU layer is the output head.
    one = make_plan(info, hw, n_ctx=4096, n_parallel=4, n_gpu_layers=1)
    assert info.output_bytes <= one.gpu_bytes < info.output_bytes + info.layer_bytes[-1]
    assert make_plan(info, hw, n_ctx=4096, n_parallel=4, n_gpu_layers=-1).n_gpu_layers == 33
    assert make_plan(info, hw, n_ctx=4096, n_parallel=4, n_gpu_layers=99).n_gpu_layers == 33
    assert make_plan(info, machine(32), n_gpu_layers=20).n_gpu_layers == 0  # no GPU: CPU only


def test_require_raises_one_line_with_the_figures() -> None:
    plan = make_plan(mistral_7b_q4_k_m(), machine(6), n_ctx=16384, n_parallel=8)
    with pytest.raises(PlanError) as raised:
        plan.require()
    message = str(raised.value)
    assert "\n" not in message
    assert re.search(r"need [\d.]+ GiB of RAM, have [\d.]+ GiB", message)
    assert plan.suggestions[0] in message
    ok = make_plan(mistral_7b_q4_k_m(), machine(64))
    assert ok.require() is ok


def test_bad_kv_settings_are_refused() -> None:
    with pytest.raises(PlanError, match="flash attention"):
        make_plan(mistral_7b_q4_k_m(), machine(64), type_v="q4_0", flash_attn=False)
    with pytest.raises(PlanError, match="not a KV cache type"):
        make_plan(mistral_7b_q4_k_m(), machine(64), type_k="q3_k")


def test_format_bytes() -> None:
    assert format_bytes(int(1.5 * GiB)) == "1.50 GiB"
    assert format_bytes(3 * MiB) == "3.00 MiB"
    assert format_bytes(12) == "12 B"


def test_params_are_llama_cpp_fields() -> None:
    import llama_cpp

    plan = make_plan(mistral_7b_q4_k_m(), machine(64))
    cparams, mparams = llama_cpp.llama_context_default_params(), llama_cpp.llama_model_default_params()
    for key, value in plan.context_params().items():
        setattr(cparams, key, value)
        assert getattr(cparams, key) == value
    for key in plan.model_params():
        assert hasattr(mparams, key)
    assert plan.context_params()["type_k"] == llama_cpp.GGML_TYPE_F16


_LOAD = """
import json, sys, llama_cpp
job = json.loads(sys.argv[1])
llama_cpp.llama_backend_init()
mparams = llama_cpp.llama_model_default_params()
for k, v in job["model"].items(): setattr(mparams, k, v)
model = llama_cpp.llama_model_load_from_file(job["path"].encode(), mparams)
cparams = llama_cpp.llama_context_default_params()
for k, v in job["context"].items(): setattr(cparams, k, v)
assert llama_cpp.llama_init_from_model(model, cparams)
"""


def test_demo_model_estimate_matches_what_llama_cpp_allocates(demo_model: Path, demo_info: GGUFInfo) -> None:
    plan = make_plan(demo_info, machine(16), n_ctx=4096, n_parallel=4)
    job = {"path": str(demo_model), "model": plan.model_params(), "context": plan.context_params()}
    proc = subprocess.run([sys.executable, "-c", _LOAD, json.dumps(job)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reported: dict[str, float] = {}
    for kind, mib in re.findall(r"(\w+) buffer size =\s+([\d.]+) MiB", proc.stderr):
        reported[kind] = reported.get(kind, 0) + float(mib) * MiB
    output = 4 * demo_info.vocab_size * plan.n_seq_max
    assert reported["KV"] == pytest.approx(plan.kv_cache_bytes, rel=0.001)
    assert reported["output"] == pytest.approx(output, rel=0.001)
    assert reported["compute"] == pytest.approx(plan.compute_bytes, rel=0.15)
    assert plan.compute_bytes >= reported["compute"]
    llama_total = reported["KV"] + reported["compute"] + reported["output"] + demo_info.weights_bytes
    ours = plan.weights_bytes + plan.kv_cache_bytes + plan.compute_bytes + output
    assert ours == pytest.approx(llama_total, rel=0.15)
