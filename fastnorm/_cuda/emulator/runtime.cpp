// runtime.cpp: the emulator's block executor, included at the end of every generated module.
//
// A launch runs its blocks one at a time on the calling OS thread; every CUDA thread of a block is
// a fiber with its own stack, switched only at barriers and warp-synchronous intrinsics (so the
// threads of a block run in lockstep phases, as far as a correct kernel can tell). The launch
// works on guarded copies of the kernel's buffers: each copy sits against an inaccessible page
// (after it in the first run, before it in the second), keeps the host pointer's address mod 16
// (the launchers choose vector paths from it), and is surrounded by 0xFF canary bytes. A run in
// reverse block and thread order follows; kernels that do no floating-point atomics must give
// bitwise identical buffers both times.
//
// The entry points (extern "C", the only symbols the module exports) are called through ctypes by
// fastnorm/_cuda/emulator/_module.py, which also checks launch limits and argument types against
// the table of kernel parameters made here.
#include "cuda_fp16.h"
#include "cuda_bf16.h"

#include <dlfcn.h>
#include <stdarg.h>
#include <link.h>
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <utility>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define FNEMU_API extern "C" __attribute__((visibility("default")))

namespace fnemu {

uint3 g_threadIdx, g_blockIdx;
dim3 g_blockDim, g_gridDim;

// ---------------------------------------------------------------- kernel table

// parameter kinds (also used for the pointee of pointers)
enum { K_OTHER = 0, K_SIGNED = 1, K_UNSIGNED = 2, K_FLOAT = 3, K_BOOL = 4, K_POINTER = 5,
       K_HALF = 6, K_BFLOAT16 = 7, K_VOID = 8 };

struct Param {
    int kind, size;                      // the parameter itself
    int pointee_kind, pointee_size, pointee_const;
};

template <typename T> constexpr int kind_of() {
    typedef typename std::remove_cv<T>::type U;
    return std::is_void<U>::value                 ? K_VOID
           : std::is_same<U, bool>::value         ? K_BOOL
           : std::is_same<U, __half>::value       ? K_HALF
           : std::is_same<U, __nv_bfloat16>::value ? K_BFLOAT16
           : std::is_floating_point<U>::value     ? K_FLOAT
           : std::is_integral<U>::value           ? (std::is_signed<U>::value ? K_SIGNED
                                                                              : K_UNSIGNED)
           : std::is_pointer<U>::value            ? K_POINTER
                                                  : K_OTHER;
}
template <typename T> constexpr int size_of() {
    typedef typename std::conditional<std::is_void<T>::value, char, T>::type U;
    return std::is_void<T>::value ? 0 : (int)sizeof(U);
}

template <typename P> constexpr Param param_of() {
    typedef typename std::remove_pointer<P>::type E;
    return std::is_pointer<P>::value
               ? Param{K_POINTER, (int)sizeof(P), kind_of<E>(), size_of<E>(),
                       std::is_const<E>::value}
               : Param{kind_of<P>(), (int)sizeof(P), 0, 0, 0};
}

typedef void (*Trampoline)(void** args);
struct KernelEntry {
    const char* name;
    Trampoline call;
    int nparams;
    const Param* params;
    const void* fn;
};

template <auto F> struct Entry;
template <typename... P, void (*F)(P...)>
struct Entry<F> {
    template <size_t... I> static void invoke(void** a, std::index_sequence<I...>) {
        F(*static_cast<P*>(a[I])...);
        (void)a;
    }
    static void call(void** a) { invoke(a, std::index_sequence_for<P...>{}); }
    static KernelEntry make(const char* name) {
        static const Param params[] = {param_of<P>()..., Param{0, 0, 0, 0, 0}};
        return KernelEntry{name, &call, (int)sizeof...(P), params, (const void*)F};
    }
};

// ---------------------------------------------------------------- fibers

#if defined(__x86_64__)
// fnemu_switch(save, to): push the callee-saved registers and the SSE/x87 control words, store
// the stack pointer in *save, continue on stack `to` (popped in the same layout).
extern "C" void fnemu_switch(void** save, void* to);
asm(R"(
    .text
    .p2align 4
    .hidden fnemu_switch
    .type fnemu_switch, @function
fnemu_switch:
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
    .size fnemu_switch, .-fnemu_switch
)");
#endif

enum { READY, WAIT_BLOCK, WAIT_WARP, EXITED };

struct Fiber {
    int state;
    uint3 idx;
    int linear;
#if defined(__x86_64__)
    void* sp;
#else
    ucontext_t ctx;
#endif
    // block barrier
    const char* bfile;
    int bline;
    // warp-synchronous call
    unsigned wmask;
    int wsrc, wpred;
    const char* wwhat;
    unsigned char wval[8], wout[8];
    unsigned wvote;
};

static const size_t STACK_BYTES = 64 << 10;
static size_t g_page;
static char* g_stacks;               // fiber stacks, each below an inaccessible guard page
static size_t g_nstacks;
static Fiber* g_fibers;
static size_t g_nfibers_alloc;
static int g_nthreads;
static Fiber* g_cur;
static const KernelEntry* g_kernel;
static void** g_argv;
#if defined(__x86_64__)
static void* g_sched_sp;
#else
static ucontext_t g_sched_ctx;
#endif

static inline char* stack_of(int i) {
    return g_stacks + (size_t)i * (STACK_BYTES + g_page) + g_page;
}

static void switch_to_scheduler() {
    Fiber* f = g_cur;
#if defined(__x86_64__)
    fnemu_switch(&f->sp, g_sched_sp);
#else
    swapcontext(&f->ctx, &g_sched_ctx);
#endif
}

static void switch_to(Fiber* f) {
    g_cur = f;
    g_threadIdx = f->idx;
#if defined(__x86_64__)
    fnemu_switch(&g_sched_sp, f->sp);
#else
    swapcontext(&g_sched_ctx, &f->ctx);
#endif
}

static void fiber_main() {
    g_kernel->call(g_argv);
    g_cur->state = EXITED;
    switch_to_scheduler();
    abort();                          // an exited fiber is never resumed
}

static void fiber_start(Fiber* f, int i) {
    char* top = stack_of(i) + STACK_BYTES;
#if defined(__x86_64__)
    // frame popped by fnemu_switch: control words, r15..rbp, return address (-> fiber_main,
    // entered with rsp % 16 == 8 as after a call), then a zero "return address" below it
    void** sp = (void**)(top - 16);
    sp[0] = (void*)&fiber_main;
    sp[1] = nullptr;
    sp -= 7;
    for (int k = 1; k < 7; ++k) sp[k] = nullptr;
    unsigned int csr[2];
    asm volatile("stmxcsr %0" : "=m"(csr[0]));
    asm volatile("fnstcw %0" : "=m"(*(unsigned short*)((char*)csr + 4)));
    memcpy(&sp[0], csr, 8);
    f->sp = sp;
#else
    getcontext(&f->ctx);
    f->ctx.uc_stack.ss_sp = stack_of(i);
    f->ctx.uc_stack.ss_size = STACK_BYTES;
    f->ctx.uc_link = nullptr;
    makecontext(&f->ctx, (void (*)())fiber_main, 0);
#endif
}

static bool ensure_fibers(size_t n) {
    if (!g_page) g_page = (size_t)sysconf(_SC_PAGESIZE);
    if (n <= g_nstacks) return true;
    const size_t bytes = n * (STACK_BYTES + g_page);
    char* mem = (char*)mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                            -1, 0);
    if (mem == MAP_FAILED) return false;
    for (size_t i = 0; i < n; ++i) mprotect(mem + i * (STACK_BYTES + g_page), g_page, PROT_NONE);
    Fiber* fibers = (Fiber*)calloc(n, sizeof(Fiber));
    if (!fibers) { munmap(mem, bytes); return false; }
    if (g_stacks) munmap(g_stacks, g_nstacks * (STACK_BYTES + g_page));
    free(g_fibers);
    g_stacks = mem;
    g_nstacks = n;
    g_fibers = fibers;
    g_nfibers_alloc = n;
    return true;
}

