// A CPU emulator for hetnet's tensor-core kernels (src/hetnet/backends/cuda/mma.cu), for tests without a GPU.
//
// The kernel source is compiled as C++ with this header forced in front (g++ -include cuda_emu.h -DHN_EMULATE):
// each CUDA thread of a block runs as a fiber (ucontext) on one OS thread, switching at every barrier and
// warp-collective instruction, and mma.cu's PTX wrappers (hn_mma_tf32, hn_ldmatrix_x4, hn_cp_async16, ...) are
// defined here from the PTX ISA's descriptions, independently of the kernel's own index arithmetic:
//   - mma.sync m16n8k8 .tf32 and m16n8k16 .bf16 assemble A, B and C from the 32 lanes' registers by the fragment
//     tables of PTX ISA 9.7.14.5.7 / 9.7.14.5.8 (written out below as the ISA states them), multiply in double and
//     hand each lane its part of D; a tf32 operand with any of its low 13 bits set is an error (cvt.rna missing);
//   - ldmatrix .x4 (.trans) from the 32 lanes' row addresses (PTX ISA 9.7.14.5.15);
//   - cp.async copies complete only at the cp.async.wait_group that retires their group, so a read too early sees
//     stale data, and the shared-memory checker below reports it;
//   - cvt.rna.tf32.f32 and cvt.rn.bf16x2.f32 bit-exact (finite inputs);
//   - wgmma.mma_async m64nNk16 .bf16 and m64nNk8 .tf32 (PTX ISA 9.7.15) as a warpgroup collective: A and B read from
//     shared memory through their matrix descriptors (decoded by the ISA's bit fields and canonical layouts, no
//     swizzle or the 128-byte swizzle; a tf32 element is its float32 word, low 13 bits ignored), or A (tf32) from
//     each thread's registers in the ISA's A fragment order, D in the ISA's accumulator fragment order; the result
//     reaches the registers only when a wgmma.wait_group retires its group, and the words it read (and A's
//     registers) may not be written before that.
//   - mbarrier (PTX ISA 9.7.13.15) objects of 8 bytes in dynamic shared memory: init, arrive, arrive.expect_tx,
//     try_wait.parity (a false result lets the other threads run); a phase completes when its count of arrivals is
//     reached and its expected transaction bytes have all completed;
//   - the TMA copies cp.async.bulk.tensor (PTX ISA 9.7.9.25) in tile mode (2D) and im2col mode (4D, channels last:
//     the box's pixels walked q fastest, then p, then the image, from the first one's input corner, inside the
//     bounding box the map's corners give, each read at corner + the im2col offsets; zeros outside the tensor), into
//     shared memory with the 128-byte swizzle, completing their bytes on an mbarrier at once. The tensor maps are the
//     emulator's own encoding of the encoder's parameters (tests/emu_tma.py), not the driver's. A copy's bytes are
//     written by the async proxy, not by the issuing thread: a thread reads them only once it has waited on the
//     mbarrier the copy completes on (or a barrier followed a thread's wait), as on the hardware.
// wgmma reads shared memory through the async proxy: a word it reads must have been written before, by a thread that
// then ran fence.proxy.async (a missing fence is an error).
// Ordering: happens-before by vector clocks. Each thread's clock advances at every release (a barrier, an mbarrier
// arrive); the TMA copies that complete on the k-th mbarrier initialised in a block are one more "thread" (ASYNC of
// them, after the block's threads), its clock advanced by each copy and carried only by that mbarrier's phases; a
// barrier makes every thread know every clock (of the copies: what any thread had acquired), a named barrier (bar.sync
// id, count) every member's clock to its members; an mbarrier phase carries what its arriving threads knew to the
// threads whose try_wait sees it complete. A shared-memory access by one thread is ordered after another's write (or
// read, for a write) only through those; anything else is a race.
// Checks, each a launch error with a message: every shared-memory word read was written before (no reads of
// uninitialised or padding words); a word written by one thread and read or written by another without a barrier or
// mbarrier wait between (the same for a write after another thread's read); a read of, or write to, a word with a
// cp.async in flight; an mbarrier used before its init is ordered before the use, or touched by ordinary loads and
// stores; global accesses outside the buffers the launch registered; misaligned 16-/8-byte accesses; a barrier or
// warp collective that not every thread reaches, or a try_wait that no arrive will complete (deadlock); lanes of a
// warp meeting at different collectives. Not checked: wgmma's reads against a later write by a thread that did not
// wait for them (the emulator only checks that the issuing warpgroup had retired them).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__

// CUDA's fast intrinsics as the correctly rounded operations they approximate (within 2 ulps on the GPU)
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }

struct float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct uint2 {
    unsigned x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
struct uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct EmuDim3 {
    unsigned x, y, z;
};

namespace emu {

constexpr int MAX_SMEM = 232448;   // an H200 block's limit (227 KB)
constexpr int STACK = 128 * 1024;

struct Pending {       // one cp.async: its data read at issue, written to shared memory when its group retires
    unsigned char* dst;
    unsigned char data[16];
    int bytes;
    int group;         // -1 until committed
};

struct Thread {
    ucontext_t ctx;
    EmuDim3 tid;
    int linear = 0;
    bool done = false;
    std::vector<Pending> pending;
    int groups_committed = 0;
    long writes = 0;        // shared-memory writes so far (cp.async counted when it lands)
    long fenced = 0;        // `writes` at this thread's last fence.proxy.async
    int clock = 1;          // this thread's own clock: advanced by every release (barrier, mbarrier arrive)
    std::vector<int> acq;   // the clocks of the other threads that it acquired through mbarriers
};

constexpr int READERS = 8;   // the readers of a word tracked since its last write
constexpr int ASYNC = 64;    // the mbarriers of a block whose TMA copies are told apart (their writers, see above)

struct Word {          // shadow state of one 4-byte shared-memory word
    bool written = false;
    bool mbarrier = false;  // part of an mbarrier object (no ordinary loads or stores)
    int w_tid = -1;    // the last writer and its clock at the write
    int w_clock = 0;
    int nr = 0;        // readers since the last write: r_tid[i] at its clock r_clock[i]; past READERS of them,
    int r_tid[READERS];   // every reader's clock in readers[many] (one entry per thread, 0: none; kept across writes)
    int r_clock[READERS];
    int many = -1;
    int pending = -1;  // thread whose cp.async to this word is in flight
    long w_seq = 0;    // the writer's `writes` count at this write (for the proxy fence check)
    int wg_busy = -1;  // warpgroup whose wgmma group wg_group reads this word (until a wait retires it)
    int wg_group = 0;
};

struct MBarrier {      // an mbarrier object: its arrival count, the phases completed, what each phase carries
    bool init = false;
    int init_tid = -1, init_clock = 0;
    int count = 0, pending = 0;
    long tx = 0;                     // transaction bytes expected (arrive.expect_tx) and not yet completed
    long phase = 0;                  // phases completed
    int async = -1;                  // the index of the TMA copies completing on it (among the block's ASYNC)
    std::vector<int> carried;        // the clocks known to the arrivals of the current phase
    std::vector<int> done[2];        // ... of the last completed phase of each parity
};

struct WgmmaOp {        // one issued wgmma.mma_async of a warpgroup: its results, written to d when its group retires
    int group;          // the warpgroup's commit count at issue (the group it joins)
    float* d[128];
    std::vector<float> value[128];
    const unsigned* ra[128] = {};   // A from registers: each thread's 4 fragment registers, and what they held at
    unsigned ra_was[128][4] = {};   // issue (they may not change before the group retires)
};

struct Warpgroup {      // wgmma state of 4 consecutive warps
    int arrived = 0;
    long gen = 0;
    const char* what = nullptr;
    float* d[128];
    unsigned long long da[128], db[128];
    const unsigned* ra[128];          // A's registers (null: A in shared memory through da)
    int committed = 0, retired = 0;   // groups committed, and retired by wait_group (all before `retired`)
    std::vector<WgmmaOp> ops;
};

struct Warp {          // exchange slots of a warp-collective instruction, two so one sync per collective suffices
    int arrived = 0;
    long gen = 0;
    const char* what[2] = {nullptr, nullptr};
    unsigned in[2][32][10];
    const void* addr[2][32];
};

struct Range {
    const unsigned char* lo;
    size_t bytes;
    bool writable;
};

struct State {
    EmuDim3 grid, block, block_idx;
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    std::vector<Warpgroup> warpgroups;
    ucontext_t sched;
    int cur = 0;
    int async_bars = 0;            // mbarriers initialised so far, each the writer of the copies completing on it
    int async_clock[ASYNC] = {};   // those writers' clocks
    int epoch = 0;                 // barrier intervals so far
    std::vector<int> bar_known;    // every thread's clock at the last barrier (what a barrier makes all threads know)
    std::vector<MBarrier> mbars = std::vector<MBarrier>(MAX_SMEM / 8);   // by 8-byte slot of shared memory
    std::vector<std::vector<int>> readers;   // the reader clocks of words read by more than READERS threads
    int bar_arrived = 0;
    long bar_gen = 0;
    std::vector<int> named[16];    // bar.sync id, count: the threads waiting at named barrier id
    long named_gen[16] = {};
    long events = 0;
    std::string error;
    alignas(16) unsigned char smem[MAX_SMEM];
    std::vector<Word> shadow = std::vector<Word>(MAX_SMEM / 4);
    int smem_bytes = 0;
    std::vector<Range> ranges;
    std::mt19937 rng{12345};
};

inline State& S() {
    static State* s = new State();
    return *s;
}
inline Thread& me() { return S().threads[S().cur]; }

inline void yield() { swapcontext(&me().ctx, &S().sched); }

[[noreturn]] inline void fail(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    State& s = S();
    if (s.error.empty()) {
        char where[128];
        snprintf(where, sizeof where, " (block %u,%u,%u thread %d)", s.block_idx.x, s.block_idx.y, s.block_idx.z,
                 me().linear);
        s.error = std::string(buf) + where;
    }
    for (;;) yield();   // never resumed: the launch stops
}

// --- memory checks -------------------------------------------------------------------------------------------------

inline bool in_smem(const void* p, int bytes) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    return c >= S().smem && c + bytes <= S().smem + S().smem_bytes;
}

inline Word& word(const void* p) {
    return S().shadow[(static_cast<const unsigned char*>(p) - S().smem) / 4];
}

// What thread r knows of thread u's clock: its own; else what the last barrier or an acquired mbarrier phase told it.
inline int known(int r, int u) {
    State& s = S();
    return r == u ? s.threads[r].clock : std::max(s.bar_known[u], s.threads[r].acq[u]);
}
// Who u is, for a message: a thread, or the copies of an mbarrier (writer_id: its thread or the mbarrier's index).
inline const char* writer_kind(int u) {
    return u < static_cast<int>(S().threads.size()) ? "thread" : "the TMA copies of (initialised) mbarrier";
}
inline int writer_id(int u) {
    const int n = static_cast<int>(S().threads.size());
    return u < n ? u : u - n;
}
// Whether thread u's access at its clock `clock` happens before thread r's next one.
inline bool ordered(int u, int clock, int r) { return u == r || known(r, u) >= clock; }

inline void smem_read(const void* p, int bytes, int tid, const char* what) {
    if (!in_smem(p, bytes)) fail("%s: shared read of %d bytes outside the block's %d bytes", what, bytes, S().smem_bytes);
    State& s = S();
    const int clock = s.threads[tid].clock;
    for (int o = 0; o < bytes; o += 4) {
        Word& w = word(static_cast<const unsigned char*>(p) + o);
        const long off = static_cast<const unsigned char*>(p) + o - s.smem;
        if (w.mbarrier) fail("%s: an ordinary read of mbarrier byte %ld", what, off);
        if (w.pending >= 0) fail("%s: reads shared byte %ld while thread %d's cp.async to it is in flight", what, off, w.pending);
        if (!w.written) fail("%s: reads shared byte %ld, never written", what, off);
        if (!ordered(w.w_tid, w.w_clock, tid))
            fail("%s: reads shared byte %ld written by %s %d without a barrier or mbarrier wait between", what, off,
                 writer_kind(w.w_tid), writer_id(w.w_tid));
        int i = 0;
        while (i < w.nr && w.r_tid[i] != tid) ++i;
        if (i < w.nr) {
            w.r_clock[i] = clock;
        } else if (w.nr < READERS) {
            w.r_tid[w.nr] = tid;
            w.r_clock[w.nr++] = clock;
        } else {
            if (w.many < 0) {
                w.many = static_cast<int>(s.readers.size());
                s.readers.emplace_back(s.threads.size(), 0);
            }
            s.readers[w.many][tid] = clock;
        }
    }
}

inline void smem_write_check(const void* p, int bytes, int tid, const char* what) {
    if (!in_smem(p, bytes)) fail("%s: shared write of %d bytes outside the block's %d bytes", what, bytes, S().smem_bytes);
    State& s = S();
    for (int o = 0; o < bytes; o += 4) {
        Word& w = word(static_cast<const unsigned char*>(p) + o);
        const long off = static_cast<const unsigned char*>(p) + o - s.smem;
        if (w.mbarrier) fail("%s: an ordinary write of mbarrier byte %ld", what, off);
        if (w.pending >= 0) fail("%s: writes shared byte %ld while thread %d's cp.async to it is in flight", what, off, w.pending);
        if (w.written && !ordered(w.w_tid, w.w_clock, tid))
            fail("%s: writes shared byte %ld also written by %s %d without a barrier or mbarrier wait between",
                 what, off, writer_kind(w.w_tid), writer_id(w.w_tid));
        for (int i = 0; i < w.nr; ++i)
            if (!ordered(w.r_tid[i], w.r_clock[i], tid))
                fail("%s: writes shared byte %ld read by thread %d without a barrier or mbarrier wait between", what,
                     off, w.r_tid[i]);
        if (w.many >= 0)
            for (size_t u = 0; u < s.readers[w.many].size(); ++u)
                if (s.readers[w.many][u] && !ordered(static_cast<int>(u), s.readers[w.many][u], tid))
                    fail("%s: writes shared byte %ld read by thread %zu without a barrier or mbarrier wait between",
                         what, off, u);
        if (w.wg_busy >= 0 && w.wg_group >= s.warpgroups[w.wg_busy].retired)
            fail("%s: writes shared byte %ld that warpgroup %d's wgmma (group %d) has not finished reading", what, off,
                 w.wg_busy, w.wg_group);
    }
}

inline void smem_wrote(const void* p, int bytes, int tid) {
    Thread& t = S().threads[tid];
    const long seq = ++t.writes;
    for (int o = 0; o < bytes; o += 4) {
        Word& w = word(static_cast<const unsigned char*>(p) + o);
        w.written = true;
        w.w_tid = tid;
        w.w_clock = t.clock;
        w.w_seq = seq;
        w.pending = -1;
        w.nr = 0;
        if (w.many >= 0) std::fill(S().readers[w.many].begin(), S().readers[w.many].end(), 0);   // (kept for reuse)
    }
}

inline void global_check(const void* p, size_t bytes, bool write, const char* what) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    for (const Range& r : S().ranges)
        if (c >= r.lo && c + bytes <= r.lo + r.bytes) {
            if (write && !r.writable) fail("%s: writes a read-only input", what);
            return;
        }
    fail("%s: global %s of %zu bytes at %p outside every buffer of the launch", what, write ? "write" : "read", bytes, p);
}

