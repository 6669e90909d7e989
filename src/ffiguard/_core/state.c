/* Per-thread guard state: made on a thread's first guarded call, freed when the
 * thread exits. Each thread also gets an alternate signal stack, so that a stack
 * overflow in foreign code still reaches the handler.
 */
#define _GNU_SOURCE 1
#include "state.h"

#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <unistd.h>

__thread struct ffg_thread *ffg_tls __attribute__((tls_model("initial-exec")));

#ifndef FFG_NO_ARCH
/* The thunk reads these fields at fixed offsets. */
_Static_assert(offsetof(struct ffg_thread, top) == 0, "T_TOP");
_Static_assert(offsetof(struct ffg_thread, end) == 8, "T_END");
_Static_assert(offsetof(struct ffg_thread, armed) == 16, "T_ARMED");
_Static_assert(offsetof(struct ffg_thread, armed_token) == 24, "T_TOKEN");
_Static_assert(offsetof(struct ffg_thread, armed_host) == 32, "T_HOST");
_Static_assert(offsetof(struct ffg_frame, host) == F_HOST, "F_HOST");
_Static_assert(sizeof(struct ffg_frame) == FRAME_SIZE, "FRAME_SIZE");
_Static_assert(offsetof(struct ffg_frame, sp) == F_SP, "F_SP");
_Static_assert(offsetof(struct ffg_frame, target) == F_TARGET, "F_TARGET");
_Static_assert(offsetof(struct ffg_frame, token) == F_TOKEN, "F_TOKEN");
#endif

#define ALTSTACK_MIN (128 * 1024) /* the unwinder needs a few KiB; pages are touched lazily */

static pthread_key_t ffg_thread_key;

static size_t ffg_page_size(void) { return (size_t)sysconf(_SC_PAGESIZE); }

static size_t ffg_round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

static size_t ffg_altstack_size(void)
{
    size_t size = ALTSTACK_MIN;
#ifdef AT_MINSIGSTKSZ
    size_t kernel_min = (size_t)getauxval(AT_MINSIGSTKSZ); /* grows with AVX-512, AMX, SVE */
    if (kernel_min * 4 > size)
        size = kernel_min * 4;
#endif
    return ffg_round_up(size, ffg_page_size());
}

/* Runs at thread exit (pthread key destructor): give back the alternate stack first,
 * so no signal can land on memory about to be unmapped. */
static void ffg_thread_detach(void *p)
{
    struct ffg_thread *t = p;
    ffg_tls = NULL;
    ffg_intr_thread_exit(t); /* interrupt (issue 16): its timer */
    if (t->owns_altstack) {
        stack_t none = {.ss_flags = SS_DISABLE};
        sigaltstack(t->previous_altstack.ss_flags & SS_DISABLE ? &none : &t->previous_altstack, NULL);
    }
    munmap(t, t->mapping_size);
}

static void ffg_record_stack_bounds(struct ffg_thread *t)
{
    pthread_attr_t attr;
    void *lo;
    size_t size;
    if (pthread_getattr_np(pthread_self(), &attr) != 0)
        return;
    if (pthread_attr_getstack(&attr, &lo, &size) == 0) {
        t->stack_lo = (uintptr_t)lo;
        t->stack_hi = (uintptr_t)lo + size;
    }
    pthread_attr_destroy(&attr);
}

/* Layout of one mapping: [struct ffg_thread][guard page][alternate signal stack]. */
struct ffg_thread *ffg_thread_attach(void)
{
    size_t page = ffg_page_size();
    size_t head = ffg_round_up(sizeof(struct ffg_thread), page);
    size_t alt = ffg_altstack_size();
    size_t total = head + page + alt;
    char *base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        return NULL;
    mprotect(base + head, page, PROT_NONE); /* an overflow of the handler's stack faults */

    struct ffg_thread *t = (struct ffg_thread *)base;
    t->mapping_size = total;
    t->frames[0].token = FFG_SENTINEL_TOKEN;
    t->top = t->frames + 1;
    t->end = t->frames + 1 + FFG_MAX_FRAMES;
    pthread_sigmask(SIG_SETMASK, NULL, &t->host_mask);
    ffg_record_stack_bounds(t);

    stack_t current;
    if (sigaltstack(NULL, &current) == 0 &&
        ((current.ss_flags & SS_DISABLE) || current.ss_size < alt)) {
        stack_t ours = {.ss_sp = base + head + page, .ss_size = alt, .ss_flags = 0};
        if (sigaltstack(&ours, NULL) == 0) {
            t->previous_altstack = current;
            t->owns_altstack = 1;
        }
    }
    if (pthread_setspecific(ffg_thread_key, t) != 0) {
        int saved = errno;
        ffg_thread_detach(t);
        errno = saved;
        return NULL;
    }
    ffg_tls = t;
    return t;
}

int ffg_state_init(void)
{
    int err = pthread_key_create(&ffg_thread_key, ffg_thread_detach);
    if (err) {
        errno = err;
        return -1;
    }
    return 0;
}

int ffg_note_mask(void)
{
    struct ffg_thread *t = ffg_tls;
    return t ? pthread_sigmask(SIG_SETMASK, NULL, &t->host_mask) : 0;
}