// ---------------------------------------------------------------- errors

enum {
    E_OK = 0, E_FAULT = 1, E_DIVERGENCE = 2, E_WARP = 3, E_RACE = 4, E_CANARY = 5,
    E_CONST_WRITE = 6, E_STACK = 7, E_FPE = 8, E_INTERNAL = 9, E_OOB_READ = 10, E_TRAP = 11,
};

struct Result {
    int code;
    int group;               // buffer group of a fault/race/canary, -1 if none
    long long offset;        // byte offset from the group's start (negative: before it)
    int write;               // fault: 1 write, 0 read, -1 unknown
    unsigned block[3], thread[3];
    int have_thread;
    char msg[1024];
};

static Result* g_res;

static void where(Result* r, const Fiber* f) {
    r->block[0] = g_blockIdx.x; r->block[1] = g_blockIdx.y; r->block[2] = g_blockIdx.z;
    if (f) {
        r->thread[0] = f->idx.x; r->thread[1] = f->idx.y; r->thread[2] = f->idx.z;
        r->have_thread = 1;
    }
}

static void fail(int code, const Fiber* f, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void fail(int code, const Fiber* f, const char* fmt, ...) {
    if (g_res->code) return;
    g_res->code = code;
    where(g_res, f);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_res->msg, sizeof(g_res->msg), fmt, ap);
    va_end(ap);
}

