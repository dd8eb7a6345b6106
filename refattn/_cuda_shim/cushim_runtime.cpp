// cushim_runtime.cpp: fibers, the block scheduler and the launch entry points.
//
// Compiled once per compiler and flag set and linked with each kernel build (see
// _build.py); the kernel's side defines cushim::generated_entries() and
// cushim::generated_dynamic_smem().
//
// Scheduling model. A block's threads are fibers on one OS worker. The scheduler
// resumes one runnable fiber at a time, chosen by the launch's schedule (see pick());
// it runs until it parks at a barrier or a warp intrinsic, or exits. A warp operation
// completes as soon as its last participant arrives and a barrier as soon as the last
// thread does, which releases the waiting fibers. When nothing can run and some
// thread has not exited, diagnose() reports why it never will (deadlock, partial or
// divergent barrier, mismatched warp operations). Races between threads thus surface
// as results that depend on the schedule, and misuse as an error, not a hang.
#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "cushim_core.h"

#if defined(CUSHIM_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__) || defined(CUSHIM_FORCE_UCONTEXT)
#define CUSHIM_UCONTEXT 1
#include <ucontext.h>
#endif

#ifndef CUSHIM_STACK_SIZE
#if defined(CUSHIM_ASAN)
#define CUSHIM_STACK_SIZE (512 * 1024)
#else
#define CUSHIM_STACK_SIZE (64 * 1024)
#endif
#endif

#define CUSHIM_EXPORT extern "C" __attribute__((visibility("default")))

#if !defined(CUSHIM_UCONTEXT)
// swapcontext saves and restores the signal mask with a system call on every switch;
// a kernel switches fibers at every shuffle, so only the callee-saved registers, the
// stack pointer and the FP control words are switched here.
extern "C" __attribute__((visibility("hidden"))) void cushim_ctx_switch(void** save_sp,
                                                                        void* next_sp);
extern "C" __attribute__((visibility("hidden"))) void cushim_ctx_trampoline();
asm(R"(
    .text
    .p2align 4
    .globl cushim_ctx_switch
    .hidden cushim_ctx_switch
    .type cushim_ctx_switch, @function
cushim_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cushim_ctx_switch, .-cushim_ctx_switch

    .p2align 4
    .globl cushim_ctx_trampoline
    .hidden cushim_ctx_trampoline
    .type cushim_ctx_trampoline, @function
cushim_ctx_trampoline:
    movq %r12, %rdi
    call *%r13
    ud2
    .size cushim_ctx_trampoline, .-cushim_ctx_trampoline
)");
#endif

namespace cushim {

CUSHIM_HIDDEN thread_local ThreadState* tl_thread = nullptr;
CUSHIM_HIDDEN thread_local uint3 tl_block_idx;
CUSHIM_HIDDEN thread_local dim3 tl_block_dim;
CUSHIM_HIDDEN thread_local dim3 tl_grid_dim;

// ---------------------------------------------------------------- fibers
enum WaitKind : unsigned char { kRunnable, kAtBarrier, kAtWarpOp, kExited, kFailed };
enum Schedule : int { kForward = 0, kReverse = 1, kRandom = 2 };

struct Fiber : ThreadState {
    void* sp;
    char* stack_lo;
    std::size_t stack_size;
    void* asan_fake;
    WaitKind wait;
    BarrierKind bar_kind;
    OpKind op;
    int pred;
    int bar_result;
    unsigned int mask;
    unsigned int size;
    int arg;
    int width;
    std::uint64_t value;
    std::uint64_t result;
    const char* file;
    int line;
#if defined(CUSHIM_UCONTEXT)
    ucontext_t ctx;
#endif
};

struct Launch {
    const Entry* entry;
    void** args;
    dim3 grid;
    dim3 block;
    unsigned long long smem;
    int schedule;
    unsigned long long seed;
    unsigned int threads;
    unsigned long long blocks;
    std::atomic<unsigned long long> next{0};
    std::atomic<bool> failed{false};
    std::mutex mu;
    std::string error;

