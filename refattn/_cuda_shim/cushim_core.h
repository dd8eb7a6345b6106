// cushim_core.h: what the kernel's translation unit and the runtime share.
//
// The runtime (cushim_runtime.cpp) is compiled once per compiler and flags and linked
// with each kernel, so a kernel build compiles only the kernel and these few lines.
// Every name has hidden visibility: several shim libraries (a kernel and its mutants,
// say) are loaded into one process side by side.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#define CUSHIM_HIDDEN __attribute__((visibility("hidden")))

// The largest dynamic shared memory a block may have (sm_90's opt-in limit, 227 KiB).
#ifndef CUSHIM_MAX_DYNAMIC_SMEM
#define CUSHIM_MAX_DYNAMIC_SMEM 232448
#endif

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
        : x(vx), y(vy), z(vz) {}
};

namespace cushim {

struct ThreadState {
    uint3 tid;
    unsigned int lane;
    unsigned int warp;
};

// The fiber running now and its block: set by the scheduler of this OS worker.
extern CUSHIM_HIDDEN thread_local ThreadState* tl_thread;
extern CUSHIM_HIDDEN thread_local uint3 tl_block_idx;
extern CUSHIM_HIDDEN thread_local dim3 tl_block_dim;
extern CUSHIM_HIDDEN thread_local dim3 tl_grid_dim;

enum OpKind : unsigned char {
    kShfl,
    kShflUp,
    kShflDown,
    kShflXor,
    kBallot,
    kAny,
    kAll,
    kSyncWarp,
};

enum BarrierKind : unsigned char { kBarPlain, kBarCount, kBarAnd, kBarOr };

CUSHIM_HIDDEN int block_barrier(BarrierKind kind, int pred, const char* file, int line);
CUSHIM_HIDDEN std::uint64_t warp_op(OpKind op, unsigned int mask, std::uint64_t value,
                                    unsigned int size, int arg, int width, const char* file,
                                    int line);
[[noreturn]] CUSHIM_HIDDEN void kernel_trap(const char* what, const char* file, int line);

// ---------------------------------------------------------------- kernel table
// The generated part of a kernel build defines generated_entries() (one entry per
// kernel, with its C++ signature encoded for the Python side's argument checks) and
// generated_dynamic_smem() (this worker's copy of the extern __shared__ array).
using AnyFn = void (*)();

struct Entry {
    const char* name;
    AnyFn fn;
    void (*invoke)(AnyFn, void**);
    void (*signature)(char* out, std::size_t cap);
};

CUSHIM_HIDDEN const Entry* generated_entries(int* count);
CUSHIM_HIDDEN void* generated_dynamic_smem(std::size_t* capacity);

template <typename T>
struct TypeName {
    static constexpr const char* code = "?";
};
#define CUSHIM_TYPE_NAME(T, c)                   \
    template <>                                  \
    struct TypeName<T> {                         \
        static constexpr const char* code = c;  \
    };
CUSHIM_TYPE_NAME(void, "v")
CUSHIM_TYPE_NAME(bool, "b1")
CUSHIM_TYPE_NAME(char, "i1")
CUSHIM_TYPE_NAME(signed char, "i1")
CUSHIM_TYPE_NAME(unsigned char, "u1")
CUSHIM_TYPE_NAME(short, "i2")
CUSHIM_TYPE_NAME(unsigned short, "u2")
CUSHIM_TYPE_NAME(int, "i4")
CUSHIM_TYPE_NAME(unsigned int, "u4")
CUSHIM_TYPE_NAME(long, "i8")
CUSHIM_TYPE_NAME(unsigned long, "u8")
CUSHIM_TYPE_NAME(long long, "i8")
CUSHIM_TYPE_NAME(unsigned long long, "u8")
CUSHIM_TYPE_NAME(float, "f4")
CUSHIM_TYPE_NAME(double, "f8")
#undef CUSHIM_TYPE_NAME

// "p" / "pc" (pointer to const) + pointee code; "?" for what the shim cannot check.
template <typename T>
static void append_type(char* out, std::size_t cap) {
    auto add = [&](const char* s) {
        std::size_t n = std::strlen(out);
        std::strncat(out, s, cap - n - 1);
    };
    if (std::strlen(out) > 0) add(",");
    if constexpr (std::is_pointer<T>::value) {
        using P = typename std::remove_pointer<T>::type;
        add(std::is_const<P>::value ? "pc" : "p");
        add(TypeName<typename std::remove_cv<P>::type>::code);
    } else {
        add(TypeName<typename std::remove_cv<T>::type>::code);
    }
}

template <typename... A>
struct Invoker {
    template <std::size_t... I>
    static void call(void (*fn)(A...), void** args, std::index_sequence<I...>) {
        fn(*static_cast<typename std::remove_reference<A>::type*>(args[I])...);
    }
    static void run(AnyFn fn, void** args) {
        call(reinterpret_cast<void (*)(A...)>(fn), args, std::index_sequence_for<A...>{});
    }
    static void signature(char* out, std::size_t cap) {
        out[0] = '\0';
        (append_type<A>(out, cap), ...);
    }
};

template <typename... A>
static Entry make_entry(const char* name, void (*fn)(A...)) {
    return Entry{name, reinterpret_cast<AnyFn>(fn), &Invoker<A...>::run,
                 &Invoker<A...>::signature};
}

template <typename T>
static inline std::uint64_t to_bits(T v) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                  "the shim shuffles trivially copyable values of at most 8 bytes");
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    return bits;
}

template <typename T>
static inline T from_bits(std::uint64_t bits) {
    T v;
    std::memcpy(&v, &bits, sizeof(T));
    return v;
}

}  // namespace cushim