// ---------------------------------------------------------------- device-side runtime calls

static bool g_float_atomics;
void note_float_atomic() { g_float_atomics = true; }

// What a launch does, counted in its first (forward) run only: the cost model's inputs
// (fnemu_last_counts). Barriers: __syncthreads() completed by a block (once per block, not per
// thread); warp_syncs: warp-synchronous calls completed by a warp (shuffles, votes, __syncwarp);
// atomics: atomic operations issued by threads.
enum { COUNT_BARRIERS, COUNT_WARP_SYNCS, COUNT_ATOMICS, N_COUNTS };
static long long g_counts[N_COUNTS];
static bool g_counting;
void note_atomic() { if (g_counting) ++g_counts[COUNT_ATOMICS]; }

__attribute__((noinline)) void block_barrier(const char* file, int line) {
    Fiber* f = g_cur;
    f->state = WAIT_BLOCK;
    f->bfile = file;
    f->bline = line;
    switch_to_scheduler();
}

__attribute__((noinline)) void warp_exchange(unsigned mask, const void* value, int src_lane,
                                             void* out, const char* what) {
    Fiber* f = g_cur;
    f->state = WAIT_WARP;
    f->wmask = mask;
    f->wsrc = src_lane;
    f->wwhat = what;
    f->wpred = 0;
    memcpy(f->wval, value, 8);
    switch_to_scheduler();
    memcpy(out, f->wout, 8);
}

__attribute__((noinline)) unsigned warp_vote(unsigned mask, int pred, const char* what) {
    Fiber* f = g_cur;
    f->state = WAIT_WARP;
    f->wmask = mask;
    f->wsrc = -2;
    f->wwhat = what;
    f->wpred = pred != 0;
    switch_to_scheduler();
    return f->wvote;
}

// ---------------------------------------------------------------- the block scheduler

