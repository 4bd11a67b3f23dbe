"""What this machine offers a model: CPU cores, free RAM (within any cgroup limit), GPUs and free VRAM.

Read once before planning (`appliance.planner.make_plan`). Every probe degrades to "not there": no
NVML library means no NVIDIA GPUs, no cgroup files means no container limit, and a llama.cpp build
that cannot report its GPU support counts as CPU only.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
from pathlib import Path
from typing import Literal

import psutil
from pydantic import BaseModel, Field

from ..errors import ApplianceError

MEMORY_LIMIT_ENV = "APPLIANCE_MEMORY_LIMIT"  # e.g. 8GiB: use at most this much RAM, whatever is free
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value (9223372036854771712);
# anything from 2**60 up is no limit in practice.
_NO_LIMIT = 1 << 60
# Apple does not let us ask Metal's recommendedMaxWorkingSetSize without the Metal API; macOS gives a
# GPU about 65-75% of unified memory by default, so we assume 75% of total RAM.
_METAL_WORKING_SET = 0.75
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


class GPUInfo(BaseModel):
    """One GPU as llama.cpp would use it."""

    index: int
    name: str
    backend: Literal["cuda", "metal"]
    vram_total_bytes: int
    vram_free_bytes: int


class HardwareInfo(BaseModel):
    """This machine's resources, as the planner sees them."""

    cpu_physical_cores: int = Field(description="physical cores this process may use (affinity and CPU quota applied)")
    cpu_threads: int = Field(description="logical CPUs this process may use")
    ram_total_bytes: int
    ram_available_bytes: int = Field(description="psutil's available: free RAM plus reclaimable page cache")
    cgroup_limit_bytes: int | None = Field(None, description="the memory cgroup's limit; None when unlimited")
    cgroup_usage_bytes: int | None = Field(
        None, description="the cgroup's usage without its inactive page cache (its working set)"
    )
    memory_limit_bytes: int | None = Field(None, description=f"{MEMORY_LIMIT_ENV}, when set")
    effective_available_bytes: int = Field(
        description=f"min(available RAM, cgroup limit - cgroup usage, {MEMORY_LIMIT_ENV})"
    )
    gpus: list[GPUInfo] = Field(default_factory=list)
    gpu_offload_supported: bool = Field(False, description="this llama.cpp build can offload layers to a GPU")
    llama_cpp_version: str | None = None
    system_info: str | None = Field(None, description="llama_print_system_info(): the CPU features llama.cpp uses")


def detect_hardware() -> HardwareInfo:
    """Probe CPU, RAM, cgroup, GPUs and llama.cpp's GPU support (imports llama_cpp, ~0.2 s).

    Raises ApplianceError when APPLIANCE_MEMORY_LIMIT is set to something that is not a size.
    """
    vm = psutil.virtual_memory()
    limit, usage = cgroup_memory()
    cap = memory_limit_from_env()
    available = int(vm.available)
    if limit is not None:
        available = min(available, max(limit - (usage or 0), 0))
    if cap is not None:
        available = min(available, cap)
    threads, cores = _cpus()
    offload, version, system_info = _llama_cpp_support()
    return HardwareInfo(
        cpu_physical_cores=cores,
        cpu_threads=threads,
        ram_total_bytes=int(vm.total),
        ram_available_bytes=int(vm.available),
        cgroup_limit_bytes=limit,
        cgroup_usage_bytes=usage,
        memory_limit_bytes=cap,
        effective_available_bytes=available,
        gpus=_nvidia_gpus() or _metal_gpu(int(vm.total), int(vm.available)),
        gpu_offload_supported=offload,
        llama_cpp_version=version,
        system_info=system_info,
    )


def memory_limit_from_env() -> int | None:
    """APPLIANCE_MEMORY_LIMIT in bytes ("8GiB", "512M", "2.5G", "1000000"; binary units); None when unset."""
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if not text:
        return None
    match = _SIZE.fullmatch(text)
    if not match:
        raise ApplianceError(f"{MEMORY_LIMIT_ENV}={text!r} is not a size like 8GiB or 512MiB")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


def _cpus() -> tuple[int, int]:
    """(logical CPUs, physical cores) this process may run on: affinity and a cgroup CPU quota applied."""
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    quota = cgroup_cpu_quota()
    if quota is not None:
        usable = min(usable, max(1, math.ceil(quota)))
    # With SMT, `usable` logical CPUs hold about usable * physical / logical cores.
    cores = max(1, min(physical, round(usable * physical / logical)))
    return usable, cores