inline void aligned(const void* p, int a, const char* what) {
    if (reinterpret_cast<uintptr_t>(p) % a) fail("%s: address %p not %d-byte aligned", what, p, a);
}

// --- barriers and warp collectives ---------------------------------------------------------------------------------

inline void syncthreads() {
    State& s = S();
    const long gen = s.bar_gen;
    ++s.events;
    if (++s.bar_arrived == static_cast<int>(s.threads.size())) {
        s.bar_arrived = 0;
        ++s.bar_gen;
        ++s.epoch;
        for (Thread& t : s.threads) s.bar_known[t.linear] = t.clock++;   // every thread knows every clock
        const size_t n = s.threads.size();
        for (size_t u = n; u < n + s.async_bars; ++u)                     // and every copy any thread waited for
            for (const Thread& t : s.threads) s.bar_known[u] = std::max(s.bar_known[u], t.acq[u]);
    } else {
        while (s.bar_gen == gen) yield();
    }
}

// bar.sync id, count (id 1..15): the first `count` threads to arrive meet there; each then knows what every other
// one knew (its clock, through acq, as an mbarrier phase carries it), and nothing of the threads outside.
inline void bar_sync(int id, int count) {
    State& s = S();
    if (id < 1 || id > 15 || count <= 0 || count % 32)
        fail("bar.sync %d, %d: not a named barrier of whole warps", id, count);
    std::vector<int>& members = s.named[id];
    const long gen = s.named_gen[id];
    ++s.events;
    members.push_back(me().linear);
    if (static_cast<int>(members.size()) == count) {
        for (int r : members)
            for (int u : members) s.threads[r].acq[u] = std::max(s.threads[r].acq[u], s.threads[u].clock);
        const size_t n = s.threads.size();
        for (size_t u = n; u < n + s.async_bars; ++u) {                   // the copies any member waited for
            int most = 0;
            for (int r : members) most = std::max(most, s.threads[r].acq[u]);
            for (int r : members) s.threads[r].acq[u] = most;
        }
        for (int u : members) ++s.threads[u].clock;
        members.clear();
        ++s.named_gen[id];
    } else {
        while (s.named_gen[id] == gen) yield();
    }
}

// Every lane of the warp deposits its inputs in slot gen % 2, then waits for all 32; returns the slot.
inline int warp_meet(const char* what) {
    State& s = S();
    Warp& w = s.warps[me().linear / 32];
    const long gen = w.gen;
    const int slot = static_cast<int>(gen & 1);
    if (w.arrived == 0) {
        w.what[slot] = what;
    } else if (w.what[slot] != what) {
        fail("lanes of warp %d meet at different collectives (%s, %s)", me().linear / 32, w.what[slot], what);
    }
    ++s.events;
    if (++w.arrived == 32) {
        w.arrived = 0;
        ++w.gen;
    } else {
        while (w.gen == gen) yield();
    }
    return slot;
}

inline int lane() { return me().linear & 31; }

// Every thread of the warpgroup arrives; the last one runs `last` (with the warpgroup's deposits complete), then all
// go on. `what` must be the same collective for all 128.
template <class F>
inline void group_meet(const char* what, F&& last) {
    State& s = S();
    if ((me().linear / 128 + 1) * 128 > static_cast<int>(s.threads.size()))
        fail("%s: the calling warpgroup is not whole (a block of %zu threads)", what, s.threads.size());
    Warpgroup& g = s.warpgroups[me().linear / 128];
    const long gen = g.gen;
    if (g.arrived == 0) {
        g.what = what;
    } else if (g.what != what) {
        fail("threads of warpgroup %d meet at different collectives (%s, %s)", me().linear / 128, g.what, what);
    }
    ++s.events;
    if (++g.arrived == 128) {
        last(g);
        g.arrived = 0;
        ++g.gen;
    } else {
        while (g.gen == gen) yield();
    }
}

// --- number formats ------------------------------------------------------------------------------------------------

inline unsigned bits(float x) {
    unsigned u;
    std::memcpy(&u, &x, 4);
    return u;
}
inline float from_bits(unsigned u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}
// cvt.rna.tf32.f32: to 10 explicit mantissa bits, to nearest, ties away from zero (adding half an ulp to the
// magnitude bits and truncating does exactly that for finite values)
inline unsigned tf32(float x) { return (bits(x) + 0x1000u) & 0xffffe000u; }
// cvt.rn.bf16.f32: to 7 explicit mantissa bits, to nearest even
inline unsigned short bf16(float x) {
    const unsigned u = bits(x);
    return static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline double bf16_value(unsigned short h) { return from_bits(static_cast<unsigned>(h) << 16); }

}  // namespace emu

inline unsigned __float_as_uint(float x) { return emu::bits(x); }
inline float __uint_as_float(unsigned u) { return emu::from_bits(u); }

#define threadIdx (emu::me().tid)
#define blockIdx (emu::S().block_idx)
#define blockDim (emu::S().block)
#define gridDim (emu::S().grid)
#define __syncthreads() emu::syncthreads()
#define HN_DYNAMIC_SMEM(name) unsigned char* name = emu::S().smem

// --- the memory kernels' primitives (norm.cu's reductions): warp shuffles, global atomics, fences ----------------------
// Blocks run one after another, so a global atomic is the plain read-modify-write, and __threadfence orders nothing
// that is not ordered already.

// shfl.sync.bfly (__shfl_xor_sync, full warps only): lane l receives lane (l ^ o)'s v, a 4- or 8-byte value.
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int o) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "a 4- or 8-byte value");
    if (mask != 0xffffffffu) emu::fail("shfl.sync.bfly: mask %#x is not the full warp", mask);
    emu::Warp& w = emu::S().warps[emu::me().linear / 32];
    const int l = emu::lane();
    std::memcpy(w.in[w.gen & 1][l], &v, sizeof(T));
    const int slot = emu::warp_meet("shfl.sync.bfly");
    T r;
    std::memcpy(&r, w.in[slot][(l ^ o) & 31], sizeof(T));
    emu::warp_meet("shfl.sync.bfly");   // the deposits stay until every lane has read its partner's
    return r;
}
// vote.sync.ballot (__ballot_sync, full warps only): bit l of the result is lane l's predicate, in every lane.
inline unsigned __ballot_sync(unsigned mask, int pred) {
    if (mask != 0xffffffffu) emu::fail("vote.sync.ballot: mask %#x is not the full warp", mask);
    emu::Warp& w = emu::S().warps[emu::me().linear / 32];
    const int l = emu::lane();
    const unsigned bit = pred ? 1u : 0u;
    std::memcpy(w.in[w.gen & 1][l], &bit, sizeof(bit));
    const int slot = emu::warp_meet("vote.sync.ballot");
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) {
        unsigned b;
        std::memcpy(&b, w.in[slot][i], sizeof(b));
        r |= b << i;
    }
    emu::warp_meet("vote.sync.ballot");
    return r;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
template <class T>
inline T atomicAdd(T* p, T v) {
    const T old = *p;
    *p = old + v;
    return old;
}
inline void __threadfence() {}
// CUDA's correctly rounded single operations (never contracted into a fused multiply-add), and a clock
inline float __fadd_rn(float a, float b) {
    volatile float r = a + b;
    return r;
}
inline float __fsub_rn(float a, float b) {
    volatile float r = a - b;
    return r;
}
inline float __fmul_rn(float a, float b) {
    volatile float r = a * b;
    return r;
}
inline long long clock64() {   // advances at every read, so that a kernel spinning on it ends
    static long long t = 0;
    return t += 1000;
}
inline int min(int a, int b) { return a < b ? a : b; }     // CUDA's integer min and max
inline int max(int a, int b) { return a > b ? a : b; }
inline float __int_as_float(int i) { return emu::from_bits(static_cast<unsigned>(i)); }