// Release the lanes of warp w whose warp-synchronous call can complete. Returns 1 if any lane
// was released, 0 if none could be, -1 on a misuse (recorded in g_res).
static int release_warp(int w) {
    const int first = w * 32, lanes = g_nthreads - first < 32 ? g_nthreads - first : 32;
    int released = 0;
    for (int l = 0; l < lanes; ++l) {
        Fiber* f = &g_fibers[first + l];
        if (f->state != WAIT_WARP) continue;
        const unsigned mask = f->wmask;
        if (!((mask >> l) & 1u)) {
            fail(E_WARP, f, "%s with mask 0x%08x called by lane %d, which is not in the mask",
                 f->wwhat, mask, l);
            return -1;
        }
        // every lane of the mask must exist and wait at a call of the same kind with this mask
        bool complete = true;
        for (int m = 0; m < 32; ++m) {
            if (!((mask >> m) & 1u)) continue;
            if (m >= lanes) {
                fail(E_WARP, f, "%s with mask 0x%08x names lane %d, which does not exist in a "
                     "block of %d threads (a partial warp)", f->wwhat, mask, m, g_nthreads);
                return -1;
            }
            Fiber* g = &g_fibers[first + m];
            if (g->state == EXITED || g->state == WAIT_BLOCK) {
                fail(E_WARP, f, "%s with mask 0x%08x: lane %d %s", f->wwhat, mask, m,
                     g->state == EXITED ? "has exited" : "waits at __syncthreads() instead");
                return -1;
            }
            if (g->state != WAIT_WARP) { complete = false; continue; }
            if (g->wmask != mask || strcmp(g->wwhat, f->wwhat) != 0) {
                fail(E_WARP, f, "%s with mask 0x%08x met %s with mask 0x%08x in lane %d of the "
                     "same warp", f->wwhat, mask, g->wwhat, g->wmask, m);
                return -1;
            }
        }
        if (!complete) continue;
        unsigned vote = 0;
        for (int m = 0; m < 32; ++m)
            if ((mask >> m) & 1u) vote |= (unsigned)g_fibers[first + m].wpred << m;
        for (int m = 0; m < 32; ++m) {
            if (!((mask >> m) & 1u)) continue;
            Fiber* g = &g_fibers[first + m];
            if (g->wsrc >= 0) {
                const int sl = g->wsrc;
                if (sl < 0 || sl >= 32 || !((mask >> sl) & 1u) || sl >= lanes) {
                    fail(E_WARP, g, "%s in lane %d reads lane %d, which is not in the mask 0x%08x",
                         g->wwhat, m, sl, mask);
                    return -1;
                }
                memcpy(g->wout, g_fibers[first + sl].wval, 8);
            } else if (g->wsrc == -1) {
                memcpy(g->wout, g->wval, 8);
            }
            g->wvote = vote;
        }
        for (int m = 0; m < 32; ++m)
            if ((mask >> m) & 1u) g_fibers[first + m].state = READY;
        if (g_counting) ++g_counts[COUNT_WARP_SYNCS];
        released = 1;
    }
    return released;
}

// Run one block to completion; false on an error (recorded in g_res).
static bool run_block(bool reverse) {
    const int n = g_nthreads;
    for (int i = 0; i < n; ++i) {
        Fiber* f = &g_fibers[i];
        f->state = READY;
        f->linear = i;
        f->idx.x = i % g_blockDim.x;
        f->idx.y = (i / g_blockDim.x) % g_blockDim.y;
        f->idx.z = i / (g_blockDim.x * g_blockDim.y);
        fiber_start(f, i);
    }
    for (;;) {
        for (int k = 0; k < n; ++k) {
            Fiber* f = &g_fibers[reverse ? n - 1 - k : k];
            if (f->state == READY) switch_to(f);
        }
        g_cur = nullptr;
        int exited = 0, at_block = 0, at_warp = 0;
        for (int i = 0; i < n; ++i) {
            const int s = g_fibers[i].state;
            exited += s == EXITED;
            at_block += s == WAIT_BLOCK;
            at_warp += s == WAIT_WARP;
        }
        if (exited == n) return true;
        if (at_warp) {
            int any = 0;
            for (int w = 0; w * 32 < n; ++w) {
                const int r = release_warp(w);
                if (r < 0) return false;
                any |= r;
            }
            if (any) continue;
        }
        if (at_block == n - exited && !at_warp) {
            const Fiber* a = nullptr;
            for (int i = 0; i < n; ++i) {
                const Fiber* f = &g_fibers[i];
                if (f->state != WAIT_BLOCK) continue;
                if (!a) {
                    a = f;
                } else if (f->bline != a->bline || strcmp(f->bfile, a->bfile) != 0) {
                    fail(E_DIVERGENCE, f, "divergent __syncthreads(): thread (%u,%u,%u) waits at "
                         "%s:%d, thread (%u,%u,%u) at %s:%d", a->idx.x, a->idx.y, a->idx.z,
                         a->bfile, a->bline, f->idx.x, f->idx.y, f->idx.z, f->bfile, f->bline);
                    return false;
                }
            }
            if (exited) {
                const Fiber* e = nullptr;
                for (int i = 0; i < n && !e; ++i)
                    if (g_fibers[i].state == EXITED) e = &g_fibers[i];
                fail(E_DIVERGENCE, a, "__syncthreads() at %s:%d is reached by %d threads of the "
                     "block while %d have exited (e.g. thread (%u,%u,%u)): a barrier in divergent "
                     "code", a->bfile, a->bline, at_block, exited, e->idx.x, e->idx.y, e->idx.z);
                return false;
            }
            for (int i = 0; i < n; ++i) g_fibers[i].state = READY;
            if (g_counting) ++g_counts[COUNT_BARRIERS];
            continue;
        }
        // nothing can move: describe one blocked warp call
        for (int i = 0; i < n; ++i) {
            const Fiber* f = &g_fibers[i];
            if (f->state == WAIT_WARP) {
                fail(E_WARP, f, "deadlock: %s with mask 0x%08x in lane %d never completes (lanes "
                     "of the mask wait at __syncthreads() or have exited)", f->wwhat, f->wmask,
                     i & 31);
                return false;
            }
        }
        fail(E_INTERNAL, nullptr, "scheduler: no thread can run");
        return false;
    }
}