    void fail(const std::string& message) {
        std::lock_guard<std::mutex> lock(mu);
        if (error.empty()) error = message;
        failed.store(true);
    }
};

struct Worker {
    Launch* launch = nullptr;
    std::vector<Fiber> fibers;
    // Runnable fibers as a bitset (a block has at most 1024 threads), so that the next
    // one in schedule order is found in a few word operations.
    std::uint64_t runnable[16] = {};
    unsigned int n_runnable = 0;
    unsigned int n_at_barrier = 0;
    unsigned int n_exited = 0;
    char* region = nullptr;
    std::size_t region_size = 0;
    void* sched_sp = nullptr;
#if defined(CUSHIM_UCONTEXT)
    ucontext_t sched_ctx;
#endif
    const void* sched_bottom = nullptr;
    std::size_t sched_size = 0;
    std::uint64_t rng = 0;
    bool failed = false;
    std::string message;
};

static thread_local Worker* tl_worker = nullptr;

static std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
static std::string format(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

static const char* op_name(OpKind op) {
    switch (op) {
        case kShfl: return "__shfl_sync";
        case kShflUp: return "__shfl_up_sync";
        case kShflDown: return "__shfl_down_sync";
        case kShflXor: return "__shfl_xor_sync";
        case kBallot: return "__ballot_sync";
        case kAny: return "__any_sync";
        case kAll: return "__all_sync";
        case kSyncWarp: return "__syncwarp";
    }
    return "?";
}

static const char* barrier_name(BarrierKind kind) {
    switch (kind) {
        case kBarPlain: return "__syncthreads()";
        case kBarCount: return "__syncthreads_count()";
        case kBarAnd: return "__syncthreads_and()";
        case kBarOr: return "__syncthreads_or()";
    }
    return "?";
}

static std::string where(const Fiber& f) {
    return format("thread (%u,%u,%u) [warp %u lane %u]", f.tid.x, f.tid.y, f.tid.z, f.warp,
                  f.lane);
}

static std::string site(const char* file, int line) {
    const char* base = std::strrchr(file, '/');
    return format("%s:%d", base ? base + 1 : file, line);
}

static inline void asan_start(void** fake, const void* bottom, std::size_t size) {
#if defined(CUSHIM_ASAN)
    __sanitizer_start_switch_fiber(fake, bottom, size);
#else
    (void)fake, (void)bottom, (void)size;
#endif
}

static inline void asan_finish(void* fake, const void** bottom, std::size_t* size) {
#if defined(CUSHIM_ASAN)
    __sanitizer_finish_switch_fiber(fake, bottom, size);
#else
    (void)fake, (void)bottom, (void)size;
#endif
}

static void to_scheduler(Fiber* f, bool exiting) {
    Worker* w = tl_worker;
    asan_start(exiting ? nullptr : &f->asan_fake, w->sched_bottom, w->sched_size);
#if defined(CUSHIM_UCONTEXT)
    swapcontext(&f->ctx, &w->sched_ctx);
#else
    cushim_ctx_switch(&f->sp, w->sched_sp);
#endif
    asan_finish(f->asan_fake, nullptr, nullptr);
}

static void fiber_main(Fiber* f) {
    Worker* w = tl_worker;
    asan_finish(nullptr, &w->sched_bottom, &w->sched_size);
    w->launch->entry->invoke(w->launch->entry->fn, w->launch->args);
    f->wait = kExited;
    to_scheduler(f, true);
    __builtin_trap();  // an exited fiber is never resumed
}

#if defined(CUSHIM_UCONTEXT)
static void fiber_main_uc() { fiber_main(static_cast<Fiber*>(tl_thread)); }
#endif

static void init_fiber(Worker* w, Fiber* f) {
#if defined(CUSHIM_ASAN)
    // The stack may hold the poisoned frames of a fiber abandoned after an error.
    __asan_unpoison_memory_region(f->stack_lo, f->stack_size);
#endif
    f->asan_fake = nullptr;
#if defined(CUSHIM_UCONTEXT)
    getcontext(&f->ctx);
    f->ctx.uc_stack.ss_sp = f->stack_lo;
    f->ctx.uc_stack.ss_size = f->stack_size;
    f->ctx.uc_link = nullptr;
    makecontext(&f->ctx, fiber_main_uc, 0);
    (void)w;
#else
    (void)w;
    // The frame cushim_ctx_switch pops: FP control words, r15, r14, r13 (entry), r12
    // (argument), rbx, rbp, return address (the trampoline). The stack is 16-byte
    // aligned after the final `ret`, so the trampoline's call meets the ABI.
    std::uintptr_t top = (reinterpret_cast<std::uintptr_t>(f->stack_lo) + f->stack_size) &
                         ~static_cast<std::uintptr_t>(15);
    std::uint64_t* sp = reinterpret_cast<std::uint64_t*>(top - 64);
    std::uint16_t fpcw;
    asm volatile("fnstcw %0" : "=m"(fpcw));
    sp[0] = static_cast<std::uint64_t>(__builtin_ia32_stmxcsr()) |
            (static_cast<std::uint64_t>(fpcw) << 32);
    sp[1] = 0;
    sp[2] = 0;
    sp[3] = reinterpret_cast<std::uint64_t>(&fiber_main);
    sp[4] = reinterpret_cast<std::uint64_t>(f);
    sp[5] = 0;
    sp[6] = 0;  // rbp = 0 ends frame-pointer walks (ASan's stack traces) here
    sp[7] = reinterpret_cast<std::uint64_t>(&cushim_ctx_trampoline);
    f->sp = sp;
#endif
}

static void resume(Worker* w, Fiber* f) {
    tl_thread = f;
    void* fake = nullptr;
    asan_start(&fake, f->stack_lo, f->stack_size);
#if defined(CUSHIM_UCONTEXT)
    swapcontext(&w->sched_ctx, &f->ctx);
#else
    cushim_ctx_switch(&w->sched_sp, f->sp);
#endif
    asan_finish(fake, nullptr, nullptr);
    tl_thread = nullptr;
}

// Misuse that the calling thread alone reveals: record it and never run again.
[[noreturn]] static void fail_here(Fiber* f, const std::string& message) {
    Worker* w = tl_worker;
    if (!w->failed) {
        w->failed = true;
        w->message = message;
    }
    f->wait = kFailed;
    to_scheduler(f, false);
    __builtin_trap();
}

static Fiber* current_fiber(const char* what) {
    if (tl_thread == nullptr || tl_worker == nullptr) {
        std::fprintf(stderr, "cushim: %s called outside a kernel launch\n", what);
        std::abort();
    }
    return static_cast<Fiber*>(tl_thread);
}

int block_barrier(BarrierKind kind, int pred, const char* file, int line) {
    Fiber* f = current_fiber("__syncthreads");
    f->wait = kAtBarrier;
    f->bar_kind = kind;
    f->pred = pred;
    f->file = file;
    f->line = line;
    to_scheduler(f, false);
    return f->bar_result;
}

std::uint64_t warp_op(OpKind op, unsigned int mask, std::uint64_t value, unsigned int size,
                      int arg, int width, const char* file, int line) {
    Fiber* f = current_fiber(op_name(op));
    if (((mask >> f->lane) & 1u) == 0) {
        fail_here(f, format("sync: %s at %s by %s: mask 0x%08x does not name the calling "
                            "lane %u",
                            op_name(op), site(file, line).c_str(), where(*f).c_str(), mask,
                            f->lane));
    }
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
        fail_here(f, format("sync: %s at %s by %s: width %d is not a power of two in [1, 32]",
                            op_name(op), site(file, line).c_str(), where(*f).c_str(), width));
    }
    f->wait = kAtWarpOp;
    f->op = op;
    f->mask = mask;
    f->value = value;
    f->size = size;
    f->arg = arg;
    f->width = width;
    f->file = file;
    f->line = line;
    to_scheduler(f, false);
    return f->result;
}

[[noreturn]] void kernel_trap(const char* what, const char* file, int line) {
    Fiber* f = current_fiber(what);
    fail_here(f, format("trap: %s at %s by %s", what, site(file, line).c_str(),
                        where(*f).c_str()));
}

static bool fail_block(Worker* w, const std::string& message) {
    w->failed = true;
    w->message = message;
    return false;
}

static std::string describe_wait(const Fiber& f) {
    if (f.wait == kAtBarrier) {
        return format("%s at %s", barrier_name(f.bar_kind), site(f.file, f.line).c_str());
    }
    return format("%s(mask 0x%08x) at %s", op_name(f.op), f.mask, site(f.file, f.line).c_str());
}

static void set_runnable(Worker* w, unsigned int i) {
    w->fibers[i].wait = kRunnable;
    w->runnable[i >> 6] |= 1ull << (i & 63);
    ++w->n_runnable;
}

static std::uint64_t splitmix64(std::uint64_t* state) {
    std::uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// The next fiber to resume. "forward" always takes the lowest runnable thread and
// "reverse" the highest, so with warp operations completing as soon as their lanes
// arrive, one warp runs ahead until a block barrier stops it: a missing barrier between
// a phase that writes shared memory and one that reads it shows whichever warp reads.
// "random" takes any runnable thread.
static int pick(Worker* w) {
    if (w->n_runnable == 0) return -1;
    const unsigned int words = (w->launch->threads + 63) / 64;
    if (w->launch->schedule == kReverse) {
        for (unsigned int k = words; k-- > 0;) {
            if (w->runnable[k]) return static_cast<int>(k * 64 + 63 - __builtin_clzll(w->runnable[k]));
        }
    } else if (w->launch->schedule == kRandom) {
        unsigned int r = static_cast<unsigned int>(splitmix64(&w->rng) % w->n_runnable);
        for (unsigned int k = 0; k < words; ++k) {
            std::uint64_t bits = w->runnable[k];
            const unsigned int c = static_cast<unsigned int>(__builtin_popcountll(bits));
            if (r >= c) {
                r -= c;
                continue;
            }
            while (r-- > 0) bits &= bits - 1;
            return static_cast<int>(k * 64 + __builtin_ctzll(bits));
        }
    } else {
        for (unsigned int k = 0; k < words; ++k) {
            if (w->runnable[k]) return static_cast<int>(k * 64 + __builtin_ctzll(w->runnable[k]));
        }
    }
    return -1;
}

static bool is_shuffle(OpKind op) { return op <= kShflXor; }

// Every participant of a warp operation (the lanes of its mask that have not exited)
// has arrived with the same operation and mask: compute each one's result, then
// release them.
static bool complete_warp_op(Worker* w, unsigned int base, unsigned int lanes_mask) {
    Fiber* lanes = &w->fibers[base];
    unsigned int ballot = 0;
    for (unsigned int j = 0; j < 32; ++j) {
        if (((lanes_mask >> j) & 1u) && lanes[j].value != 0) ballot |= 1u << j;
    }
    for (unsigned int i = 0; i < 32; ++i) {
        if (((lanes_mask >> i) & 1u) == 0) continue;
        Fiber& f = lanes[i];
        const unsigned int width = static_cast<unsigned int>(f.width);
        const unsigned int seg = i & ~(width - 1);
        unsigned int src = i;
        switch (f.op) {
            case kShfl:
                src = seg + (static_cast<unsigned int>(f.arg) & (width - 1));
                break;
            case kShflUp:
                src = (static_cast<long long>(i) - f.arg < static_cast<long long>(seg))
                          ? i
                          : i - static_cast<unsigned int>(f.arg);
                break;
            case kShflDown:
                src = (static_cast<long long>(i) + f.arg >= static_cast<long long>(seg + width))
                          ? i
                          : i + static_cast<unsigned int>(f.arg);
                break;
            case kShflXor:
                src = i ^ static_cast<unsigned int>(f.arg);
                if (src >= seg + width) src = i;
                break;
            case kBallot:
                f.result = ballot;
                break;
            case kAny:
                f.result = ballot != 0;
                break;
            case kAll:
                f.result = ballot == lanes_mask;
                break;
            case kSyncWarp:
                f.result = 0;
                break;
        }
        if (is_shuffle(f.op)) {
            if (src >= 32 || ((lanes_mask >> src) & 1u) == 0) {
                return fail_block(
                    w, format("sync: %s at %s by %s reads lane %u, which is not in the mask "
                              "0x%08x (its value is undefined on the GPU)",
                              op_name(f.op), site(f.file, f.line).c_str(), where(f).c_str(), src,
                              lanes_mask));
            }
            f.result = lanes[src].value;
        }
    }
    for (unsigned int i = 0; i < 32; ++i) {
        if ((lanes_mask >> i) & 1u) set_runnable(w, base + i);
    }
    return true;
}

// Called when fiber `f` parks at a warp operation, and when a lane of its warp exits:
// complete the operation if every lane in the mask waits at the same one. Anything
// else is left for diagnose(), which runs once nothing can move: a lane named in the
// mask may still be on its way.
//
// The Programming Guide only asks the non-exited lanes of a mask to take part, and
// __syncwarp and the votes follow it. A shuffle naming a missing or exited lane is
// reported although the guide allows it: the lanes that read from it get undefined
// values, and a full mask over a partial warp is the classic way that happens.
static bool try_warp_op(Worker* w, const Fiber& f) {
    const unsigned int base = f.warp * 32;
    const unsigned int lanes = std::min(32u, w->launch->threads - base);
    unsigned int participants = 0;
    for (unsigned int b = 0; b < 32; ++b) {
        if (((f.mask >> b) & 1u) == 0) continue;
        if (b >= lanes || w->fibers[base + b].wait == kExited) {
            if (is_shuffle(f.op)) return true;
            continue;
        }
        const Fiber& g = w->fibers[base + b];
        if (g.wait != kAtWarpOp || g.op != f.op || g.mask != f.mask || g.size != f.size) {
            return true;
        }
        participants |= 1u << b;
    }
    return complete_warp_op(w, base, participants);
}

// A lane exited: a vote or __syncwarp of its warp may have been waiting only for it.
static bool lane_exited(Worker* w, const Fiber& gone) {
    const unsigned int base = gone.warp * 32;
    const unsigned int lanes = std::min(32u, w->launch->threads - base);
    for (unsigned int l = 0; l < lanes; ++l) {
        const Fiber& f = w->fibers[base + l];
        if (f.wait == kAtWarpOp && !is_shuffle(f.op) && ((f.mask >> gone.lane) & 1u)) {
            if (!try_warp_op(w, f)) return false;
        }
    }
    return true;
}

// Called when the last live thread parks at a block barrier.
static bool release_barrier(Worker* w) {
    const unsigned int n = w->launch->threads;
    const Fiber* first = nullptr;
    for (unsigned int i = 0; i < n && first == nullptr; ++i) {
        if (w->fibers[i].wait == kAtBarrier) first = &w->fibers[i];
    }
    int count = 0;
    for (unsigned int i = 0; i < n; ++i) {
        const Fiber& f = w->fibers[i];
        if (f.line != first->line || f.bar_kind != first->bar_kind ||
            std::strcmp(f.file, first->file) != 0) {
            return fail_block(
                w, format("sync: divergent barrier: %s waits at %s, while %s waits at %s. "
                          "Threads of a block must meet at the same __syncthreads().",
                          where(*first).c_str(), describe_wait(*first).c_str(),
                          where(f).c_str(), describe_wait(f).c_str()));
        }
        count += f.pred;
    }
    int result = 0;
    switch (first->bar_kind) {
        case kBarPlain: result = 0; break;
        case kBarCount: result = count; break;
        case kBarAnd: result = count == static_cast<int>(n); break;
        case kBarOr: result = count != 0; break;
    }
    for (unsigned int i = 0; i < n; ++i) {
        w->fibers[i].bar_result = result;
        set_runnable(w, i);
    }
    w->n_at_barrier = 0;
    return true;
}

// Nothing can run and some thread has not exited: say why it never will.
static bool diagnose(Worker* w) {
    const unsigned int n = w->launch->threads;
    for (unsigned int base = 0; base < n; base += 32) {
        const unsigned int lanes = std::min(32u, n - base);
        for (unsigned int l = 0; l < lanes; ++l) {
            const Fiber& f = w->fibers[base + l];
            if (f.wait != kAtWarpOp) continue;
            for (unsigned int b = 0; b < 32; ++b) {
                if (((f.mask >> b) & 1u) == 0) continue;
                if (!is_shuffle(f.op) && (b >= lanes || w->fibers[base + b].wait == kExited)) {
                    continue;
                }
                if (b >= lanes) {
                    return fail_block(
                        w, format("sync: %s by %s names lane %u of warp %u in mask 0x%08x, "
                                  "but that lane does not exist (the block has %u threads)",
                                  describe_wait(f).c_str(), where(f).c_str(), b, f.warp,
                                  f.mask, n));
                }
                const Fiber& g = w->fibers[base + b];
                if (g.wait == kExited) {
                    return fail_block(
                        w, format("sync: %s by %s names lane %u in its mask, but %s has "
                                  "exited: a shuffle would read undefined values from it",
                                  describe_wait(f).c_str(), where(f).c_str(), b,
                                  where(g).c_str()));
                }
                if (g.wait == kAtBarrier) {
                    return fail_block(
                        w, format("sync: deadlock: %s waits at %s for lane %u, while %s waits "
                                  "at %s",
                                  where(f).c_str(), describe_wait(f).c_str(), b,
                                  where(g).c_str(), describe_wait(g).c_str()));
                }
                if (g.op != f.op || g.mask != f.mask || g.size != f.size) {
                    return fail_block(
                        w, format("sync: mismatched warp operations: %s waits at %s%s, while "
                                  "%s, named in its mask, waits at %s%s",
                                  where(f).c_str(), describe_wait(f).c_str(),
                                  f.size ? format(" on %u-byte values", f.size).c_str() : "",
                                  where(g).c_str(), describe_wait(g).c_str(),
                                  g.size ? format(" on %u-byte values", g.size).c_str() : ""));
                }
            }
        }
    }
    const Fiber* first = nullptr;
    const Fiber* first_exited = nullptr;
    for (unsigned int i = 0; i < n; ++i) {
        const Fiber& f = w->fibers[i];
        if (f.wait == kAtBarrier && first == nullptr) first = &f;
        if (f.wait == kExited && first_exited == nullptr) first_exited = &f;
    }
    if (first != nullptr && first_exited != nullptr) {
        return fail_block(
            w, format("sync: partial barrier: %s reached by %u of %u threads; the other %u "
                      "exited (e.g. %s) and can never arrive. Every thread of the block must "
                      "reach each barrier.",
                      describe_wait(*first).c_str(), w->n_at_barrier, n, w->n_exited,
                      where(*first_exited).c_str()));
    }
    return fail_block(w, "internal: no thread can run, none is misused");
}

static bool run_block(Worker* w) {
    Launch* L = w->launch;
    const unsigned int n = L->threads;
    std::memset(w->runnable, 0, sizeof w->runnable);
    w->n_runnable = 0;
    w->n_at_barrier = 0;
    w->n_exited = 0;
    for (unsigned int i = 0; i < n; ++i) {
        Fiber& f = w->fibers[i];
        f.tid.x = i % L->block.x;
        f.tid.y = (i / L->block.x) % L->block.y;
        f.tid.z = i / (L->block.x * L->block.y);
        f.lane = i % 32;
        f.warp = i / 32;
        init_fiber(w, &f);
        set_runnable(w, i);
    }
    for (;;) {
        const int next = pick(w);
        if (next < 0) {
            if (w->n_exited == n) return true;
            return diagnose(w);
        }
        Fiber& f = w->fibers[static_cast<unsigned int>(next)];
        w->runnable[next >> 6] &= ~(1ull << (next & 63));
        --w->n_runnable;
        resume(w, &f);
        if (w->failed) return false;
        switch (f.wait) {
            case kExited:
                ++w->n_exited;
                if (!lane_exited(w, f)) return false;
                break;
            case kAtBarrier:
                if (++w->n_at_barrier == n && !release_barrier(w)) return false;
                break;
            case kAtWarpOp:
                if (!try_warp_op(w, f)) return false;
                break;
            default:
                break;
        }
    }
}

static void worker_main(Launch* L) {
    Worker w;
    w.launch = L;
    tl_worker = &w;
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    const std::size_t stack = (static_cast<std::size_t>(CUSHIM_STACK_SIZE) + page - 1) / page * page;
    const std::size_t slot = stack + page;  // a PROT_NONE guard page below each stack
    w.region_size = slot * L->threads;
    void* region = mmap(nullptr, w.region_size, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (region == MAP_FAILED) {
        L->fail("launch: cannot map fiber stacks");
        tl_worker = nullptr;
        return;
    }
    w.region = static_cast<char*>(region);
    w.fibers.resize(L->threads);
    for (unsigned int i = 0; i < L->threads; ++i) {
        mprotect(w.region + i * slot, page, PROT_NONE);
        w.fibers[i].stack_lo = w.region + i * slot + page;
        w.fibers[i].stack_size = stack;
    }
    std::size_t capacity = 0;
    unsigned char* smem = static_cast<unsigned char*>(generated_dynamic_smem(&capacity));
    tl_block_dim = L->block;
    tl_grid_dim = L->grid;
    for (;;) {
        if (L->failed.load()) break;
        const unsigned long long b = L->next.fetch_add(1);
        if (b >= L->blocks) break;
        tl_block_idx.x = static_cast<unsigned int>(b % L->grid.x);
        tl_block_idx.y = static_cast<unsigned int>((b / L->grid.x) % L->grid.y);
        tl_block_idx.z = static_cast<unsigned int>(b / (static_cast<unsigned long long>(L->grid.x) * L->grid.y));
        if (smem != nullptr) {
            // Uninitialised shared memory reads back as NaN (all-ones bytes are a NaN
            // in float and double alike); bytes past the launch's size are poisoned.
            const std::size_t used = std::min<std::size_t>(L->smem, capacity);
            std::memset(smem, 0xff, used);
#if defined(CUSHIM_ASAN)
            __asan_unpoison_memory_region(smem, capacity);
            __asan_poison_memory_region(smem + used, capacity - used);
#endif
        }
        w.rng = L->seed ^ (b * 0xd1342543de82ef95ull);
        if (!run_block(&w)) {
            L->fail(w.message + format(" (block (%u,%u,%u))", tl_block_idx.x, tl_block_idx.y,
                                       tl_block_idx.z));
            break;
        }
    }
#if defined(CUSHIM_ASAN)
    if (smem != nullptr) __asan_unpoison_memory_region(smem, capacity);
    __asan_unpoison_memory_region(w.region, w.region_size);
#endif
    munmap(w.region, w.region_size);
    tl_thread = nullptr;
    tl_worker = nullptr;
}

static std::string check_config(const unsigned int* grid, const unsigned int* block,
                                unsigned long long smem) {
    const unsigned long long threads =
        static_cast<unsigned long long>(block[0]) * block[1] * block[2];
    if (block[0] == 0 || block[1] == 0 || block[2] == 0 || block[0] > 1024 ||
        block[1] > 1024 || block[2] > 64 || threads > 1024) {
        return format("launch: block (%u,%u,%u) is beyond the device limits (x, y <= 1024, "
                      "z <= 64, x*y*z <= 1024, none 0)",
                      block[0], block[1], block[2]);
    }
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 2147483647u ||
        grid[1] > 65535 || grid[2] > 65535) {
        return format("launch: grid (%u,%u,%u) is beyond the device limits (x <= 2**31-1, "
                      "y, z <= 65535, none 0)",
                      grid[0], grid[1], grid[2]);
    }
    if (smem > CUSHIM_MAX_DYNAMIC_SMEM) {
        return format("launch: %llu bytes of dynamic shared memory exceed the device limit "
                      "of %d",
                      smem, CUSHIM_MAX_DYNAMIC_SMEM);
    }
    return "";
}

static int launch(int entry_index, const unsigned int* grid, const unsigned int* block,
                  unsigned long long smem, int schedule, unsigned long long seed, int workers,
                  void** args, std::string* error) {
    int count = 0;
    const Entry* entries = generated_entries(&count);
    if (entry_index < 0 || entry_index >= count) {
        *error = format("launch: no kernel #%d in this module", entry_index);
        return 1;
    }
    *error = check_config(grid, block, smem);
    if (!error->empty()) return 1;
    Launch L;
    L.entry = &entries[entry_index];
    L.args = args;
    L.grid = dim3(grid[0], grid[1], grid[2]);
    L.block = dim3(block[0], block[1], block[2]);
    L.smem = smem;
    L.schedule = schedule;
    L.seed = seed;
    L.threads = block[0] * block[1] * block[2];
    L.blocks = static_cast<unsigned long long>(grid[0]) * grid[1] * grid[2];
    const unsigned long long n_workers =
        std::max(1ull, std::min<unsigned long long>(workers > 0 ? workers : 1, L.blocks));
    if (n_workers == 1) {
        worker_main(&L);
    } else {
        std::vector<std::thread> pool;
        for (unsigned long long i = 0; i < n_workers; ++i) pool.emplace_back(worker_main, &L);
        for (auto& t : pool) t.join();
    }
    if (L.failed.load()) {
        *error = L.error;
        return 1;
    }
    return 0;
}

static std::string signature_of(const Entry& entry) {
    char buf[4096];
    entry.signature(buf, sizeof buf);
    return buf;
}

static std::vector<std::string>& signature_cache() {
    static std::vector<std::string> cache;
    if (cache.empty()) {
        int count = 0;
        const Entry* entries = generated_entries(&count);
        for (int i = 0; i < count; ++i) cache.push_back(signature_of(entries[i]));
    }
    return cache;
}

}  // namespace cushim

CUSHIM_EXPORT int cushim_entry_count() {
    int count = 0;
    cushim::generated_entries(&count);
    return count;
}

CUSHIM_EXPORT const char* cushim_entry_name(int i) {
    int count = 0;
    const cushim::Entry* entries = cushim::generated_entries(&count);
    return (i >= 0 && i < count) ? entries[i].name : nullptr;
}

CUSHIM_EXPORT const char* cushim_entry_signature(int i) {
    auto& cache = cushim::signature_cache();
    return (i >= 0 && i < static_cast<int>(cache.size())) ? cache[i].c_str() : nullptr;
}

CUSHIM_EXPORT int cushim_launch(int entry_index, const unsigned int* grid,
                                const unsigned int* block, unsigned long long smem,
                                int schedule, unsigned long long seed, int workers, void** args,
                                char* error, unsigned long long error_len) {
    std::string message;
    const int rc =
        cushim::launch(entry_index, grid, block, smem, schedule, seed, workers, args, &message);
    if (rc != 0 && error != nullptr && error_len > 0) {
        std::snprintf(error, error_len, "%s", message.c_str());
    }
    return rc;
}

#if defined(CUSHIM_MAIN)
// The sanitizer build is an executable: ASan must be loaded first, which a Python
// process that dlopens a library cannot arrange. It reads one launch from a file,
// gives each array its own heap allocation (so ASan's redzones sit right after the
// array's last byte), runs it and writes the arrays back.
//
// Launch file: "CUSHIM01", i32 entry, u32 grid[3], u32 block[3], u64 smem,
// i32 schedule, u64 seed, i32 workers, i32 nargs, then per argument u8 kind
// (0 array, 1 scalar), u64 nbytes, bytes. Output file: the arrays' bytes in order.
#include <fstream>

namespace cushim {
static bool read_exact(std::ifstream& in, void* dst, std::size_t n) {
    in.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
    return static_cast<std::size_t>(in.gcount()) == n;
}
}  // namespace cushim

int main(int argc, char** argv) {
    if (argc == 2 && std::strcmp(argv[1], "--signatures") == 0) {
        int count = 0;
        const cushim::Entry* entries = cushim::generated_entries(&count);
        for (int i = 0; i < count; ++i) {
            std::printf("%s\t%s\n", entries[i].name, cushim::signature_of(entries[i]).c_str());
        }
        return 0;
    }
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s --signatures | LAUNCH_FILE OUTPUT_FILE\n", argv[0]);
        return 2;
    }
    std::ifstream in(argv[1], std::ios::binary);
    char magic[8];
    int entry = 0, schedule = 0, workers = 1, nargs = 0;
    unsigned int grid[3], block[3];
    unsigned long long smem = 0, seed = 0;
    bool ok = in && cushim::read_exact(in, magic, 8) && std::memcmp(magic, "CUSHIM01", 8) == 0 &&
              cushim::read_exact(in, &entry, 4) && cushim::read_exact(in, grid, 12) &&
              cushim::read_exact(in, block, 12) && cushim::read_exact(in, &smem, 8) &&
              cushim::read_exact(in, &schedule, 4) && cushim::read_exact(in, &seed, 8) &&
              cushim::read_exact(in, &workers, 4) && cushim::read_exact(in, &nargs, 4);
    std::vector<unsigned char> kinds;
    std::vector<unsigned long long> sizes;
    std::vector<void*> storage;
    std::vector<void*> args;
    for (int i = 0; ok && i < nargs; ++i) {
        unsigned char kind = 0;
        unsigned long long n = 0;
        ok = cushim::read_exact(in, &kind, 1) && cushim::read_exact(in, &n, 8);
        if (!ok) break;
        void* buf = std::malloc(n);
        if (n > 0 && buf == nullptr) {
            std::fprintf(stderr, "cushim: out of memory\n");
            return 2;
        }
        ok = cushim::read_exact(in, buf, n);
        kinds.push_back(kind);
        sizes.push_back(n);
        storage.push_back(buf);
    }
    if (!ok) {
        std::fprintf(stderr, "cushim: malformed launch file %s\n", argv[1]);
        return 2;
    }
    // An array argument is passed as its address; a scalar as the address of its bytes.
    std::vector<void*> pointers(storage.size());
    for (std::size_t i = 0; i < storage.size(); ++i) {
        if (kinds[i] == 0) {
            pointers[i] = storage[i];
            args.push_back(&pointers[i]);
        } else {
            args.push_back(storage[i]);
        }
    }
    std::string message;
    const int rc = cushim::launch(entry, grid, block, smem, schedule, seed, workers, args.data(),
                                  &message);
    if (rc != 0) {
        std::fprintf(stderr, "cushim-error: %s\n", message.c_str());
        return 3;
    }
    std::ofstream out(argv[2], std::ios::binary);
    for (std::size_t i = 0; i < storage.size(); ++i) {
        if (kinds[i] == 0) out.write(static_cast<const char*>(storage[i]), sizes[i]);
        std::free(storage[i]);
    }
    return out ? 0 : 2;
}
#endif
