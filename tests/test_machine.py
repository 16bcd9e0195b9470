"""The FP32 peak every benchmark line divides by (FLOP per cycle from the CPU's flags and family), and the
VNNI and bf16 checks that int8 and bf16 inference ask."""

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
