/* Can this process use AMX, and how fast are its int8 tiles beside AVX-512 VNNI?
 *
 *     gcc -O2 -march=native -o amx_probe benchmarks/amx_probe.c && ./amx_probe
 *
 * Prints what the CPU and the kernel say (CPUID leaf 7 AMX bits, XCR0's tile-state bits,
 * arch_prctl's answer to the request for XTILEDATA that Linux wants before a thread touches
 * tiles), runs one tdpbssd and checks its result, then times one core's int8 multiply-accumulate
 * throughput: four independent tdpbssd (16x16 int32 += 16x64 int8 . 64x16 int8, 16,384 MACs
 * each) against eight independent vpdpbusd (64 MACs each). Register-only loops: peak rates,
 * not what a kernel that also loads and unpacks weights gets.
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

static sigjmp_buf on_fault;
static void fault(int sig) { siglongjmp(on_fault, sig); }

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(void) {
    unsigned a, b, c, d, lo, hi;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    printf("CPUID.7: amx_tile %u, amx_int8 %u, amx_bf16 %u\n", (d >> 24) & 1, (d >> 25) & 1, (d >> 22) & 1);
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    printf("XCR0 0x%x: tile config state %u, tile data state %u\n", lo, (lo >> 17) & 1, (lo >> 18) & 1);
    long r = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
    printf("arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA): %s\n", r ? "refused" : "granted");
    if (r) return 1;

    static int8_t x[16 * 64] __attribute__((aligned(64))), w[16 * 64] __attribute__((aligned(64)));
    static int32_t out[16 * 16];
    for (int i = 0; i < 16 * 64; i++) { x[i] = (int8_t)(i % 7 - 3); w[i] = (int8_t)(i % 5 - 2); }
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    signal(SIGILL, fault);
    signal(SIGSEGV, fault);
    int sig = sigsetjmp(on_fault, 1);
    if (sig) { printf("AMX instruction raised signal %d\n", sig); return 1; }
    _tile_loadconfig(&cfg);
    /* tdpbssd's B operand is 64x16 int8 stored as 16 rows of 4-byte groups (VNNI layout) */
    _tile_zero(0);
    _tile_loadd(1, x, 64);
    _tile_loadd(2, w, 64);
    _tile_dpbssd(0, 1, 2);
    _tile_stored(0, out, 64);
    int32_t want = 0;
    for (int k = 0; k < 16; k++)
        for (int j = 0; j < 4; j++) want += x[k * 4 + j] * w[k * 64 + 0 * 4 + j];
    printf("tdpbssd: out[0][0] = %d, expected %d: %s\n", out[0], want, out[0] == want ? "ok" : "WRONG");

    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    _tile_loadd(4, x, 64); _tile_loadd(5, x, 64); _tile_loadd(6, w, 64); _tile_loadd(7, w, 64);
    const long tiles = 20000000;
    double t0 = seconds();
    for (long i = 0; i < tiles; i++) {
        _tile_dpbssd(0, 4, 6); _tile_dpbssd(1, 4, 7); _tile_dpbssd(2, 5, 6); _tile_dpbssd(3, 5, 7);
    }
    double amx = 4.0 * tiles * 16 * 16 * 64 / (seconds() - t0);
    _tile_release();

    __m512i acc[8], u = _mm512_set1_epi8(1), s = _mm512_set1_epi8(2);
    for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_si512();
    const long steps = 200000000;
    t0 = seconds();
    for (long i = 0; i < steps; i++) {
        for (int j = 0; j < 8; j++) acc[j] = _mm512_dpbusd_epi32(acc[j], u, s);
        __asm__ volatile("" : "+v"(u));
    }
    double vnni = 8.0 * steps * 64 / (seconds() - t0);
    int32_t sink = 0;
    for (int j = 0; j < 8; j++) sink += _mm512_reduce_add_epi32(acc[j]);
    printf("one core, int8 multiply-adds/s: AMX tdpbssd %.0f G, AVX-512 VNNI vpdpbusd %.0f G (%.1fx) [%d]\n",
           amx / 1e9, vnni / 1e9, amx / vnni, sink & 1);
    return 0;
}