// ---------------------------------------------------------------- __shared__ poisoning

thread_local char g_tls_anchor;       // touching it allocates this module's TLS block

struct TlsQuery { void* base; void* data; size_t size; };
static int tls_cb(struct dl_phdr_info* info, size_t, void* p) {
    TlsQuery* q = (TlsQuery*)p;
    if ((void*)info->dlpi_addr != q->base) return 0;
    for (int i = 0; i < info->dlpi_phnum; ++i)
        if (info->dlpi_phdr[i].p_type == PT_TLS) q->size = info->dlpi_phdr[i].p_memsz;
    q->data = info->dlpi_tls_data;
    return 1;
}

// The calling thread's TLS block of this module: all __shared__ variables (and the anchor).
static TlsQuery shared_block() {
    g_tls_anchor = 1;
    Dl_info di;
    TlsQuery q = {nullptr, nullptr, 0};
    if (dladdr((void*)&shared_block, &di)) {
        q.base = di.dli_fbase;
        dl_iterate_phdr(tls_cb, &q);
    }
    return q;
}

// ---------------------------------------------------------------- faults

static sigjmp_buf g_jmp;
static volatile sig_atomic_t g_in_launch;
static void* g_fault_addr;
static int g_fault_sig, g_fault_write;
static Fiber* g_fault_fiber;
static char* g_altstack;

