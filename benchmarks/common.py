"""What every benchmark line carries about the machine, and the two peaks its fractions are taken of.

- `fp32_peak_gflops`: the design guide's definition, cores x 32 FLOP/cycle (AVX2: two 8-wide FMA units;
  64 with two AVX-512 units, resnet.machine.flop_per_cycle) x the clock the OS reports (resnet.machine).
  On a VM the reported clock can be the base clock while the cores run faster (turbo), so fractions of
  this peak can overstate how close a figure is to the hardware.
- `measured_fma_gflops`: what the cores actually deliver, measured now: a C loop of independent FMAs
  (ten accumulators per thread, enough to cover the FMA latency on both units) on every core this process
  may use, for about a second; 512-bit FMAs on CPUs with AVX-512, else 256-bit (AVX2). It needs a C compiler
  (cc/gcc); without one the field is null. The effective clock it implies (`measured_ghz`, over the FLOP per
  cycle that resnet.machine counts for this CPU) is printed too.

Fractions of both are printed; the measured one is the honest ceiling.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import resnet.machine
from resnet.machine import machine_info

_FMA_LOOP = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static long iters;
#ifdef __AVX512F__
#define VEC __m512
#define SET1 _mm512_set1_ps
#define ADD _mm512_add_ps
#define FMA(r) r = _mm512_fmadd_ps(r, b, c)
#define STORE _mm512_storeu_ps
#else
#define VEC __m256
#define SET1 _mm256_set1_ps
#define ADD _mm256_add_ps
#define FMA(r) r = _mm256_fmadd_ps(r, b, c)
#define STORE _mm256_storeu_ps
#endif
static void *work(void *out) {
    /* ten independent accumulators in named registers (an array could be spilled to memory) */
    VEC b = SET1(0.999999f), c = SET1(1e-7f);
    VEC a0 = SET1(1), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0;
    for (long i = 0; i < iters; i++) {
        FMA(a0); FMA(a1); FMA(a2); FMA(a3); FMA(a4); FMA(a5); FMA(a6); FMA(a7); FMA(a8); FMA(a9);
    }
    VEC s = ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(a6, a7)));
    s = ADD(s, ADD(a8, a9));
    float v[16];
    STORE(v, s);
    *(float *)out = v[0];
    return 0;
}
int main(int argc, char **argv) {
    int threads = atoi(argv[1]);
    iters = atol(argv[2]);
    pthread_t t[256];
    float out[256];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < threads; i++) pthread_create(&t[i], 0, work, &out[i]);
    for (int i = 0; i < threads; i++) pthread_join(t[i], 0);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    printf("%.6f %f\n", s, out[0]);
    return 0;
}
"""


def measured_fma_gflops(cores: int, repeats: int = 3) -> float | None:
    """The best of `repeats` runs of the FMA loop on `cores` threads, in GFLOP/s; None without a compiler
    or on a CPU without AVX2/FMA."""
    cc = shutil.which("cc") or shutil.which("gcc")
    flags = resnet.machine.cpu_flags()
    if cc is None or "avx2" not in flags:
        return None
    lanes = 16 if "avx512f" in flags else 8
    iters = 20_000_000  # x 10 accumulators x 8 or 16 lanes x 2 FLOP = 3.2 or 6.4 GFLOP per thread, ~1 s per run
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "fma.c", Path(tmp) / "fma"
        src.write_text(_FMA_LOOP)
        isa = ["-mavx512f"] if lanes == 16 else []
        built = subprocess.run([cc, "-O2", "-mavx2", "-mfma", *isa, "-pthread", str(src), "-o", str(exe)],
                               capture_output=True)
        if built.returncode:
            return None
        best = 0.0
        for _ in range(repeats):
            out = subprocess.run([str(exe), str(cores), str(iters)], capture_output=True, text=True, check=True)
            seconds = float(out.stdout.split()[0])
            best = max(best, cores * iters * 10 * lanes * 2 / seconds / 1e9)
    return best


def machine() -> dict:
    """resnet.machine's record plus the measured FMA peak, for the head of every benchmark line."""
    info = machine_info()
    measured = measured_fma_gflops(info["cores"])
    info["measured_fma_gflops"] = round(measured, 1) if measured else None
    per_cycle = resnet.machine.flop_per_cycle(resnet.machine._cpuinfo())
    info["measured_ghz"] = round(measured / info["cores"] / per_cycle, 3) if measured else None
    info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return info


def fractions(gflops: float, info: dict) -> dict:
    """Achieved GFLOP/s as a fraction of the nominal and of the measured peak."""
    nominal, measured = info.get("fp32_peak_gflops"), info.get("measured_fma_gflops")
    return {"achieved_gflops": round(gflops, 2),
            "fraction_of_fp32_peak": round(gflops / nominal, 3) if nominal else None,
            "fraction_of_measured_peak": round(gflops / measured, 3) if measured else None}


def paired_ratio(values: list[float], base: list[float]) -> float:
    """The median over rounds of values[i] / base[i]: each round's ratio of two methods timed close together,
    which a VM's drifting speed (boost clock, neighbours) moves less than a ratio of medians does."""
    return round(statistics.median([v / b for v, b in zip(values, base, strict=True)]), 3)


def add_malloc_option(parser) -> None:
    parser.add_argument("--malloc", choices=("kept", "default"), default="kept",
                        help="glibc malloc as the resnet command and training loop set it (kept), or as a plain "
                             "script has it (default)")


def apply_malloc_option(mode: str) -> bool:
    """Put `--malloc` in force for this process; returns whether freed memory is kept. With "default", our code's
    own call (the training loop makes it when it starts) is turned into a no-op too."""
    if mode == "default":
        resnet.machine.keep_freed_memory = lambda: False  # looked up at call time by the loop
    return resnet.machine.keep_freed_memory()