// --- mma.cu's primitives ---------------------------------------------------------------------------------------------

inline void hn_cp_async(void* dst, const void* src, int size, int src_bytes, const char* what) {
    emu::aligned(dst, size, what);
    emu::aligned(src, size, what);
    if (src_bytes < 0 || src_bytes > size) emu::fail("%s: src-size %d", what, src_bytes);
    const int tid = emu::me().linear;
    emu::smem_write_check(dst, size, tid, what);
    emu::Pending p{static_cast<unsigned char*>(dst), {0}, size, -1};
    if (src_bytes > 0) {
        emu::global_check(src, src_bytes, false, what);
        std::memcpy(p.data, src, src_bytes);   // zero-filled beyond src_bytes
    }
    for (int o = 0; o < size; o += 4) emu::word(p.dst + o).pending = tid;
    emu::me().pending.push_back(p);
}
inline void hn_cp_async16(void* dst, const void* src, int src_bytes) { hn_cp_async(dst, src, 16, src_bytes, "cp.async 16"); }
inline void hn_cp_async4(void* dst, const void* src, int src_bytes) { hn_cp_async(dst, src, 4, src_bytes, "cp.async 4"); }
inline void hn_cp_async_commit() {
    emu::Thread& t = emu::me();
    for (emu::Pending& p : t.pending)
        if (p.group < 0) p.group = t.groups_committed;
    ++t.groups_committed;
}
template <int N>
inline void hn_cp_async_wait() {   // retire every committed group but the newest N
    emu::Thread& t = emu::me();
    const int keep_from = t.groups_committed - N;
    std::vector<emu::Pending> still;
    for (emu::Pending& p : t.pending) {
        if (p.group >= 0 && p.group < keep_from) {
            std::memcpy(p.dst, p.data, p.bytes);
            emu::smem_wrote(p.dst, p.bytes, t.linear);
        } else {
            still.push_back(p);
        }
    }
    t.pending.swap(still);
}

inline float hn_lds(const float* p) {
    emu::aligned(p, 4, "ld.shared");
    emu::smem_read(p, 4, emu::me().linear, "ld.shared");
    return *p;
}
inline float4 hn_lds4(const float* p) {
    emu::aligned(p, 16, "ld.shared.v4");
    emu::smem_read(p, 16, emu::me().linear, "ld.shared.v4");
    float4 v;
    std::memcpy(&v, p, 16);
    return v;
}
inline void hn_sts4(void* p, unsigned x, unsigned y, unsigned z, unsigned w) {
    emu::aligned(p, 16, "st.shared.v4");
    emu::smem_write_check(p, 16, emu::me().linear, "st.shared.v4");
    unsigned v[4] = {x, y, z, w};
    std::memcpy(p, v, 16);
    emu::smem_wrote(p, 16, emu::me().linear);
}
inline unsigned hn_bits(float x) { return emu::bits(x); }
inline void hn_bar_sync(int id, int count) { emu::bar_sync(id, count); }
inline void hn_sts1(void* p, unsigned x) {
    emu::aligned(p, 4, "st.shared.b32");
    emu::smem_write_check(p, 4, emu::me().linear, "st.shared.b32");
    std::memcpy(p, &x, 4);
    emu::smem_wrote(p, 4, emu::me().linear);
}
inline void hn_sts2(void* p, unsigned x, unsigned y) {
    emu::aligned(p, 8, "st.shared.v2");
    emu::smem_write_check(p, 8, emu::me().linear, "st.shared.v2");
    unsigned v[2] = {x, y};
    std::memcpy(p, v, 8);
    emu::smem_wrote(p, 8, emu::me().linear);
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lanes 8j..8j+7 address rows 0..7 of matrix j.
// Without .trans lane l = 4g + t receives, in register j, row g's elements 2t (low half) and 2t+1 of matrix j; with
// .trans, elements (row 2t, column g) (low half) and (row 2t+1, column g).
inline void hn_ldmatrix(unsigned (&r)[4], const void* p, bool trans) {
    const char* what = trans ? "ldmatrix.x4.trans" : "ldmatrix.x4";
    emu::aligned(p, 16, what);
    emu::smem_read(p, 16, emu::me().linear, what);
    emu::State& s = emu::S();
    emu::Warp& w = s.warps[emu::me().linear / 32];
    const int l = emu::lane();
    w.addr[w.gen & 1][l] = p;
    const int slot = emu::warp_meet(what);
    const int g = l >> 2, t = l & 3;
    for (int j = 0; j < 4; ++j) {
        unsigned short lo, hi;
        if (!trans) {
            const unsigned short* row = static_cast<const unsigned short*>(w.addr[slot][8 * j + g]);
            lo = row[2 * t];
            hi = row[2 * t + 1];
        } else {
            lo = static_cast<const unsigned short*>(w.addr[slot][8 * j + 2 * t])[g];
            hi = static_cast<const unsigned short*>(w.addr[slot][8 * j + 2 * t + 1])[g];
        }
        r[j] = static_cast<unsigned>(lo) | (static_cast<unsigned>(hi) << 16);
    }
    emu::warp_meet(what);   // the rows stay as they are until every lane has read its elements
}
inline void hn_ldmatrix_x4(unsigned (&r)[4], const void* p) { hn_ldmatrix(r, p, false); }
inline void hn_ldmatrix_x4_trans(unsigned (&r)[4], const void* p) { hn_ldmatrix(r, p, true); }

// mma.sync.aligned.{m16n8k8 .tf32 | m16n8k16 .bf16}.row.col.f32: D = A B + C, with the fragments as PTX ISA
// 9.7.14.5.7 and 9.7.14.5.8 give them (groupID = %laneid >> 2, threadID_in_group = %laneid % 4):
inline void hn_mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], bool bf) {
    const char* what = bf ? "mma.m16n8k16.bf16" : "mma.m16n8k8.tf32";
    emu::State& s = emu::S();
    emu::Warp& w = s.warps[emu::me().linear / 32];
    const int l = emu::lane();
    unsigned* in = w.in[w.gen & 1][l];
    for (int i = 0; i < 4; ++i) in[i] = a[i];
    in[4] = b[0];
    in[5] = b[1];
    for (int i = 0; i < 4; ++i) in[6 + i] = emu::bits(d[i]);
    if (!bf)
        for (int i = 0; i < 6; ++i)
            if (in[i] & 0x1fffu) emu::fail("%s: operand register %d = 0x%08x is not a tf32 value", what, i, in[i]);
    const int slot = emu::warp_meet(what);
    const int K = bf ? 16 : 8;
    double A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
    for (int lane = 0; lane < 32; ++lane) {
        const unsigned* v = w.in[slot][lane];
        const int groupID = lane >> 2, tig = lane % 4;
        if (!bf) {
            // A .tf32: row = groupID for a0, a2; groupID + 8 for a1, a3. col = threadID_in_group for a0, a1;
            // threadID_in_group + 4 for a2, a3.
            for (int i = 0; i < 4; ++i) {
                const int row = (i == 0 || i == 2) ? groupID : groupID + 8;
                const int col = (i < 2) ? tig : tig + 4;
                A[row][col] = emu::from_bits(v[i]);
            }
            // B .tf32: row = threadID_in_group for b0; threadID_in_group + 4 for b1. col = groupID.
            for (int i = 0; i < 2; ++i) B[i == 0 ? tig : tig + 4][groupID] = emu::from_bits(v[4 + i]);
        } else {
            // A .bf16 (a0..a7, two per register, low half first): row = groupID for ai where 0 <= i < 2 || 4 <= i < 6,
            // groupID + 8 otherwise; col = threadID_in_group * 2 + (i & 1) for i < 4, + 8 for i >= 4.
            for (int i = 0; i < 8; ++i) {
                const unsigned short h = static_cast<unsigned short>(v[i / 2] >> (16 * (i & 1)));
                const int row = (i < 2 || (4 <= i && i < 6)) ? groupID : groupID + 8;
                const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
                A[row][col] = emu::bf16_value(h);
            }
            // B .bf16 (b0..b3): row = threadID_in_group * 2 + (i & 1) for i < 2, + 8 for i >= 2; col = groupID.
            for (int i = 0; i < 4; ++i) {
                const unsigned short h = static_cast<unsigned short>(v[4 + i / 2] >> (16 * (i & 1)));
                B[tig * 2 + (i & 1) + (i >= 2 ? 8 : 0)][groupID] = emu::bf16_value(h);
            }
        }
        // C/D .f32: row = groupID for c0, c1; groupID + 8 for c2, c3. col = threadID_in_group * 2 + (i & 1).
        for (int i = 0; i < 4; ++i) C[i < 2 ? groupID : groupID + 8][tig * 2 + (i & 1)] = emu::from_bits(v[6 + i]);
    }
    const int groupID = l >> 2, tig = l % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? groupID : groupID + 8, col = tig * 2 + (i & 1);
        double sum = C[row][col];
        for (int k = 0; k < K; ++k) sum += A[row][k] * B[k][col];
        d[i] = static_cast<float>(sum);
    }
    emu::warp_meet(what);
}
inline void hn_mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) { hn_mma(d, a, b, false); }
inline void hn_mma_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) { hn_mma(d, a, b, true); }

