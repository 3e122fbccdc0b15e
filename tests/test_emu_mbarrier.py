"""The emulator's mbarriers and its happens-before checking (tests/cuda_emu/cuda_emu.h): a producer warp fills a ring of
two shared-memory stages with cp.async and signals each through a "full" mbarrier once its copies have landed;
a consumer warp waits on it, reads every word of the stage (each written by another thread), writes 2x to global
memory and frees the stage through an "empty" mbarrier, which the producer waits on before it refills the stage -- the
warp-specialised pipeline of a convolution's producer and consumer warps, without a __syncthreads in the loop. The
correct kernel passes for several orders of the threads; each mutation is one launch error with its own message.
Then a TMA copy: its bytes are read only by threads ordered after a wait on the mbarrier it completes on.
Needs g++ (skipped without); no GPU."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from emu_build import build_emulated

KERNEL = """
// mode 0: correct; 1: the consumer skips its wait on "full"; 2: the producer skips its wait on "empty"; 3: "full"
// expects one arrival more than there are; 4: the consumer frees the stage before reading it; 5: no barrier between
// the mbarriers' init and their first use; 6: an ordinary load of an mbarrier; 7: the consumer waits on the wrong
// parity of "full" from its second round of stages on; 8: every consumer lane reads every word of a stage (32 readers
// of each word, past the emulator's short list); 9: 8, freeing the stage before reading it; 10: the producer signals
// "full" before its copies have landed
__global__ void ring(const float* in, float* out, int tiles, int mode) {
    HN_DYNAMIC_SMEM(smem);
    void* full[2] = {smem, smem + 8};
    void* empty[2] = {smem + 16, smem + 24};
    float* buf = reinterpret_cast<float*>(smem + 64);            // stage s: buf[32 s .. 32 s + 31]
    const int t = threadIdx.x, lane = t % 32;
    if (t == 0)
        for (int s = 0; s < 2; ++s) {
            hn_mbar_init(full[s], mode == 3 ? 33 : 32);          // every producer lane, its copy landed
            hn_mbar_init(empty[s], 32);                          // every consumer lane's arrival
        }
    if (mode != 5) __syncthreads();
    if (mode == 6 && t == 40) (void)hn_lds(reinterpret_cast<const float*>(smem));
    for (int i = 0; i < tiles; ++i) {
        const int s = i % 2;
        const unsigned round = (i / 2) & 1;                      // the phase parity of this use of stage s
        if (t < 32) {                                            // producer warp
            if (mode != 2)
                while (!hn_mbar_try_wait(empty[s], round ^ 1)) {}   // (a fresh barrier passes parity 1 at once)
            hn_cp_async4(buf + 32 * s + lane, in + 32 * i + lane, 4);
            hn_cp_async_commit();
            if (mode == 10) hn_mbar_arrive(full[s]);
            hn_cp_async_wait<0>();
            if (mode != 10) hn_mbar_arrive(full[s]);
        } else {                                                 // consumer warp
            const unsigned parity = mode == 7 && i >= 2 ? round ^ 1 : round;
            if (mode != 1)
                while (!hn_mbar_try_wait(full[s], parity)) {}
            if (mode == 4 || mode == 9) hn_mbar_arrive(empty[s]);
            float v = hn_lds(buf + 32 * s + (lane + 1) % 32);   // a word another producer thread wrote
            if (mode >= 8)                                       // every lane reads every word of the stage
                for (int j = 0; j < 32; ++j) v += 0.f * hn_lds(buf + 32 * s + j);
            hn_st(out + 32 * i + lane, 2.f * v);
            if (mode != 4 && mode != 9) hn_mbar_arrive(empty[s]);
        }
    }
}
extern "C" int emu_ring(const float* in, float* out, int tiles, int mode, unsigned seed, char* err, int len) {
    emu::S().ranges = {{(const unsigned char*)in, (size_t)tiles * 128, false},
                       {(const unsigned char*)out, (size_t)tiles * 128, true}};
    std::string msg = emu::launch({1, 1, 1}, {64, 1, 1}, 64 + 2 * 128, [=] { ring(in, out, tiles, mode); }, seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
"""


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulated(tmp_path_factory.mktemp("emu_mbar"), "mbar", KERNEL)


def _run(emu, mode: int, seed: int, tiles: int = 7):
    x = np.arange(32 * tiles, dtype=np.float32) + 1
    out = np.full(32 * tiles, np.nan, np.float32)
    err = ctypes.create_string_buffer(512)
    rc = emu.emu_ring(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), tiles, mode, seed, err,
                      512)
    return rc, err.value.decode(), x, out


@pytest.mark.parametrize("mode", [0, 8], ids=["one-reader", "32-readers"])
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_producer_and_consumer_warps_through_mbarriers(emu, seed, mode):
    """Seven tiles through two stages, three rounds of each barrier's phases: every output 2x the input word the
    consumer lane read, the stage's next word (written by the next producer lane); the same with every consumer lane
    reading every word of the stage."""
    rc, msg, x, out = _run(emu, mode, seed)
    assert rc == 0, msg
    want = 2 * x.reshape(-1, 32)[:, (np.arange(32) + 1) % 32].reshape(-1)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("mode,message", [
    (1, "never written|in flight|without a barrier or mbarrier wait"),
    (2, "without a barrier or mbarrier wait|in flight|never written"),
    (3, "deadlock"),
    (4, r"read by thread \d+ without a barrier or mbarrier wait"),
    (5, "used before mbarrier.init|not ordered before this use"),
    (6, "ordinary read of mbarrier"),
    (7, "deadlock|without a barrier or mbarrier wait|in flight"),
    (9, r"read by thread \d+ without a barrier or mbarrier wait"),
    (10, "never written|in flight|without a barrier or mbarrier wait"),
], ids=["no-full-wait", "no-empty-wait", "count-never-reached", "freed-before-read", "init-unordered",
        "load-of-mbarrier", "wrong-parity", "32-readers-freed-before-read", "full-before-landed"])
def test_each_missing_order_is_an_error(emu, mode, message):
    """Each mutation fails the launch, in every order of the threads tried, with the message that names it."""
    import re

    for seed in (1, 2, 3):
        rc, msg, _, _ = _run(emu, mode, seed)
        assert rc == 1 and re.search(message, msg), (seed, msg)


TMA_KERNEL = """
struct EmuMap { unsigned long long bits[16]; };
// Thread 0 copies a 64 x 64 bf16 tile by TMA (completing on "bar"), then arrives on "ready"; warp 1 reads it.
// mode 0: warp 1 waits on "bar"; 1: warp 1 waits on "ready" only (it knows what thread 0 knew, not the copy);
// 2: thread 32 alone waits on "bar", then a __syncthreads, then warp 1 reads (the barrier publishes the copy)
__global__ void tma_read(const EmuMap map, float* out, int mode) {
    HN_DYNAMIC_SMEM(smem);
    void* bar = smem;
    void* ready = smem + 8;
    const float* tile = reinterpret_cast<const float*>(smem + 1024);
    const int t = threadIdx.x;
    if (t == 0) {
        hn_mbar_init(bar, 1);
        hn_mbar_init(ready, 1);
        hn_fence_mbar_init();
    }
    __syncthreads();
    if (t == 0) {
        hn_mbar_arrive_tx(bar, 64 * 128);
        hn_tma_tile2d(smem + 1024, map, 0, 0, bar);
        hn_mbar_arrive(ready);
    }
    if (t >= 32 && (mode == 0 || (mode == 2 && t == 32)))
        while (!hn_mbar_try_wait(bar, 0)) {}
    if (t >= 32 && mode == 1)
        while (!hn_mbar_try_wait(ready, 0)) {}
    if (mode == 2) __syncthreads();
    if (t >= 32) hn_st(out + t - 32, hn_lds(tile + 33 * (t - 32)));
}
extern "C" int emu_tma_read(const unsigned short* src, float* out, int mode, unsigned seed, char* err, int len) {
    emu::S().ranges = {{(const unsigned char*)src, 64 * 128, false}, {(const unsigned char*)out, 32 * 4, true}};
    EmuMap map = {};
    map.bits[0] = 1;                                         // a tile map (tests/emu_tma.py's encoding)
    map.bits[1] = reinterpret_cast<unsigned long long>(src);
    map.bits[2] = map.bits[3] = 64;                          // 64 x 64 elements
    map.bits[6] = 128;                                       // bytes a row
    map.bits[9] = map.bits[10] = 64;                         // the box: 64 rows of 64
    std::string msg = emu::launch({1, 1, 1}, {64, 1, 1}, 1024 + 64 * 128, [=] { tma_read(map, out, mode); }, seed);
    snprintf(err, len, "%s", msg.c_str());
    return msg.empty() ? 0 : 1;
}
"""


@pytest.fixture(scope="module")
def emu_tma(tmp_path_factory):
    return build_emulated(tmp_path_factory.mktemp("emu_tma"), "tma", TMA_KERNEL)


@pytest.mark.parametrize("mode,message", [(0, ""), (2, ""), (1, "written by the TMA copies of .*mbarrier 0 without")],
                         ids=["waits-on-the-copy", "barrier-after-one-wait", "waits-on-another-mbarrier"])
def test_a_tma_copy_is_read_only_after_a_wait_on_its_mbarrier(emu_tma, mode, message):
    """A TMA copy's bytes are the async proxy's, not the issuing thread's: a thread reads them after waiting on the
    mbarrier the copy completes on, or after a barrier that follows some thread's wait on it; waiting on another
    mbarrier that the issuing thread arrived on after the copy is a race. The words read are the source's, swizzled
    (row i's 16-byte chunk j at chunk j ^ (i % 8))."""
    import re

    src = np.arange(64 * 64, dtype=np.uint16)
    for seed in (1, 2, 3):
        out = np.full(32, np.nan, np.float32)
        err = ctypes.create_string_buffer(512)
        rc = emu_tma.emu_tma_read(src.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), mode,
                                  seed, err, 512)
        if message:
            assert rc == 1 and re.search(message, err.value.decode()), (seed, err.value.decode())
            continue
        assert rc == 0, err.value.decode()
        got = out.view(np.uint32)
        for i in range(32):                    # word 33 i: row, 16-byte chunk and word of the swizzled tile
            row, chunk, word = 33 * i // 32, 33 * i % 32 // 4, 33 * i % 4
            first = row * 64 + (chunk ^ (row % 8)) * 8 + 2 * word
            assert got[i] == int(src[first]) | int(src[first + 1]) << 16, (i, hex(got[i]))