static void on_fault(int sig, siginfo_t* si, void* uc) {
    g_fault_sig = sig;
    g_fault_addr = si->si_addr;
    g_fault_fiber = g_cur;
    g_fault_write = -1;
#if defined(__x86_64__) && defined(REG_ERR)
    g_fault_write = (((ucontext_t*)uc)->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
#else
    (void)uc;
#endif
    siglongjmp(g_jmp, 1);
}

// ---------------------------------------------------------------- buffers

struct GroupDesc {              // from Python: one contiguous host range (overlapping args merged)
    char* host;
    size_t nbytes;
    int writable;               // some argument in it is a non-const pointer
};
struct ArgDesc {
    int group;                  // >= 0: pointer = group copy + offset; -1: scalar bytes; -2: null
    long long offset;
    const void* scalar;
    int scalar_size;
};

struct Region {
    char* map;
    size_t maplen;
    char* lo;                   // accessible bytes [lo, hi)
    char* hi;
    char* start;                // the copy of the group's bytes
    unsigned char canary;       // the value of every other accessible byte
};

// mode 0: the copy ends against the guard page after it; mode 1: it starts just past the one
// before it. Either way start == host (mod 16), so up to 15 bytes of canary may separate the
// copy from a guard page.
static bool region_make(Region* r, const GroupDesc* g, int mode, unsigned char canary) {
    const size_t pages = (g->nbytes + 16 + g_page - 1) / g_page * g_page;
    r->maplen = pages + 2 * g_page;
    r->map = (char*)mmap(nullptr, r->maplen, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r->map == MAP_FAILED) { r->map = nullptr; return false; }
    mprotect(r->map, g_page, PROT_NONE);
    mprotect(r->map + g_page + pages, g_page, PROT_NONE);
    r->lo = r->map + g_page;
    r->hi = r->lo + pages;
    const uintptr_t want = (uintptr_t)g->host & 15u;
    if (mode == 0) {
        char* s = r->hi - g->nbytes;
        s -= ((uintptr_t)s - want) & 15u;
        r->start = s;
    } else {
        r->start = r->lo + want;
    }
    r->canary = canary;
    memset(r->lo, canary, pages);
    memcpy(r->start, g->host, g->nbytes);
    return true;
}

static void region_free(Region* r) {
    if (r->map) munmap(r->map, r->maplen);
    r->map = nullptr;
}

// first byte of the canary area that changed, as an offset from start; false if none
static bool canary_broken(const Region* r, size_t nbytes, long long* off) {
    for (const char* p = r->lo; p < r->start; ++p)
        if ((unsigned char)*p != r->canary) { *off = p - r->start; return true; }
    for (const char* p = r->start + nbytes; p < r->hi; ++p)
        if ((unsigned char)*p != r->canary) { *off = p - r->start; return true; }
    return false;
}

// ---------------------------------------------------------------- one run of the grid

static Region* g_regions;
static int g_ngroups;

// Which group's pages hold (or guard) address a: the offset from its copy's start.
static int locate(const void* a, long long* off) {
    for (int i = 0; i < g_ngroups; ++i) {
        const Region* r = &g_regions[i];
        if (!r->map) continue;
        if ((const char*)a >= r->map && (const char*)a < r->map + r->maplen) {
            *off = (const char*)a - r->start;
            return i;
        }
    }
    return -1;
}

static int run_grid_protected(bool reverse) {
    struct sigaction sa, old_segv, old_bus, old_fpe, old_ill;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    stack_t ss, old_ss;
    ss.ss_sp = g_altstack;
    ss.ss_size = 256 << 10;
    ss.ss_flags = 0;
    sigaltstack(&ss, &old_ss);
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);
    sigaction(SIGFPE, &sa, &old_fpe);
    sigaction(SIGILL, &sa, &old_ill);
    int faulted = 0;
    const TlsQuery shared = shared_block();
    if (sigsetjmp(g_jmp, 1) == 0) {
        const unsigned long long nb = (unsigned long long)g_gridDim.x * g_gridDim.y * g_gridDim.z;
        for (unsigned long long k = 0; k < nb; ++k) {
            const unsigned long long b = reverse ? nb - 1 - k : k;
            g_blockIdx.x = (unsigned)(b % g_gridDim.x);
            g_blockIdx.y = (unsigned)((b / g_gridDim.x) % g_gridDim.y);
            g_blockIdx.z = (unsigned)(b / ((unsigned long long)g_gridDim.x * g_gridDim.y));
            if (shared.data) memset(shared.data, 0xFF, shared.size);
            if (!run_block(reverse)) break;
        }
    } else {
        faulted = 1;
    }
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    sigaction(SIGFPE, &old_fpe, nullptr);
    sigaction(SIGILL, &old_ill, nullptr);
    sigaltstack(&old_ss, nullptr);
    return faulted;
}

static void report_fault() {
    Fiber* f = g_fault_fiber;
    if (g_fault_sig == SIGFPE) {
        fail(E_FPE, f, "arithmetic exception (integer division by zero or overflow)");
        return;
    }
    if (g_fault_sig == SIGILL) {       // the alignment check's trap (or __trap())
        fail(E_TRAP, f, "misaligned address: a load or store of a type at an address that is "
             "not a multiple of its alignment (e.g. a 16-byte vector access; the device faults) "
             "-- or __trap()");
        return;
    }
    for (size_t i = 0; f && i < g_nstacks; ++i) {
        const char* guard = g_stacks + i * (STACK_BYTES + g_page);
        if ((char*)g_fault_addr >= guard && (char*)g_fault_addr < guard + g_page) {
            fail(E_STACK, f, "stack overflow (%zu KiB per thread)", STACK_BYTES >> 10);
            return;
        }
    }
    long long off = 0;
    const int grp = locate(g_fault_addr, &off);
    const char* what = g_fault_write == 1 ? "write" : g_fault_write == 0 ? "read" : "access";
    fail(E_FAULT, f, "invalid %s of address %p", what, g_fault_addr);
    g_res->group = grp;
    g_res->offset = off;
    g_res->write = g_fault_write;
}

}  // namespace fnemu