// --- wgmma (PTX ISA 9.7.15) ------------------------------------------------------------------------------------------
// mma.cu's descriptors and alignment are its own code, run here on shared-memory offsets as the GPU's are.
inline unsigned hn_smem_addr(const void* p) {
    if (!emu::in_smem(p, 1)) emu::fail("a shared-memory address outside the block's shared memory");
    return static_cast<unsigned>(static_cast<const unsigned char*>(p) - emu::S().smem);
}
inline void hn_fence_proxy_async() { emu::me().fenced = emu::me().writes; }

// --- mbarrier (PTX ISA 9.7.13.15): 8-byte objects in dynamic shared memory ------------------------------------------
namespace emu {
inline MBarrier& mbarrier_at(void* p, const char* what, bool use) {
    aligned(p, 8, what);
    if (!in_smem(p, 8)) fail("%s: an mbarrier outside the block's dynamic shared memory", what);
    State& s = S();
    MBarrier& m = s.mbars[(static_cast<unsigned char*>(p) - s.smem) / 8];
    if (use && !m.init) fail("%s: mbarrier at byte %ld used before mbarrier.init", what,
                             static_cast<long>(static_cast<unsigned char*>(p) - s.smem));
    if (use && !ordered(m.init_tid, m.init_clock, me().linear))
        fail("%s: mbarrier.init by thread %d not ordered before this use (a barrier after the init)", what, m.init_tid);
    return m;
}
// One arrival of the calling thread: the phase takes what the thread knows, the thread's clock moves on (a release),
// and the phase completes at its count of arrivals.
// The phase completes once its arrivals are all in and its transaction bytes have all landed.
inline void mbarrier_settle(MBarrier& m) {
    if (m.pending == 0 && m.tx == 0) {
        m.done[m.phase & 1] = m.carried;
        std::fill(m.carried.begin(), m.carried.end(), 0);
        ++m.phase;
        m.pending = m.count;
    }
}
// What the calling thread knows joins the current phase (a release: its clock moves on).
inline void mbarrier_release(MBarrier& m) {
    Thread& t = me();
    for (size_t u = 0; u < m.carried.size(); ++u)
        m.carried[u] = std::max(m.carried[u], known(t.linear, static_cast<int>(u)));
    ++t.clock;
    ++S().events;
}
inline unsigned long long mbarrier_arrive(MBarrier& m, long tx = 0) {
    const unsigned long long state = static_cast<unsigned long long>(m.phase);
    if (m.pending == 0) fail("mbarrier.arrive: the phase's arrivals are all in, its transactions pending");
    mbarrier_release(m);
    m.tx += tx;
    --m.pending;
    mbarrier_settle(m);
    return state;
}
}  // namespace emu

// mbarrier.init.shared::cta.b64 [bar], count
inline void hn_mbar_init(void* bar, unsigned count) {
    emu::MBarrier& m = emu::mbarrier_at(bar, "mbarrier.init", false);
    if (count < 1 || count > (1u << 20) - 1) emu::fail("mbarrier.init: count %u outside 1..2^20-1", count);
    const int n = static_cast<int>(emu::S().threads.size()) + emu::ASYNC;
    m = emu::MBarrier();
    if (emu::S().async_bars == emu::ASYNC) emu::fail("mbarrier.init: more than %d mbarriers in a block", emu::ASYNC);
    m.async = emu::S().async_bars++;
    m.init = true;
    m.init_tid = emu::me().linear;
    m.init_clock = emu::me().clock;
    m.count = m.pending = static_cast<int>(count);
    m.carried.assign(n, 0);
    m.done[0].assign(n, 0);
    m.done[1].assign(n, 0);
    for (int o = 0; o < 8; o += 4) {
        emu::Word& w = emu::word(static_cast<unsigned char*>(bar) + o);
        w.mbarrier = true;
    }
}
// mbarrier.arrive.shared::cta.b64 state, [bar]: returns the state (here the phase the arrival counts toward)
inline unsigned long long hn_mbar_arrive(void* bar) {
    return emu::mbarrier_arrive(emu::mbarrier_at(bar, "mbarrier.arrive", true));
}
// mbarrier.try_wait.parity.shared::cta.b64 done, [bar], parity: true once the phase of that parity has completed
// (the current phase's parity differs), and then the caller knows what the phase's arrivals knew (an acquire); false
// lets the other threads run. A kernel loops: while (!hn_mbar_try_wait(bar, parity)) {}
inline bool hn_mbar_try_wait(void* bar, unsigned parity) {
    emu::MBarrier& m = emu::mbarrier_at(bar, "mbarrier.try_wait.parity", true);
    if (static_cast<unsigned>(m.phase & 1) == (parity & 1u)) {
        emu::yield();
        return false;
    }
    emu::Thread& t = emu::me();
    const std::vector<int>& done = m.done[parity & 1u];
    for (size_t u = 0; u < done.size(); ++u) t.acq[u] = std::max(t.acq[u], done[u]);
    return true;
}
// mbarrier.arrive.expect_tx.shared::cta.b64 _, [bar], bytes: one arrival, and `bytes` more transaction bytes the
// phase waits for.
inline void hn_mbar_arrive_tx(void* bar, unsigned bytes) {
    emu::mbarrier_arrive(emu::mbarrier_at(bar, "mbarrier.arrive.expect_tx", true), static_cast<long>(bytes));
}
inline void hn_fence_mbar_init() {}

