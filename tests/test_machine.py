"""The FP32 peak every benchmark line divides by (FLOP per cycle from the CPU's flags and family), the
VNNI and bf16 checks that int8 and bf16 inference ask, and the malloc settings CPU training runs with."""

import platform
import subprocess
import sys
import textwrap

import pytest

from resnet.machine import flop_per_cycle, has_native_bf16, has_vnni, machine_info


def cpuinfo(vendor: str, family: int, flags: str) -> str:
    return (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 17\n"
            f"model name\t: Some CPU\ncpu MHz\t\t: 2596.158\nflags\t\t: fpu sse2 {flags}\n\n")


def test_avx2_is_two_8_wide_fma_units():
    assert flop_per_cycle(cpuinfo("AuthenticAMD", 23, "avx fma avx2")) == 32
    assert flop_per_cycle(cpuinfo("GenuineIntel", 6, "avx fma avx2")) == 32


def test_avx512_counts_double_only_with_full_width_units():
    # Intel server cores and AMD Zen 5 (family 26) have two 512-bit FMA units
    assert flop_per_cycle(cpuinfo("GenuineIntel", 6, "avx2 avx512f avx512bw")) == 64
    assert flop_per_cycle(cpuinfo("AuthenticAMD", 26, "avx2 avx512f avx512_bf16")) == 64
    # Zen 4 (family 25) splits each 512-bit FMA over its 256-bit units: no more FLOP per cycle than AVX2
    assert flop_per_cycle(cpuinfo("AuthenticAMD", 25, "avx2 avx512f avx512_bf16 avx512_vnni")) == 32


def test_flags_are_matched_as_words_not_substrings():
    assert flop_per_cycle(cpuinfo("GenuineIntel", 6, "avx2 avx512fx")) == 32
    assert flop_per_cycle("") == 32  # no /proc/cpuinfo (macOS): the design guide's AVX2 figure


def test_machine_info_reports_a_peak_consistent_with_its_clock():
    info = machine_info()
    if info["mhz"]:
        per_core_cycle = info["fp32_peak_gflops"] * 1e3 / (info["cores"] * info["mhz"])
        assert round(per_core_cycle) in (32, 64)


def test_vnni_is_any_of_its_three_flags_as_a_word():
    assert has_vnni(cpuinfo("AuthenticAMD", 25, "avx2 avx512f avx512_vnni"))
    assert has_vnni(cpuinfo("GenuineIntel", 6, "avx2 avx_vnni"))  # Alder Lake and later, without AVX-512
    assert has_vnni(cpuinfo("GenuineIntel", 6, "avx2 avx512f amx_int8"))
    assert not has_vnni(cpuinfo("AuthenticAMD", 23, "avx fma avx2"))
    assert not has_vnni(cpuinfo("GenuineIntel", 6, "avx2 avx512_vnnix"))
    assert not has_vnni("")  # unreadable: 7-bit int8 weights, safe on every CPU


def test_native_bf16_is_avx512_bf16_or_amx():
    assert has_native_bf16(cpuinfo("AuthenticAMD", 25, "avx2 avx512f avx512_bf16"))
    assert has_native_bf16(cpuinfo("GenuineIntel", 6, "avx2 avx512f amx_bf16 amx_tile"))
    assert not has_native_bf16(cpuinfo("GenuineIntel", 6, "avx2 avx512f avx512_vnni"))  # Ice Lake: no bf16
    assert not has_native_bf16(cpuinfo("AuthenticAMD", 23, "avx fma avx2"))


STEP_FAULTS = textwrap.dedent("""
    import resource, sys
    import torch, torch.nn.functional as F
    from resnet import create_model
    from resnet.machine import keep_freed_memory
    torch.set_num_threads(1)
    kept = keep_freed_memory() if sys.argv[1] == "keep" else None
    model = create_model("resnet20", num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.zeros(32, dtype=torch.long)
    def step():
        F.cross_entropy(model(x), y).backward()
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="the malloc settings are glibc's")
def test_kept_freed_memory_stops_each_training_step_faulting_its_buffers_back_in():
    def faults_per_step(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True,
                             timeout=120, check=True).stdout.split()
        return out[0], int(out[1])

    (kept, tuned), (_, default) = faults_per_step("keep"), faults_per_step("default")
    assert kept == "True"
    # measured on 2 cores: ~4,400 page faults per step by default, ~430 with the settings
    assert tuned * 4 < default, (tuned, default)


def test_the_resnet_command_keeps_freed_memory_for_every_subcommand(monkeypatch, capsys):
    import resnet.machine
    from resnet.cli import main

    calls = []
    monkeypatch.setattr(resnet.machine, "keep_freed_memory", lambda: calls.append(1) or True)
    assert main(["models"]) == 0
    assert calls == [1]
    assert "resnet20" in capsys.readouterr().out