// ---------------------------------------------------------------- the module's entry points

extern const fnemu::KernelEntry fnemu_kernels[];
extern const int fnemu_num_kernels;

FNEMU_API int fnemu_kernel_count() { return fnemu_num_kernels; }
FNEMU_API const char* fnemu_kernel_name(int k) { return fnemu_kernels[k].name; }
FNEMU_API int fnemu_kernel_nparams(int k) { return fnemu_kernels[k].nparams; }
FNEMU_API void fnemu_kernel_param(int k, int i, int out[5]) {
    const fnemu::Param& p = fnemu_kernels[k].params[i];
    out[0] = p.kind; out[1] = p.size; out[2] = p.pointee_kind; out[3] = p.pointee_size;
    out[4] = p.pointee_const;
}
// offset of the kernel's code from the module's load address (to find its symbol with nm)
FNEMU_API long long fnemu_kernel_offset(int k) {
    Dl_info di;
    if (!dladdr(fnemu_kernels[k].fn, &di)) return -1;
    return (const char*)fnemu_kernels[k].fn - (const char*)di.dli_fbase;
}
FNEMU_API int fnemu_result_size() { return (int)sizeof(fnemu::Result); }
// the counts of the last launch's first run: barriers, warp syncs, atomics (see g_counts)
FNEMU_API void fnemu_last_counts(long long out[3]) {
    for (int i = 0; i < fnemu::N_COUNTS; ++i) out[i] = fnemu::g_counts[i];
}

// One run of the grid on fresh guarded copies of the groups: copy placement `mode`, canary
// byte `canary`, blocks and threads in reverse order if `reverse`. Checks the canaries and the
// const groups; `out[g]` receives writable group g's bytes.
static void run_pass(int mode, unsigned char canary, bool reverse, int nargs,
                     const fnemu::ArgDesc* args, int ngroups, const fnemu::GroupDesc* groups,
                     unsigned char** out) {
    using namespace fnemu;
    struct alignas(16) Slot { unsigned char b[16]; };
    Slot* slots = (Slot*)calloc(nargs ? nargs : 1, sizeof(Slot));
    for (int g = 0; g < ngroups && !g_res->code; ++g)
        if (!region_make(&g_regions[g], &groups[g], mode, canary))
            fail(E_INTERNAL, nullptr, "out of memory (buffer copies)");
    for (int a = 0; a < nargs && !g_res->code; ++a) {
        g_argv[a] = &slots[a];
        void* p = nullptr;
        if (args[a].group >= 0) {
            p = g_regions[args[a].group].start + args[a].offset;
            memcpy(&slots[a], &p, sizeof p);
        } else if (args[a].group == -2) {
            memcpy(&slots[a], &p, sizeof p);                 // NULL, as CuPy passes it
        } else {
            memcpy(&slots[a], args[a].scalar, (size_t)args[a].scalar_size);
        }
    }
    if (!g_res->code && run_grid_protected(reverse)) report_fault();
    for (int g = 0; g < ngroups && !g_res->code; ++g) {
        long long off;
        const Region* r = &g_regions[g];
        if (canary_broken(r, groups[g].nbytes, &off)) {
            fail(E_CANARY, nullptr, "write outside the buffer (canary bytes changed)");
            g_res->group = g;
            g_res->offset = off;
        } else if (!groups[g].writable && memcmp(r->start, groups[g].host, groups[g].nbytes)) {
            size_t i = 0;
            while (r->start[i] == groups[g].host[i]) ++i;
            fail(E_CONST_WRITE, nullptr, "write to a buffer passed only as const pointers");
            g_res->group = g;
            g_res->offset = (long long)i;
        } else if (groups[g].writable) {
            memcpy(out[g], r->start, groups[g].nbytes);
        }
    }
    for (int g = 0; g < ngroups; ++g) region_free(&g_regions[g]);
    free(slots);
}

