"""appliance.plan.hardware: the real machine gives sane figures; cgroup, NVML and Metal probes on fakes."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from appliance.plan import hardware
from appliance.errors import ApplianceError
from appliance.plan.hardware import MEMORY_LIMIT_ENV, cgroup_cpu_quota, cgroup_memory, detect_hardware, memory_limit_from_env

GiB = 1 << 30


def test_detect_hardware_is_sane() -> None:
    import llama_cpp

    hw = detect_hardware()
    assert 1 <= hw.cpu_physical_cores <= hw.cpu_threads
    assert 0 < hw.ram_available_bytes <= hw.ram_total_bytes
    assert 0 <= hw.effective_available_bytes <= hw.ram_available_bytes
    if hw.cgroup_limit_bytes is None:
        assert hw.effective_available_bytes == hw.ram_available_bytes
    for gpu in hw.gpus:
        assert 0 <= gpu.vram_free_bytes <= gpu.vram_total_bytes
    assert hw.llama_cpp_version == llama_cpp.__version__
    assert hw.gpu_offload_supported == bool(llama_cpp.llama_supports_gpu_offload())
    assert hw.system_info and "CPU" in hw.system_info
    assert hw.model_dump_json()  # what `appliance hw --json` prints


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_cgroup_v2_takes_the_binding_level_and_leaves_out_inactive_files(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _write(root / "cgroup.controllers", "cpu memory")
    proc = tmp_path / "self-cgroup"
    _write(proc, "0::/outer/inner")
    _write(root / "outer" / "memory.max", str(8 * GiB))
    _write(root / "outer" / "memory.current", str(7 * GiB))
    _write(root / "outer" / "memory.stat", f"anon 1\ninactive_file {1 * GiB}")
    _write(root / "outer" / "inner" / "memory.max", "max")
    _write(root / "outer" / "inner" / "memory.current", str(2 * GiB))
    # The parent has 2 GiB left (8 - (7 - 1)); it binds, though the child itself is unlimited.
    assert cgroup_memory(root, proc) == (8 * GiB, 6 * GiB)
    _write(root / "outer" / "inner" / "memory.max", str(3 * GiB))
    _write(root / "outer" / "inner" / "memory.stat", f"inactive_file {GiB // 2}")
    assert cgroup_memory(root, proc) == (3 * GiB, 2 * GiB - GiB // 2)


def test_cgroup_v1_huge_limit_is_no_limit(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    proc = tmp_path / "self-cgroup"
    _write(proc, "4:memory:/docker/abc\n1:cpu,cpuacct:/docker/abc")
    mem = root / "memory" / "docker" / "abc"
    _write(mem / "memory.limit_in_bytes", "9223372036854771712")
    _write(mem / "memory.usage_in_bytes", str(GiB))
    _write(mem / "memory.stat", "total_inactive_file 0\nhierarchical_memory_limit 9223372036854771712")
    assert cgroup_memory(root, proc) == (None, None)
    _write(mem / "memory.limit_in_bytes", str(4 * GiB))
    _write(mem / "memory.stat", f"total_inactive_file {GiB // 4}\nhierarchical_memory_limit {4 * GiB}")
    assert cgroup_memory(root, proc) == (4 * GiB, GiB - GiB // 4)


def test_no_cgroup_files_mean_no_limit(tmp_path: Path) -> None:
    assert cgroup_memory(tmp_path / "nothing", tmp_path / "no-proc-file") == (None, None)
    assert cgroup_cpu_quota(tmp_path / "nothing", tmp_path / "no-proc-file") is None


def test_cpu_quota_v2_and_v1(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    _write(v2 / "cgroup.controllers", "cpu")
    proc = tmp_path / "self-cgroup"
    _write(proc, "0::/job")
    _write(v2 / "job" / "cpu.max", "max 100000")
    assert cgroup_cpu_quota(v2, proc) is None
    _write(v2 / "job" / "cpu.max", "250000 100000")
    assert cgroup_cpu_quota(v2, proc) == 2.5

    v1 = tmp_path / "v1"
    _write(proc, "3:cpu,cpuacct:/job")
    _write(v1 / "cpu" / "job" / "cpu.cfs_quota_us", "-1")
    _write(v1 / "cpu" / "job" / "cpu.cfs_period_us", "100000")
    assert cgroup_cpu_quota(v1, proc) is None
    _write(v1 / "cpu" / "job" / "cpu.cfs_quota_us", "200000")
    assert cgroup_cpu_quota(v1, proc) == 2.0


def _fake_pynvml(monkeypatch: pytest.MonkeyPatch, *, init_error: bool) -> None:
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init() -> None:
        if init_error:
            raise NVMLError("NVML Shared Library Not Found")

    nvml.NVMLError = NVMLError
    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetCount = lambda: 1
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetName = lambda h: b"NVIDIA Test GPU"
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=4 * GiB, free=3 * GiB, used=GiB)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)


def test_no_nvml_library_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pynvml(monkeypatch, init_error=True)
    assert hardware._nvidia_gpus() == []
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed at all
    assert hardware._nvidia_gpus() == []


def test_nvml_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pynvml(monkeypatch, init_error=False)
    (gpu,) = hardware._nvidia_gpus()
    assert (gpu.name, gpu.backend) == ("NVIDIA Test GPU", "cuda")
    assert (gpu.vram_total_bytes, gpu.vram_free_bytes) == (4 * GiB, 3 * GiB)


def test_metal_reports_unified_memory_as_one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(hardware.platform, "machine", lambda: "arm64")
    (gpu,) = hardware._metal_gpu(16 * GiB, 10 * GiB)
    assert gpu.backend == "metal"
    assert gpu.vram_total_bytes == 12 * GiB and gpu.vram_free_bytes == 10 * GiB
    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    assert hardware._metal_gpu(16 * GiB, 10 * GiB) == []


def test_memory_limit_env_caps_what_the_plan_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    for text, size in (
        ("200MiB", 200 << 20),
        ("8GiB", 8 * GiB),
        ("512M", 512 << 20),
        ("1.5g", 3 * GiB // 2),
        ("1000", 1000),
        ("64 KB", 64 << 10),
    ):
        monkeypatch.setenv(MEMORY_LIMIT_ENV, text)
        assert memory_limit_from_env() == size
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "100MiB")
    hw = detect_hardware()
    assert hw.memory_limit_bytes == 100 << 20
    assert hw.effective_available_bytes == min(hw.ram_available_bytes, 100 << 20)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(ApplianceError, match=MEMORY_LIMIT_ENV):
        detect_hardware()
    monkeypatch.delenv(MEMORY_LIMIT_ENV)
    assert memory_limit_from_env() is None