// --- TMA (PTX ISA 9.7.9.25, cp.async.bulk.tensor): the emulator's tensor maps, as tests/emu_tma.py encodes them ----
// bits[0] mode (1 tile, 2 im2col), [1] the tensor's address, [2..5] its sizes (innermost first), [6..8] the byte
// strides of dimensions 1..3, [9] the box's elements a row (tile) or channels a pixel (im2col), [10] its rows or
// pixels, [11..14] (im2col) the corners lower W, lower H, upper W, upper H (signed), [15] (im2col) the element
// strides of W and H (low and high 32 bits). Elements of 2 bytes, rows of 128 bytes, the 128-byte swizzle.
namespace emu {
// One box's bytes landed in shared memory at dst (row i, 16-byte chunk j of a 128-byte row at chunk j ^ (address bit
// 7..9), the 128-byte swizzle on a 1024-byte aligned box), written through the async proxy (no fence.proxy.async
// needed before wgmma reads them) by bar's copies (their own clock, after the block's threads: see "Ordering"),
// ordered after what the issuing thread knew, completing `bytes` of bar's transactions: the phase then carries the
// write.
inline void tma_land(void* dst, const std::vector<unsigned short>& box, int rows, void* bar, const char* what) {
    State& s = S();
    const int tid = me().linear;
    if ((static_cast<unsigned char*>(dst) - s.smem) % 1024) fail("%s: a 128-byte swizzled box not 1024-byte aligned", what);
    const int bytes = rows * 128;
    smem_write_check(dst, bytes, tid, what);
    MBarrier& m = mbarrier_at(bar, what, true);
    if (m.tx < bytes) fail("%s: %d bytes complete on an mbarrier expecting %ld", what, bytes, m.tx);
    for (int i = 0; i < rows; ++i)
        for (int j = 0; j < 8; ++j) {
            const long a = (static_cast<unsigned char*>(dst) - s.smem) + i * 128 + j * 16;
            std::memcpy(s.smem + (a ^ (((a >> 7) & 7) << 4)), box.data() + i * 64 + j * 8, 16);
        }
    const int writer = static_cast<int>(s.threads.size()) + m.async, clock = ++s.async_clock[m.async];
    for (int o = 0; o < bytes; o += 4) {
        Word& w = word(static_cast<unsigned char*>(dst) + o);
        w.written = true;
        w.w_tid = writer;
        w.w_clock = clock;
        w.w_seq = 0;                                     // (the async proxy: no fence needed)
        w.pending = -1;
        w.nr = 0;
        if (w.many >= 0) std::fill(s.readers[w.many].begin(), s.readers[w.many].end(), 0);
    }
    m.carried[writer] = std::max(m.carried[writer], clock);
    m.tx -= bytes;
    ++s.events;
    mbarrier_settle(m);
}
inline unsigned short tma_read(const unsigned long long* b, long long offset, const char* what) {
    const unsigned short* p = reinterpret_cast<const unsigned short*>(b[1]) + offset;
    global_check(p, 2, false, what);
    return *p;
}
}  // namespace emu

// cp.async.bulk.tensor.2d...tile: the box of bits[10] rows x bits[9] elements from (col, row) of the 2D tensor, zeros
// past its edges.
template <class Map>
inline void hn_tma_tile2d(void* dst, const Map& map, int col, int row, void* bar) {
    const char* what = "cp.async.bulk.tensor.2d (tile)";
    const unsigned long long* b = map.bits;
    if (b[0] != 1 || b[9] != 64) emu::fail("%s: not a tile map of 64-element rows", what);
    const long long cols = static_cast<long long>(b[2]), rows = static_cast<long long>(b[3]);
    const int box_rows = static_cast<int>(b[10]);
    std::vector<unsigned short> box(box_rows * 64, 0);
    for (int i = 0; i < box_rows; ++i)
        for (int j = 0; j < 64; ++j) {
            const long long r = row + i, c = col + j;
            if (r >= 0 && r < rows && c >= 0 && c < cols)
                box[i * 64 + j] = emu::tma_read(b, r * static_cast<long long>(b[6]) / 2 + c, what);
        }
    emu::tma_land(dst, box, box_rows, bar, what);
}