// first writable group where runs a and b differ (and the byte offset); -1 if none
static int differs(int ngroups, const fnemu::GroupDesc* groups, unsigned char** a,
                   unsigned char** b, long long* off) {
    for (int g = 0; g < ngroups; ++g) {
        if (!groups[g].writable || !memcmp(a[g], b[g], groups[g].nbytes)) continue;
        size_t i = 0;
        while (a[g][i] == b[g][i]) ++i;
        *off = (long long)i;
        return g;
    }
    return -1;
}

// Launch kernel k on (grid, block): a first run, forward, on copies that end against a guard page
// (canary 0xFF). With `check_races`, a second run in reverse block and thread order on copies
// that start just past a guard page (canary 0x7F); unless the kernel did floating-point atomics
// (*float_atomics), the writable groups must come out bitwise identical. If they do not, a third
// run, forward with the second run's canaries, tells an out-of-bounds read of canary bytes
// (third == second) from a race. Writable groups are copied back to the host from the first run.
// Returns the error code (0: success); details in *res.
FNEMU_API int fnemu_launch(int k, const unsigned grid[3], const unsigned block[3], int nargs,
                           const fnemu::ArgDesc* args, int ngroups, const fnemu::GroupDesc* groups,
                           int check_races, int* float_atomics, fnemu::Result* res) {
    using namespace fnemu;
    memset(res, 0, sizeof *res);
    res->group = -1;
    g_res = res;
    g_kernel = &fnemu_kernels[k];
    g_gridDim = dim3(grid[0], grid[1], grid[2]);
    g_blockDim = dim3(block[0], block[1], block[2]);
    g_nthreads = (int)(block[0] * block[1] * block[2]);
    *float_atomics = 0;
    if (!ensure_fibers((size_t)g_nthreads)) {
        fail(E_INTERNAL, nullptr, "out of memory (fiber stacks)");
        return res->code;
    }
    if (!g_altstack) g_altstack = (char*)malloc(256 << 10);
    g_float_atomics = false;
    g_argv = (void**)calloc(nargs ? nargs : 1, sizeof(void*));
    g_regions = (Region*)calloc(ngroups ? ngroups : 1, sizeof(Region));
    g_ngroups = ngroups;
    unsigned char** runs[3];
    for (int r = 0; r < 3; ++r) {
        runs[r] = (unsigned char**)calloc(ngroups ? ngroups : 1, sizeof(char*));
        for (int g = 0; g < ngroups; ++g)
            if (groups[g].writable)
                runs[r][g] = (unsigned char*)malloc(groups[g].nbytes ? groups[g].nbytes : 1);
    }
    memset(g_counts, 0, sizeof g_counts);
    g_counting = true;
    run_pass(0, 0xFF, false, nargs, args, ngroups, groups, runs[0]);
    g_counting = false;
    if (check_races && !res->code) {
        run_pass(1, 0x7F, true, nargs, args, ngroups, groups, runs[1]);
        long long off = 0;
        const int g = res->code || g_float_atomics
                          ? -1 : differs(ngroups, groups, runs[0], runs[1], &off);
        if (g >= 0) {
            run_pass(0, 0x7F, false, nargs, args, ngroups, groups, runs[2]);
            long long off2 = 0;
            if (!res->code && differs(ngroups, groups, runs[0], runs[2], &off2) >= 0) {
                fail(E_OOB_READ, nullptr, "the result depends on the bytes just outside a buffer "
                     "(an out-of-bounds read within 16 bytes of an end): runs with different "
                     "canary bytes differ");
            } else if (!res->code) {
                fail(E_RACE, nullptr, "the result depends on the order of blocks/threads (a "
                     "race): a second run in reverse order differs");
            }
            res->group = g;
            res->offset = off;
        }
    }
    if (!res->code)
        for (int g = 0; g < ngroups; ++g)
            if (groups[g].writable) memcpy(groups[g].host, runs[0][g], groups[g].nbytes);
    *float_atomics = g_float_atomics;
    for (int r = 0; r < 3; ++r) {
        for (int g = 0; g < ngroups; ++g) free(runs[r][g]);
        free(runs[r]);
    }
    free(g_regions);
    free(g_argv);
    g_regions = nullptr;
    g_argv = nullptr;
    g_ngroups = 0;
    return res->code;
}
