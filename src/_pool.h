/* A caching allocator for the large output arrays and workspaces of fastnorm's CPU kernels
 * (NumPy NEP 49).
 *
 * Returning a fresh multi-megabyte array costs more than the kernel that fills it: the OS maps
 * and zeroes every page on first touch. Blocks of at least FN_POOL_MIN bytes freed by NumPy are
 * kept (up to a byte limit, oldest evicted first) and handed out again for requests of the same
 * or slightly smaller size, so repeated calls reuse resident memory, as a GPU caching allocator
 * does. New pooled blocks are 2 MiB aligned and advised for transparent huge pages (fewer TLB
 * misses when streamed; measured faster than glibc's heap blocks, slower without). Smaller
 * blocks, calloc and realloc go straight to the C library. Thread-safe.
 */
#ifndef FASTNORM_POOL_H
#define FASTNORM_POOL_H
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/mman.h>
#include <numpy/ndarraytypes.h>

#define FN_POOL_MIN (1 << 20)
#define FN_POOL_SLOTS 16

typedef struct { void* p; size_t n; } fn_block;

static fn_block fn_pool[FN_POOL_SLOTS];
static size_t fn_pool_count = 0, fn_pool_bytes = 0, fn_pool_limit = (size_t)512 << 20;
static pthread_mutex_t fn_pool_lock = PTHREAD_MUTEX_INITIALIZER;

static void* fn_pool_malloc(void* ctx, size_t n) {
    (void)ctx;
    if (n >= FN_POOL_MIN) {
        void* p = NULL;
        size_t best = 0;
        pthread_mutex_lock(&fn_pool_lock);
        for (size_t i = 0; i < fn_pool_count; i++) {   /* smallest block that fits, <= 1.25 n */
            size_t m = fn_pool[i].n;
            if (m >= n && m - n <= n / 4 && (p == NULL || m < fn_pool[best].n)) {
                p = fn_pool[i].p;
                best = i;
            }
        }
        if (p) {
            fn_pool_bytes -= fn_pool[best].n;
            memmove(&fn_pool[best], &fn_pool[best + 1], (fn_pool_count - best - 1) * sizeof(fn_block));
            fn_pool_count--;
        }
        pthread_mutex_unlock(&fn_pool_lock);
        if (p)
            return p;
    }
    if (n >= FN_POOL_MIN) {            /* new pooled block: 2 MiB aligned, huge pages if offered */
        void* p = NULL;
        if (posix_memalign(&p, (size_t)1 << 21, n) != 0)
            return NULL;
#ifdef MADV_HUGEPAGE
        madvise(p, (n + ((size_t)1 << 21) - 1) & ~(((size_t)1 << 21) - 1), MADV_HUGEPAGE);
#endif
        return p;
    }
    return malloc(n ? n : 1);
}

static void* fn_pool_calloc(void* ctx, size_t k, size_t n) { (void)ctx; return calloc(k, n); }
static void* fn_pool_realloc(void* ctx, void* p, size_t n) { (void)ctx; return realloc(p, n); }

static void fn_pool_free(void* ctx, void* p, size_t n) {
    /* n is the size NumPy allocated (or last reallocated): the block holds at least n bytes */
    (void)ctx;
    if (p == NULL)
        return;
    if (n >= FN_POOL_MIN) {
        void* evicted[FN_POOL_SLOTS + 1];
        size_t ne = 0;
        int kept = 0;
        pthread_mutex_lock(&fn_pool_lock);
        if (n <= fn_pool_limit) {
            while (fn_pool_count > 0 &&
                   (fn_pool_count == FN_POOL_SLOTS || fn_pool_bytes + n > fn_pool_limit)) {
                evicted[ne++] = fn_pool[0].p;                   /* oldest first */
                fn_pool_bytes -= fn_pool[0].n;
                memmove(&fn_pool[0], &fn_pool[1], (fn_pool_count - 1) * sizeof(fn_block));
                fn_pool_count--;
            }
            fn_pool[fn_pool_count].p = p;
            fn_pool[fn_pool_count].n = n;
            fn_pool_count++;
            fn_pool_bytes += n;
            kept = 1;
        }
        pthread_mutex_unlock(&fn_pool_lock);
        for (size_t i = 0; i < ne; i++)
            free(evicted[i]);
        if (kept)
            return;
    }
    free(p);
}

/* Drop every cached block and set the byte limit (0 disables caching). */
static void fn_pool_configure(size_t limit) {
    fn_block drop[FN_POOL_SLOTS];
    size_t nd;
    pthread_mutex_lock(&fn_pool_lock);
    nd = fn_pool_count;
    memcpy(drop, fn_pool, nd * sizeof(fn_block));
    fn_pool_count = 0;
    fn_pool_bytes = 0;
    fn_pool_limit = limit;
    pthread_mutex_unlock(&fn_pool_lock);
    for (size_t i = 0; i < nd; i++)
        free(drop[i].p);
}

static size_t fn_pool_cached(void) {
    size_t b;
    pthread_mutex_lock(&fn_pool_lock);
    b = fn_pool_bytes;
    pthread_mutex_unlock(&fn_pool_lock);
    return b;
}

static PyDataMem_Handler fn_pool_handler = {
    "fastnorm_output_cache", 1,
    {NULL, fn_pool_malloc, fn_pool_calloc, fn_pool_realloc, fn_pool_free}
};

#endif