// cp.async.bulk.tensor.4d...im2col: bits[10] pixels x 64 channels from channel c of the output pixel whose input
// corner is (w, h) of image n, each pixel read at its corner + (s, r); zeros outside the image and past the last one.
template <class Map>
inline void hn_tma_im2col4d(void* dst, const Map& map, int c, int w, int h, int n, int s, int r, void* bar) {
    const char* what = "cp.async.bulk.tensor.4d (im2col)";
    const unsigned long long* b = map.bits;
    if (b[0] != 2 || b[9] != 64) emu::fail("%s: not an im2col map of 64 channels a pixel", what);
    const long long C = static_cast<long long>(b[2]), W = static_cast<long long>(b[3]), H = static_cast<long long>(b[4]),
                    N = static_cast<long long>(b[5]);
    const long long lw = static_cast<long long>(b[11]), lh = static_cast<long long>(b[12]),
                    uw = static_cast<long long>(b[13]), uh = static_cast<long long>(b[14]);
    const long long sw = static_cast<long long>(b[15] & 0xffffffffu), sh = static_cast<long long>(b[15] >> 32);
    const long long Q = (W - 1 + uw - lw) / sw + 1, P = (H - 1 + uh - lh) / sh + 1;
    if ((w - lw) % sw || (h - lh) % sh || w < lw || h < lh)
        emu::fail("%s: a corner (%d, %d) off the bounding box's grid", what, w, h);
    const long long first = n * P * Q + (h - lh) / sh * Q + (w - lw) / sw;
    const int pixels = static_cast<int>(b[10]);
    std::vector<unsigned short> box(pixels * 64, 0);
    for (int i = 0; i < pixels; ++i) {
        const long long at = first + i, img = at / (P * Q), pq = at - img * P * Q, p = pq / Q, q = pq - p * Q;
        const long long ih = lh + p * sh + r, iw = lw + q * sw + s;
        if (img >= N || ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
        for (int j = 0; j < 64 && c + j < C; ++j)
            box[i * 64 + j] = emu::tma_read(b, (img * static_cast<long long>(b[8]) + ih * static_cast<long long>(b[7]) +
                                                iw * static_cast<long long>(b[6])) / 2 + c + j, what);
    }
    emu::tma_land(dst, box, pixels, bar, what);
}

inline void hn_wgmma_fence() { emu::group_meet("wgmma.fence", [](emu::Warpgroup&) {}); }
inline void hn_wgmma_commit() {
    emu::group_meet("wgmma.commit_group", [](emu::Warpgroup& g) { ++g.committed; });
}
// Retire every committed group but the newest N: their results reach the registers.
template <int N>
inline void hn_wgmma_wait() {
    emu::group_meet("wgmma.wait_group", [](emu::Warpgroup& g) {
        const int upto = g.committed - N;
        std::vector<emu::WgmmaOp> still;
        for (emu::WgmmaOp& op : g.ops) {
            if (op.group < upto) {
                for (int t = 0; t < 128; ++t)
                    if (op.ra[t] && std::memcmp(op.ra[t], op.ra_was[t], sizeof op.ra_was[t]) != 0)
                        emu::fail("wgmma.wait_group: thread %d wrote a register of A before the wgmma reading it "
                                  "retired", t);
                for (int t = 0; t < 128; ++t)
                    for (size_t i = 0; i < op.value[t].size(); ++i) op.d[t][i] = op.value[t][i];
            } else {
                still.push_back(std::move(op));
            }
        }
        g.ops.swap(still);
        if (upto > g.retired) g.retired = upto;
    });
}

namespace emu {
// Element (row, k) of an operand of `bytes`-byte elements (2: bf16, 4: tf32) at descriptor `desc` (PTX ISA
// 9.7.15.5.1): start address bits 0-13, leading byte offset 16-29, stride byte offset 32-45 (each >> 4), base offset
// 49-51, swizzle 62-63. K-major, no swizzle: core matrices of 8 rows x 16 bytes (8 x 8 bf16, 8 x 4 tf32), rows 8
// apart by the stride byte offset, the next 16 bytes of K by the leading byte offset. K-major, 128-byte swizzle: rows
// of 128 bytes, groups of 8 rows by the stride byte offset, and the address's bits 4-6 XORed with its bits 7-9.
// MN-major (the transpose flag set; 16-bit elements only), no swizzle: core matrices of 8 K rows x 16 bytes (8
// elements of M or N), K rows 16 bytes apart, the next 8 of M or N by the stride byte offset, the next 8 K rows by the
// leading byte offset (the ISA's canonical ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))). MN-major, 128-byte swizzle: K rows
// of 64 elements of M or N (128 bytes), groups of 8 K rows by the stride byte offset, the next 64 of M or N by the
// leading byte offset, then the same XOR.
inline unsigned wgmma_at(unsigned long long desc, int bytes, bool mn_major, int row, int k, const char* what) {
    const unsigned start = static_cast<unsigned>(desc & 0x3FFF) << 4;
    const unsigned lbo = static_cast<unsigned>((desc >> 16) & 0x3FFF) << 4;
    const unsigned sbo = static_cast<unsigned>((desc >> 32) & 0x3FFF) << 4;
    const unsigned base_offset = static_cast<unsigned>((desc >> 49) & 7), mode = static_cast<unsigned>(desc >> 62);
    const int core = 16 / bytes;   // elements of K in a 16-byte row of a core matrix
    if (base_offset != 0) fail("%s: descriptor base offset %u (only 0 emulated)", what, base_offset);
    if (mn_major && bytes != 2) fail("%s: MN-major operand of %d-byte elements (16-bit only)", what, bytes);
    if (mode == 0 && !mn_major)
        return start + (row / 8) * sbo + (k / core) * lbo + (row % 8) * 16 + (k % core) * bytes;
    if (mode == 0) return start + (row / 8) * sbo + (row % 8) * 2 + (k / 8) * lbo + (k % 8) * 16;
    if (mode != 1) fail("%s: descriptor swizzle mode %u (only 128 bytes and none emulated)", what, mode);
    const unsigned a = mn_major ? start + (row / 64) * lbo + (k / 8) * sbo + (k % 8) * 128 + (row % 64) * 2
                                : start + (row / 8) * sbo + (row % 8) * 128 + k * bytes;
    return a ^ (((a >> 7) & 7) << 4);
}

// The value the tensor cores read from an element: bf16 as it is; tf32 the float32 word with its low 13 bits ignored.
inline double wgmma_value(const unsigned char* p, int bytes) {
    if (bytes == 2) {
        unsigned short h;
        std::memcpy(&h, p, 2);
        return bf16_value(h);
    }
    unsigned u;
    std::memcpy(&u, p, 4);
    return from_bits(u & 0xffffe000u);
}

// One wgmma.mma_async of the calling warpgroup, D (64 x N) += A (64 x K, da) B (K x N, db), operands of `bytes`-byte
// elements, both K-major or both MN-major. d: this thread's N / 2 accumulators, in the fragment order of PTX ISA
// 9.7.15.5.2 ("Register fragments"): thread t of the warpgroup holds d_i at row 16 (warp % 4) + lane / 4 +
// 8 ((i / 2) % 2), column 8 (i / 4) + 2 (lane % 4) + i % 2. The result reaches d when wait_group retires the group.
// ra (tf32, K = 8 only): A from this thread's 4 registers instead of da, in the same ISA section's order for A
// (m64nNk8 .tf32): ra[i] at row 16 (warp % 4) + lane / 4 + 8 (i % 2), column lane % 4 + 4 (i / 2), low 13 bits ignored.
template <int N, int K>
inline void wgmma(float* d, unsigned long long da, unsigned long long db, int bytes, bool mn_major, const char* what,
                  const unsigned* ra = nullptr) {
    State& s = S();
    const int t = me().linear % 128;
    Warpgroup& g0 = s.warpgroups[me().linear / 128];
    g0.d[t] = d;
    g0.da[t] = da;
    g0.db[t] = db;
    g0.ra[t] = ra;
    if (ra && (K != 8 || bytes != 4 || mn_major)) fail("%s: A from registers is emulated for tf32 only", what);
    group_meet(what, [&](Warpgroup& g) {
        const int wg = static_cast<int>(&g - s.warpgroups.data());
        for (int i = 1; i < 128; ++i)
            if ((!g.ra[0] && g.da[i] != g.da[0]) || g.db[i] != g.db[0] || !g.ra[i] != !g.ra[0])
                fail("%s: descriptors differ across the warpgroup", what);
        auto load = [&](unsigned long long desc, int rows, std::vector<double>& m) {   // m[row * K + k]
            m.assign(rows * K, 0.0);
            for (int r = 0; r < rows; ++r)
                for (int k = 0; k < K; ++k) {
                    const unsigned off = wgmma_at(desc, bytes, mn_major, r, k, what);
                    if (off % bytes || off + bytes > static_cast<unsigned>(s.smem_bytes))
                        fail("%s: operand byte %u outside shared memory or misaligned", what, off);
                    Word& w = s.shadow[off / 4];
                    const Thread& first = s.threads[wg * 128];
                    if (w.mbarrier) fail("%s: reads mbarrier byte %u", what, off);
                    if (w.pending >= 0) fail("%s: reads shared byte %u with a cp.async in flight", what, off);
                    if (!w.written) fail("%s: reads shared byte %u, never written", what, off);
                    if (!ordered(w.w_tid, w.w_clock, first.linear))
                        fail("%s: reads shared byte %u written by %s %d without a barrier or mbarrier wait before "
                             "the warpgroup's first thread", what, off, writer_kind(w.w_tid), writer_id(w.w_tid));
                    if (w.w_seq > 0 && s.threads[w.w_tid].fenced < w.w_seq)
                        fail("%s: reads shared byte %u written by thread %d, no fence.proxy.async after", what, off,
                             w.w_tid);
                    w.wg_busy = wg;
                    w.wg_group = g.committed;
                    m[r * K + k] = wgmma_value(s.smem + off, bytes);
                }
        };
        std::vector<double> A, B;
        WgmmaOp op;
        if (g.ra[0]) {
            A.assign(64 * K, 0.0);
            for (int th = 0; th < 128; ++th) {
                const int warp = th / 32, ln = th % 32;
                for (int i = 0; i < 4; ++i) {
                    const int r = 16 * warp + ln / 4 + 8 * (i % 2), k = ln % 4 + 4 * (i / 2);
                    A[r * K + k] = from_bits(g.ra[th][i] & 0xffffe000u);
                    op.ra_was[th][i] = g.ra[th][i];
                }
                op.ra[th] = g.ra[th];
            }
        } else {
            load(g.da[0], 64, A);
        }
        load(g.db[0], N, B);
        // the accumulator going in: the newest pending result for the same registers, else the registers
        op.group = g.committed;
        for (int th = 0; th < 128; ++th) {
            op.d[th] = g.d[th];
            std::vector<float> in(g.d[th], g.d[th] + N / 2);
            for (const WgmmaOp& prev : g.ops)
                if (prev.d[th] == g.d[th]) in = prev.value[th];
            const int warp = th / 32, ln = th % 32;
            op.value[th].resize(N / 2);
            for (int i = 0; i < N / 2; ++i) {
                const int row = 16 * warp + ln / 4 + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * (ln % 4) + i % 2;
                double sum = in[i];
                for (int k = 0; k < K; ++k) sum += A[row * K + k] * B[col * K + k];
                op.value[th][i] = static_cast<float>(sum);
            }
        }
        g.ops.push_back(std::move(op));
    });
}
}  // namespace emu

// wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16 d, da, db, 1, 1, 1, MN, MN: D (64 x N) += A (64 x 16, da) B
// (16 x N, db), both K-major (MN = 0) or both MN-major (MN = 1).
template <int N, int MN>
inline void hn_wgmma_bf16(float (&d)[N / 8][4], unsigned long long da, unsigned long long db) {
    emu::wgmma<N, 16>(&d[0][0], da, db, 2, MN == 1, "wgmma.mma_async.m64nNk16.bf16");
}
// wgmma.mma_async.sync.aligned.m64nNk8.f32.tf32.tf32 d, da, db, 1, 1, 1: D (64 x N) += A (64 x 8, da) B (8 x N, db),
// both K-major (tf32 has no transpose).
template <int N>
inline void hn_wgmma_tf32(float (&d)[N / 8][4], unsigned long long da, unsigned long long db) {
    emu::wgmma<N, 8>(&d[0][0], da, db, 4, false, "wgmma.mma_async.m64nNk8.tf32");
}

// hn_wgmma_tf32 with A from this thread's registers a[0..3] (mma.cu's hn_wgmma_tf32_ra): the ISA's A fragment order.
template <int N>
inline void hn_wgmma_tf32_ra(float (&d)[N / 8][4], const unsigned (&a)[4], unsigned long long db) {
    emu::wgmma<N, 8>(&d[0][0], 0, db, 4, false, "wgmma.mma_async.m64nNk8.tf32 (A in registers)", a);
}

inline unsigned hn_tf32(float x) { return emu::tf32(x); }
inline unsigned hn_pack_bf16x2(float lo, float hi) {
    return static_cast<unsigned>(emu::bf16(lo)) | (static_cast<unsigned>(emu::bf16(hi)) << 16);
}

// common.cuh's 16-byte global load and store (the batch-norm kernels' vectors): plain copies, the alignment checked.
inline uint4 hn_ld16(const void* p) {
    emu::aligned(p, 16, "ld.global.v4 (16 bytes)");
    uint4 v;
    std::memcpy(&v, p, 16);
    return v;
}
inline void hn_st16(void* p, uint4 v) {
    emu::aligned(p, 16, "st.global.v4 (16 bytes)");
    std::memcpy(p, &v, 16);
}
inline float4 hn_ldg4(const float* p) {
    emu::aligned(p, 16, "ld.global.v4");
    emu::global_check(p, 16, false, "ld.global.v4");
    float4 v;
    std::memcpy(&v, p, 16);
    return v;
}
inline unsigned hn_umulhi(unsigned a, unsigned b) {
    return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline float hn_ldg(const float* p) {
    emu::global_check(p, 4, false, "ld.global");
    return *p;
}
inline float hn_ld_c(const float* p) {
    emu::global_check(p, 4, false, "ld.global (C)");
    return *p;
}
inline void hn_st(float* p, float v) {
    emu::global_check(p, 4, true, "st.global");
    *p = v;
}
inline void hn_st_byte(unsigned char* p, unsigned char v) {
    emu::global_check(p, 1, true, "st.global.u8");
    *p = v;
}
inline void hn_st_u16(unsigned short* p, unsigned short v) {
    emu::aligned(p, 2, "st.global.u16");
    emu::global_check(p, 2, true, "st.global.u16");
    *p = v;
}
inline void hn_st_u32(unsigned short* p, unsigned v) {
    emu::aligned(p, 4, "st.global.u32");
    emu::global_check(p, 4, true, "st.global.u32");
    std::memcpy(p, &v, 4);
}
inline void hn_st_v4(void* p, uint4 v) {
    emu::aligned(p, 16, "st.global.v4.b32");
    emu::global_check(p, 16, true, "st.global.v4.b32");
    std::memcpy(p, &v, 16);
}
inline void hn_st2(float* p, float x, float y) {
    emu::aligned(p, 8, "st.global.v2");
    emu::global_check(p, 8, true, "st.global.v2");
    p[0] = x;
    p[1] = y;
}
// A vector access through a cast pointer (CUDA's *reinterpret_cast<float4*>(p)), which must be aligned to its size
// on the GPU; tests/test_cu_emulated.py rewrites the casts of the kernels it builds into this.
template <class T>
inline T* hn_vec(const void* p) {
    emu::aligned(p, sizeof(T), "vector access");
    return static_cast<T*>(const_cast<void*>(p));
}
inline void hn_atomic_add(float* p, float v) {
    emu::global_check(p, 4, true, "red.global.add");
    *p += v;
}
inline void hn_atomic_add2(float* p, float x, float y) {
    emu::aligned(p, 8, "red.global.add.v2.f32");
    emu::global_check(p, 8, true, "red.global.add.v2.f32");
    p[0] += x;
    p[1] += y;
}

// --- launching -------------------------------------------------------------------------------------------------------

namespace emu {

inline std::function<void()>& body() {
    static std::function<void()> f;
    return f;
}

inline void fiber_main() {
    body()();
    me().done = true;
    ++S().events;
    swapcontext(&me().ctx, &S().sched);
}

// Run `kernel` over the grid, one block after another; the fibers of a block are resumed in a shuffled order each
// round. Returns "" or the first error.
inline std::string launch(EmuDim3 grid, EmuDim3 block, int smem_bytes, std::function<void()> kernel, unsigned seed) {
    State& s = S();
    s.error.clear();
    s.grid = grid;
    s.block = block;
    s.rng.seed(seed);
    if (smem_bytes > MAX_SMEM) return "dynamic shared memory over the limit";
    s.smem_bytes = smem_bytes;
    const int n = static_cast<int>(block.x * block.y * block.z);
    if (n % 32) return "block size not a multiple of 32";
    body() = kernel;
    std::vector<std::vector<char>> stacks(n, std::vector<char>(STACK));
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                s.block_idx = {bx, by, bz};
                s.threads.assign(n, Thread());
                s.warps.assign(n / 32, Warp());
                s.warpgroups.assign((n + 127) / 128, Warpgroup());
                s.epoch = 0;
                s.bar_known.assign(n + ASYNC, 0);
                s.async_bars = 0;
                std::fill(s.async_clock, s.async_clock + ASYNC, 0);
                s.readers.clear();
                std::fill(s.mbars.begin(), s.mbars.begin() + (smem_bytes + 7) / 8, MBarrier());
                s.bar_arrived = 0;
                s.bar_gen = 0;
                for (int id = 0; id < 16; ++id) s.named[id].clear();
                std::memset(s.smem, 0xff, smem_bytes);   // NaN everywhere: unwritten words also show in results
                std::fill(s.shadow.begin(), s.shadow.begin() + (smem_bytes + 3) / 4, Word());
                for (int i = 0; i < n; ++i) {
                    Thread& t = s.threads[i];
                    t.linear = i;
                    t.acq.assign(n + ASYNC, 0);
                    t.tid = {static_cast<unsigned>(i % block.x), static_cast<unsigned>((i / block.x) % block.y),
                             static_cast<unsigned>(i / (block.x * block.y))};
                    getcontext(&t.ctx);
                    t.ctx.uc_stack.ss_sp = stacks[i].data();
                    t.ctx.uc_stack.ss_size = STACK;
                    t.ctx.uc_link = nullptr;
                    makecontext(&t.ctx, fiber_main, 0);
                }
                std::vector<int> order(n);
                for (int i = 0; i < n; ++i) order[i] = i;
                for (;;) {
                    std::shuffle(order.begin(), order.end(), s.rng);
                    const long before = s.events;
                    int live = 0;
                    for (int i : order) {
                        if (s.threads[i].done) continue;
                        ++live;
                        s.cur = i;
                        swapcontext(&s.sched, &s.threads[i].ctx);
                        if (!s.error.empty()) return s.error;
                    }
                    if (live == 0) break;
                    if (s.events == before) return "deadlock: threads wait at a barrier or collective others never reach";
                }
                for (const Thread& t : s.threads)
                    if (!t.pending.empty()) return "a thread ended with cp.async in flight";
                for (const Warpgroup& g : s.warpgroups)
                    if (!g.ops.empty()) return "a warpgroup ended with wgmma results not waited for";
            }
    return "";
}

}  // namespace emu
