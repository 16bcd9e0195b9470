"""What machine a figure was measured on, and its FP32 peak, read at run time.

FP32 FMA peak (the design guide's definition) = cores x 32 FLOP/cycle (AVX2: two 8-wide FMA units,
2 FLOP each) x clock; 64 FLOP/cycle where the cores have two full-width AVX-512 FMA units. The clock is the
highest "cpu MHz" /proc/cpuinfo reports, else lscpu's maximum.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

FLOP_PER_CYCLE_AVX2 = 32
FLOP_PER_CYCLE_AVX512 = 64


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    m = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.M)
    return m.group(1).strip() if m else (platform.processor() or platform.machine())


def cpu_mhz() -> float:
    """The core clock in MHz (0.0 when it cannot be read)."""
    found = [float(x) for x in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", _cpuinfo(), re.M)]
    if found:
        return max(found)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        m = re.search(r"CPU max MHz:\s*([\d.]+)", out) or re.search(r"CPU MHz:\s*([\d.]+)", out)
        return float(m.group(1)) if m else 0.0
    except (OSError, subprocess.SubprocessError):
        return 0.0


def cores() -> int:
    """Cores this process may use (the affinity mask, as a container sees it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (macOS)
        return os.cpu_count() or 1


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags of /proc/cpuinfo's text (this machine's when None; empty where unreadable)."""
    m = re.search(r"^flags\s*:(.*)$", _cpuinfo() if cpuinfo is None else cpuinfo, re.M)
    return set(m.group(1).split()) if m else set()


def has_vnni(cpuinfo: str | None = None) -> bool:
    """Whether the cores have VNNI (AVX512_VNNI, AVX-VNNI, or AMX's int8 unit): u8 x s8 dot products summed in
    32 bits. Without it, ONNX Runtime's int8 kernels sum pairs of products in 16 bits (resnet/quantize.py)."""
    return bool(cpu_flags(cpuinfo) & {"avx512_vnni", "avx_vnni", "amx_int8"})


def has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the cores compute in bf16 natively (AVX512_BF16 or AMX): elsewhere oneDNN emulates bf16,
    which runs several times slower than fp32 (docs/results.md)."""
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 64 << 20}


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    A CPU training step frees and reallocates the same activation buffers every iteration. By default glibc
    returns the larger ones to the OS (or unmaps them) and the next step faults every 4 KiB page back in:
    the training loop's ResNet-20 step at batch 128 took 150-3,900 page faults, and 40-160 with these
    settings, which ran it 2.8% faster (medians of six processes each, docs/results.md). Inference frees
    every activation at once: the torch backend took ~30,000 page faults per ResNet-20 batch of 256 in fp32,
    and ran 35-41% faster in fp32 and 22-34% in bf16 without them (docs/inference.md). The `resnet` command
    applies this for every subcommand, and `resnet.train` for its runs.

    The settings: buffers up to 32 MiB come from the heap rather than their own mappings (glibc's ceiling for
    this threshold on 64-bit), and up to 1 GiB of freed heap is kept. The cost is that the process's resident
    memory stays near its peak, as with PyTorch's GPU caching allocator. Applies once per process; returns
    whether the settings are in force (False off glibc: macOS, Windows, musl). Harmless under another
    allocator (LD_PRELOAD jemalloc or tcmalloc): glibc's is then unused."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(key, value) == 1 for key, value in MALLOC_SETTINGS.items())
    except (OSError, AttributeError):
        return False


def flop_per_cycle(cpuinfo: str) -> int:
    """FP32 FLOP per cycle and core, from /proc/cpuinfo's text: 64 with AVX-512 (two 16-wide FMA units),
    else 32 (AVX2). AMD cores before Zen 5 (CPU family 25 and lower: Zen 4 is the first with AVX-512) run
    each 512-bit FMA as two passes through 256-bit units, so they stay at 32."""
    if "avx512f" not in cpu_flags(cpuinfo):
        return FLOP_PER_CYCLE_AVX2
    family = re.search(r"^cpu family\s*:\s*(\d+)", cpuinfo, re.M)
    if "AuthenticAMD" in cpuinfo and family is not None and int(family.group(1)) < 26:
        return FLOP_PER_CYCLE_AVX2
    return FLOP_PER_CYCLE_AVX512


def fp32_peak_flops() -> float:
    return cores() * flop_per_cycle(_cpuinfo()) * cpu_mhz() * 1e6


def machine_info() -> dict:
    """Hardware and versions, for the head of every benchmark line and report."""
    import torch

    from . import __version__

    info = {
        "cpu": cpu_model(), "cores": cores(), "mhz": round(cpu_mhz()),
        "fp32_peak_gflops": round(fp32_peak_flops() / 1e9, 1),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
        "resnet": __version__, "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