def cgroup_memory(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> tuple[int | None, int | None]:
    """(limit, usage) of the memory cgroup that binds this process, v2 or v1; (None, None) when unlimited.

    Every cgroup from the process's own up to the root can carry a limit; the binding one is the
    level with the least room left (limit - usage). Usage leaves out inactive file pages, which the
    kernel reclaims before it kills anything (the "working set" that Kubernetes and Docker report).
    """
    v2, v1 = _cgroup_paths(proc_cgroup)
    unified = (root / "cgroup.controllers").is_file()
    if unified:
        dirs = _ancestors(root, v2)
        limit_file, usage_file, inactive_key = "memory.max", "memory.current", "inactive_file"
    else:
        dirs = _ancestors(root / "memory", v1)
        limit_file, usage_file, inactive_key = "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
    levels = [(_int(d / limit_file), d) for d in dirs]
    if not unified and dirs:
        # v1 in a cgroup namespace hides the parents, but memory.stat still names their smallest limit.
        levels.append((_stat(dirs[0], "hierarchical_memory_limit"), dirs[0]))
    limited = [(limit, _working_set(d, usage_file, inactive_key)) for limit, d in levels if limit and limit < _NO_LIMIT]
    if not limited:
        return None, None
    return min(limited, key=lambda level: level[0] - (level[1] or 0))


def _working_set(d: Path, usage_file: str, inactive_key: str) -> int | None:
    usage = _int(d / usage_file)
    if usage is None:
        return None
    return max(usage - (_stat(d, inactive_key) or 0), 0)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """CPUs this process's cgroup may use (cpu.max or cfs_quota_us / cfs_period_us); None when unlimited."""
    v2, v1 = _cgroup_paths(proc_cgroup, controller="cpu")
    if (root / "cgroup.controllers").is_file():
        for d in _ancestors(root, v2):
            parts = _read(d / "cpu.max").split()
            if len(parts) == 2 and parts[0] != "max":
                return int(parts[0]) / int(parts[1])
        return None
    for base in (root / "cpu", root / "cpu,cpuacct"):
        for d in _ancestors(base, v1):
            quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            if quota.lstrip("-").isdigit() and period.isdigit() and int(quota) > 0:
                return int(quota) / int(period)
    return None


def _cgroup_paths(proc_cgroup: Path, controller: str = "memory") -> tuple[str, str]:
    """This process's cgroup path in the v2 hierarchy and in the v1 hierarchy of `controller`."""
    v2 = v1 = "/"
    for line in _read(proc_cgroup).splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path or "/"
        elif controller in controllers.split(","):
            v1 = path or "/"
    return v2, v1


def _ancestors(base: Path, path: str) -> list[Path]:
    """base/path and each parent up to base, deepest first, that exists (in a container's cgroup
    namespace the path may not exist under the mount; then only base is left)."""
    parts = [p for p in path.strip("/").split("/") if p]
    dirs = [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _int(path: Path) -> int | None:
    text = _read(path)
    return int(text) if text.isdigit() else None


def _stat(d: Path, key: str) -> int | None:
    """One field of d/memory.stat."""
    for line in _read(d / "memory.stat").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.isdigit():
            return int(value)
    return None


def _nvidia_gpus() -> list[GPUInfo]:
    """NVIDIA GPUs with free VRAM, through NVML; none when the library or a driver is missing."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError):
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                GPUInfo(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    backend="cuda",
                    vram_total_bytes=int(mem.total),
                    vram_free_bytes=int(mem.free),
                )
            )
        return gpus
    except pynvml.NVMLError:
        return []
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _metal_gpu(ram_total: int, ram_available: int) -> list[GPUInfo]:
    """Apple silicon: the GPU shares RAM; report the part Metal lets it use, bounded by what is free."""
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return []
    total = int(ram_total * _METAL_WORKING_SET)
    return [
        GPUInfo(
            index=0,
            name="Apple GPU (Metal)",
            backend="metal",
            vram_total_bytes=total,
            vram_free_bytes=min(total, ram_available),
        )
    ]


def _llama_cpp_support() -> tuple[bool, str | None, str | None]:
    """(GPU offload supported, llama-cpp-python version, llama.cpp system info) from the installed build."""
    try:
        import llama_cpp
    except (ImportError, OSError):  # no package, or its shared library failed to load
        return False, None, None
    try:
        offload = bool(llama_cpp.llama_supports_gpu_offload())
    except (AttributeError, OSError):
        offload = False
    try:
        info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(" |\n")
    except (AttributeError, OSError):
        info = None
    return offload, getattr(llama_cpp, "__version__", None), info
