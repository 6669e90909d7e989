/* The native backtrace of a fault: our own DWARF CFI unwinder, for the signal handler.
 *
 * EVERYTHING IN THIS FILE RUNS IN THE SIGNAL HANDLER AND IS ASYNC-SIGNAL-SAFE: no malloc,
 * no stdio, no locks, no Python API. It calls one function outside this file,
 * glibc's _dl_find_object (>= 2.35: lock-free and async-signal-safe, made for exactly
 * this), and otherwise only reads memory it has checked first.
 *
 * Why not libgcc's _Unwind_Backtrace: once any unwind table was registered at run time
 * (__register_frame: LLVM/llvmlite, wasm engines, LuaJIT), libgcc looks every pc up
 * under a mutex. A fault inside libgcc escaped with siglongjmp leaves that mutex held
 * and the next fault deadlocks in the handler; a fault while the same thread is inside
 * libgcc's unwinder (a C++ throw) deadlocks at once. (libgcc up to GCC 12, as in Debian
 * 12; GCC 13 made lookups of registered frames lock-free.) This unwinder holds no lock.
 *
 * How a step works:
 *   1. _dl_find_object(pc) gives the ELF object containing pc, its mapping and its
 *      PT_GNU_EH_FRAME segment (.eh_frame_hdr). Frames registered only at run time (JIT
 *      code, in no ELF object) are not found: the walk ends there. It does not go on by
 *      frame pointer: JIT code need not keep one, and a wrong guess would invent frames.
 *   2. Binary search of .eh_frame_hdr's sorted table (datarel sdata4 pairs, what GNU ld,
 *      gold and lld write) for the FDE; pc must lie in its [pc_begin, pc_begin+range).
 *   3. Parse its CIE and run the CIE's and the FDE's CFA programs up to pc (the faulting
 *      instruction itself for the first frame, pc - 1 for a return address: the call).
 *   4. CFA = register + offset; each saved register (and the return address) is read
 *      from the stack. The caller's stack pointer is the CFA.
 *
 * Every read of unwind data is checked against the object's mapping, every stack read
 * against [lo, hi) given by the caller (from the fault's sp minus the red zone to the
 * guard frame's sp, intersected with the thread's stack): corrupt data or a corrupt
 * stack ends the walk instead of faulting. The walk ends at the guard thunk (the
 * return address is the thunk's: the foreign frames are done), at an undefined or zero
 * return address, at a rule this unwinder does not evaluate (DWARF expressions: PLT
 * entries, signal trampolines), when the stack pointer goes down or does not move,
 * or after max frames.
 *
 * Without _dl_find_object (glibc < 2.35, looked up with dlsym at load time) no object
 * can be found safely (dl_iterate_phdr takes the loader's lock): the backtrace is the
 * pc alone, plus a bad call's return address.
 */
#define _GNU_SOURCE 1
#include "state.h"

#include <dlfcn.h>
#include <string.h>

#ifndef FFG_NO_ARCH

/* Our own copy of glibc's struct dl_find_object (glibc 2.35+, <dlfcn.h>), so that the
 * core builds against older headers too; the layout is glibc's ABI. */
struct ffg_dl_find_object {
    unsigned long long flags;
    void *map_start;
    void *map_end;
    void *link_map;
    void *eh_frame; /* the PT_GNU_EH_FRAME segment: .eh_frame_hdr */
    unsigned long long reserved[7];
};
typedef int (*ffg_find_object_fn)(void *address, struct ffg_dl_find_object *result);

/* Set once at load (normal context), read in the handler. NULL: glibc < 2.35. */
static ffg_find_object_fn ffg_find_object;

/* Normal context: at load, and from the tests' switch. */
static ffg_find_object_fn ffg_lookup_find_object(void)
{
    return (ffg_find_object_fn)dlsym(RTLD_DEFAULT, "_dl_find_object");
}

__attribute__((constructor)) static void ffg_unwind_init(void)
{
    __atomic_store_n(&ffg_find_object, ffg_lookup_find_object(), __ATOMIC_RELEASE);
}

int ffg_unwind_available(void) { return __atomic_load_n(&ffg_find_object, __ATOMIC_ACQUIRE) != NULL; }

/* For the tests: behave as on a glibc without _dl_find_object (0), or not (1). */
void ffg_unwind_set_available(int on)
{
    __atomic_store_n(&ffg_find_object, on ? ffg_lookup_find_object() : NULL, __ATOMIC_RELEASE);
}

/* DWARF pointer encodings (DW_EH_PE_*) */
#define PE_OMIT 0xff
#define PE_FORMAT_MASK 0x0f
#define PE_ABSPTR 0x00
#define PE_ULEB128 0x01
#define PE_UDATA2 0x02
#define PE_UDATA4 0x03
#define PE_UDATA8 0x04
#define PE_SLEB128 0x09
#define PE_SDATA2 0x0a
#define PE_SDATA4 0x0b
#define PE_SDATA8 0x0c
#define PE_APPL_MASK 0x70
#define PE_PCREL 0x10
#define PE_DATAREL 0x30
#define PE_INDIRECT 0x80
#define HDR_VERSION 1
#define HDR_TABLE_ENC (PE_DATAREL | PE_SDATA4) /* the only table encoding linkers write */

/* Call frame instructions (DW_CFA_*) */
#define CFA_HIGH_MASK 0xc0
#define CFA_LOW_MASK 0x3f
#define CFA_ADVANCE_LOC 0x40
#define CFA_OFFSET 0x80
#define CFA_RESTORE 0xc0
#define CFA_NOP 0x00
#define CFA_SET_LOC 0x01
#define CFA_ADVANCE_LOC1 0x02
#define CFA_ADVANCE_LOC2 0x03
#define CFA_ADVANCE_LOC4 0x04
#define CFA_OFFSET_EXTENDED 0x05
#define CFA_RESTORE_EXTENDED 0x06
#define CFA_UNDEFINED 0x07
#define CFA_SAME_VALUE 0x08
#define CFA_REGISTER 0x09
#define CFA_REMEMBER_STATE 0x0a
#define CFA_RESTORE_STATE 0x0b
#define CFA_DEF_CFA 0x0c
#define CFA_DEF_CFA_REGISTER 0x0d
#define CFA_DEF_CFA_OFFSET 0x0e
#define CFA_DEF_CFA_EXPRESSION 0x0f
#define CFA_EXPRESSION 0x10
#define CFA_OFFSET_EXTENDED_SF 0x11
#define CFA_DEF_CFA_SF 0x12
#define CFA_DEF_CFA_OFFSET_SF 0x13
#define CFA_VAL_OFFSET 0x14
#define CFA_VAL_OFFSET_SF 0x15
#define CFA_VAL_EXPRESSION 0x16
#define CFA_NEGATE_RA_STATE 0x2d /* AArch64 (SPARC: GNU_window_save); no operands */
#define CFA_GNU_ARGS_SIZE 0x2e
#define CFA_GNU_NEGATIVE_OFFSET_EXTENDED 0x2f

#define CIE_ID 0           /* a CIE's id field in .eh_frame */
#define LENGTH_64BIT 0xffffffffu /* the 64-bit DWARF format's escape */
#define REMEMBER_DEPTH 8  /* DW_CFA_remember_state nesting kept; deeper ends the walk */
#define ULEB_MAX_BYTES 10 /* a 64-bit LEB128 value */
#define LEB_BITS 7
#define LEB_MORE 0x80
#define LEB_SIGN 0x40

/* ---- bounded reads -------------------------------------------------------------------- */

struct ffg_cursor {
    const unsigned char *p, *end; /* read only below end */
    int bad;                      /* a read went past end or met a malformed value */
};

static uint64_t ffg_rd_fixed(struct ffg_cursor *c, size_t n)
{
    if (c->bad || c->p > c->end || (size_t)(c->end - c->p) < n) {
        c->bad = 1;
        return 0;
    }
    uint64_t v = 0;
    if (n == sizeof(uint8_t)) {
        v = *c->p;
    } else if (n == sizeof(uint16_t)) {
        uint16_t x;
        memcpy(&x, c->p, n);
        v = x;
    } else if (n == sizeof(uint32_t)) {
        uint32_t x;
        memcpy(&x, c->p, n);
        v = x;
    } else {
        memcpy(&v, c->p, sizeof v);
    }
    c->p += n;
    return v;
}

static uint64_t ffg_rd_uleb(struct ffg_cursor *c)
{
    uint64_t v = 0;
    for (int i = 0; i < ULEB_MAX_BYTES; i++) {
        unsigned b = (unsigned)ffg_rd_fixed(c, 1);
        v |= (uint64_t)(b & ~LEB_MORE & 0xff) << (LEB_BITS * i);
        if (!(b & LEB_MORE))
            return v;
    }
    c->bad = 1;
    return 0;
}

static int64_t ffg_rd_sleb(struct ffg_cursor *c)
{
    uint64_t v = 0;
    unsigned shift = 0;
    for (int i = 0; i < ULEB_MAX_BYTES; i++) {
        unsigned b = (unsigned)ffg_rd_fixed(c, 1);
        v |= (uint64_t)(b & ~LEB_MORE & 0xff) << shift;
        shift += LEB_BITS;
        if (!(b & LEB_MORE)) {
            if (shift < 64 && (b & LEB_SIGN))
                v |= ~(uint64_t)0 << shift;
            return (int64_t)v;
        }
    }
    c->bad = 1;
    return 0;
}

/* A pointer in encoding enc. Indirect pointers are not followed (only a personality
 * routine uses them, and its value is not needed): they read as 0. */
static uintptr_t ffg_rd_encoded(struct ffg_cursor *c, unsigned enc, uintptr_t datarel_base)
{
    if (enc == PE_OMIT)
        return 0;
    uintptr_t here = (uintptr_t)c->p;
    uint64_t v;
    switch (enc & PE_FORMAT_MASK) {
    case PE_ABSPTR:
    case PE_UDATA8:
    case PE_SDATA8:
        v = ffg_rd_fixed(c, sizeof(uint64_t));
        break;
    case PE_ULEB128:
        v = ffg_rd_uleb(c);
        break;
    case PE_SLEB128:
        v = (uint64_t)ffg_rd_sleb(c);
        break;
    case PE_UDATA2:
        v = ffg_rd_fixed(c, sizeof(uint16_t));
        break;
    case PE_SDATA2:
        v = (uint64_t)(int64_t)(int16_t)ffg_rd_fixed(c, sizeof(uint16_t));
        break;
    case PE_UDATA4:
        v = ffg_rd_fixed(c, sizeof(uint32_t));
        break;
    case PE_SDATA4:
        v = (uint64_t)(int64_t)(int32_t)ffg_rd_fixed(c, sizeof(uint32_t));
        break;
    default:
        c->bad = 1;
        return 0;
    }
    switch (enc & PE_APPL_MASK) {
    case 0:
        break;
    case PE_PCREL:
        v += here;
        break;
    case PE_DATAREL:
        v += datarel_base;
        break;
    default: /* textrel, funcrel, aligned: not used in .eh_frame on Linux */
        c->bad = 1;
        return 0;
    }
    return (enc & PE_INDIRECT) ? 0 : (uintptr_t)v;
}

/* A stack read: inside [lo, hi) and aligned, or the walk ends. It reads other frames'
 * slots on purpose (saved registers, perhaps inside AddressSanitizer's red zones):
 * exempt from ASan's checks (tools/sanitize builds the core with it). */
struct ffg_stack {
    uintptr_t lo, hi;
};

FFG_UNCHECKED_READ static int ffg_rd_stack(const struct ffg_stack *s, uintptr_t addr, uintptr_t *out)
{
    if (addr < s->lo || addr > s->hi || s->hi - addr < sizeof(uintptr_t) || (addr % sizeof(uintptr_t)))
        return 0;
    *out = *(const volatile uintptr_t *)addr;
    return 1;
}

/* ---- finding the FDE -------------------------------------------------------------------- */

struct ffg_fde {
    const unsigned char *insns, *insns_end; /* the FDE's CFA program */
    const unsigned char *cie_insns, *cie_insns_end;
    uintptr_t pc_begin, pc_end;
    uint64_t code_align;
    int64_t data_align;
    uint64_t ra_column;
    unsigned fde_enc;
    uintptr_t map_start, map_end;
};

/* One CIE or FDE record starting at p: its body [*body, *end), or 0. */
static int ffg_record(const unsigned char *p, uintptr_t map_start, uintptr_t map_end,
                      const unsigned char **body, const unsigned char **end)
{
    struct ffg_cursor c = {p, (const unsigned char *)map_end, (uintptr_t)p < map_start};
    uint64_t length = ffg_rd_fixed(&c, sizeof(uint32_t));
    if (length == LENGTH_64BIT)
        length = ffg_rd_fixed(&c, sizeof(uint64_t));
    if (c.bad || length == 0 || length > (uint64_t)(c.end - c.p))
        return 0;
    *body = c.p;
    *end = c.p + length;
    return 1;
}

static int ffg_parse_cie(const unsigned char *cie, struct ffg_fde *f, int *has_z)
{
    const unsigned char *body, *end;
    if (!ffg_record(cie, f->map_start, f->map_end, &body, &end))
        return 0;
    struct ffg_cursor c = {body, end, 0};
    if (ffg_rd_fixed(&c, sizeof(uint32_t)) != CIE_ID)
        return 0;
    unsigned version = (unsigned)ffg_rd_fixed(&c, 1);
    const char *aug = (const char *)c.p;
    while (!c.bad && ffg_rd_fixed(&c, 1) != 0)
        ;
    if (c.bad)
        return 0; /* no terminated augmentation string inside the object */
    f->code_align = ffg_rd_uleb(&c);
    f->data_align = ffg_rd_sleb(&c);
    f->ra_column = version == 1 ? ffg_rd_fixed(&c, 1) : ffg_rd_uleb(&c);
    f->fde_enc = PE_ABSPTR;
    *has_z = aug[0] == 'z';
    if (*has_z) {
        uint64_t aug_len = ffg_rd_uleb(&c);
        if (c.bad || aug_len > (uint64_t)(c.end - c.p))
            return 0;
        const unsigned char *aug_end = c.p + aug_len;
        for (const char *a = aug + 1; *a && !c.bad; a++) {
            if (*a == 'R') {
                f->fde_enc = (unsigned)ffg_rd_fixed(&c, 1);
            } else if (*a == 'L') {
                ffg_rd_fixed(&c, 1);
            } else if (*a == 'P') {
                unsigned enc = (unsigned)ffg_rd_fixed(&c, 1);
                ffg_rd_encoded(&c, enc, 0);
            } else if (*a != 'S' && *a != 'B' && *a != 'G') {
                break; /* unknown letter: the length lets us skip the rest */
            }
        }
        c.p = aug_end;
    } else if (aug[0] != '\0') {
        return 0; /* an augmentation we cannot skip */
    }
    if (c.bad || f->code_align == 0)
        return 0;
    f->cie_insns = c.p;
    f->cie_insns_end = end;
    return 1;
}

static int ffg_parse_fde(const unsigned char *fde, struct ffg_fde *f)
{
    const unsigned char *body, *end;
    if (!ffg_record(fde, f->map_start, f->map_end, &body, &end))
        return 0;
    struct ffg_cursor c = {body, end, 0};
    uint32_t cie_offset = (uint32_t)ffg_rd_fixed(&c, sizeof(uint32_t));
    if (c.bad || cie_offset == CIE_ID || cie_offset > (uintptr_t)body - f->map_start)
        return 0;
    int has_z;
    if (!ffg_parse_cie(body - cie_offset, f, &has_z))
        return 0;
    f->pc_begin = ffg_rd_encoded(&c, f->fde_enc, 0);
    uintptr_t range = ffg_rd_encoded(&c, f->fde_enc & PE_FORMAT_MASK, 0);
    if (has_z) {
        uint64_t aug_len = ffg_rd_uleb(&c);
        if (aug_len > (uint64_t)(c.end - c.p))
            return 0;
        c.p += aug_len;
    }
    if (c.bad)
        return 0;
    f->pc_end = f->pc_begin + range;
    f->insns = c.p;
    f->insns_end = end;
    return 1;
}

/* The last object found during one walk: most callers are in the same object as their
 * callee, and then _dl_find_object is not asked again. */
struct ffg_object_cache {
    uintptr_t map_start, map_end; /* map_end == 0: empty */
    const unsigned char *eh_frame_hdr;
};

/* The FDE covering pc, through the object's .eh_frame_hdr search table. */
static int ffg_find_fde(uintptr_t pc, struct ffg_fde *f, struct ffg_object_cache *cache)
{
    if (!(pc >= cache->map_start && pc < cache->map_end)) {
        ffg_find_object_fn find = __atomic_load_n(&ffg_find_object, __ATOMIC_ACQUIRE);
        struct ffg_dl_find_object obj;
        if (!find || find((void *)pc, &obj) != 0 || !obj.eh_frame)
            return 0;
        cache->map_start = (uintptr_t)obj.map_start;
        cache->map_end = (uintptr_t)obj.map_end;
        cache->eh_frame_hdr = obj.eh_frame;
    }
    f->map_start = cache->map_start;
    f->map_end = cache->map_end;
    const unsigned char *hdr = cache->eh_frame_hdr;
    if ((uintptr_t)hdr < f->map_start || (uintptr_t)hdr >= f->map_end)
        return 0;
    struct ffg_cursor c = {hdr, (const unsigned char *)f->map_end, 0};
    unsigned version = (unsigned)ffg_rd_fixed(&c, 1);
    unsigned frame_ptr_enc = (unsigned)ffg_rd_fixed(&c, 1);
    unsigned count_enc = (unsigned)ffg_rd_fixed(&c, 1);
    unsigned table_enc = (unsigned)ffg_rd_fixed(&c, 1);
    if (c.bad || version != HDR_VERSION || count_enc == PE_OMIT || table_enc != HDR_TABLE_ENC)
        return 0;
    ffg_rd_encoded(&c, frame_ptr_enc, (uintptr_t)hdr);
    uint64_t count = ffg_rd_encoded(&c, count_enc, (uintptr_t)hdr);
    const int32_t *table = (const int32_t *)c.p; /* {initial location, FDE}, datarel */
    size_t entry = 2 * sizeof(int32_t);
    if (c.bad || count == 0 || count > (uint64_t)(c.end - c.p) / entry || ((uintptr_t)table % sizeof(int32_t)))
        return 0;
    size_t lo = 0, hi = (size_t)count; /* the last entry whose location <= pc */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if ((uintptr_t)hdr + (intptr_t)table[2 * mid] <= pc)
            lo = mid;
        else
            hi = mid;
    }
    if ((uintptr_t)hdr + (intptr_t)table[2 * lo] > pc)
        return 0;
    const unsigned char *fde = hdr + (intptr_t)table[2 * lo + 1];
    if ((uintptr_t)fde < f->map_start || (uintptr_t)fde >= f->map_end)
        return 0;
    return ffg_parse_fde(fde, f) && pc >= f->pc_begin && pc < f->pc_end;
}

/* ---- running the CFA program ------------------------------------------------------------- */

enum ffg_rule_kind { RULE_SAME, RULE_UNDEFINED, RULE_OFFSET, RULE_VAL_OFFSET, RULE_REGISTER, RULE_UNSUPPORTED };

struct ffg_rule {
    int32_t value; /* offset from the CFA, or the register number */
    unsigned char kind;
};

struct ffg_row {
    uint64_t cfa_reg;
    int64_t cfa_offset;
    int cfa_unsupported; /* DW_CFA_def_cfa_expression */
    struct ffg_rule reg[FFG_UNW_NREGS];
};

struct ffg_cfa_state {
    struct ffg_row row, initial; /* initial: after the CIE's program, for DW_CFA_restore */
    struct ffg_row saved[REMEMBER_DEPTH];
    int nsaved;
};

static void ffg_set_rule(struct ffg_row *row, uint64_t reg, unsigned kind, int64_t value)
{
    if (reg < FFG_UNW_NREGS) { /* others (vector registers) are not needed for the walk */
        int fits = value >= INT32_MIN && value <= INT32_MAX;
        row->reg[reg].kind = (unsigned char)(fits ? kind : RULE_UNSUPPORTED);
        row->reg[reg].value = fits ? (int32_t)value : 0;
    }
}

/* Run insns until the location passes target; 0 on anything malformed or unknown. */
static int ffg_run_cfa(const unsigned char *insns, const unsigned char *insns_end, const struct ffg_fde *f,
                       uintptr_t target, struct ffg_cfa_state *s)
{
    struct ffg_cursor c = {insns, insns_end, 0};
    uintptr_t loc = f->pc_begin;
    struct ffg_row *row = &s->row;
    while (c.p < c.end && !c.bad) {
        unsigned op = (unsigned)ffg_rd_fixed(&c, 1);
        unsigned low = op & CFA_LOW_MASK;
        uint64_t reg, delta = 0;
        int advance = 0;
        switch (op & CFA_HIGH_MASK) {
        case CFA_ADVANCE_LOC:
            delta = low;
            advance = 1;
            break;
        case CFA_OFFSET:
            ffg_set_rule(row, low, RULE_OFFSET, (int64_t)ffg_rd_uleb(&c) * f->data_align);
            continue;
        case CFA_RESTORE:
            if (low < FFG_UNW_NREGS)
                row->reg[low] = s->initial.reg[low];
            continue;
        default:
            break;
        }
        if (!advance) {
            switch (op) {
            case CFA_NOP:
            case CFA_NEGATE_RA_STATE: /* the return address is signed: stripped after the read */
                break;
            case CFA_GNU_ARGS_SIZE:
                ffg_rd_uleb(&c);
                break;
            case CFA_SET_LOC: {
                uintptr_t to = ffg_rd_encoded(&c, f->fde_enc, 0);
                if (to > target)
                    return !c.bad;
                loc = to;
                break;
            }
            case CFA_ADVANCE_LOC1:
                delta = ffg_rd_fixed(&c, sizeof(uint8_t));
                advance = 1;
                break;
            case CFA_ADVANCE_LOC2:
                delta = ffg_rd_fixed(&c, sizeof(uint16_t));
                advance = 1;
                break;
            case CFA_ADVANCE_LOC4:
                delta = ffg_rd_fixed(&c, sizeof(uint32_t));
                advance = 1;
                break;
            case CFA_OFFSET_EXTENDED:
                reg = ffg_rd_uleb(&c);
                ffg_set_rule(row, reg, RULE_OFFSET, (int64_t)ffg_rd_uleb(&c) * f->data_align);
                break;
            case CFA_OFFSET_EXTENDED_SF:
                reg = ffg_rd_uleb(&c);
                ffg_set_rule(row, reg, RULE_OFFSET, ffg_rd_sleb(&c) * f->data_align);
                break;
            case CFA_GNU_NEGATIVE_OFFSET_EXTENDED:
                reg = ffg_rd_uleb(&c);
                ffg_set_rule(row, reg, RULE_OFFSET, -(int64_t)ffg_rd_uleb(&c) * f->data_align);
                break;
            case CFA_VAL_OFFSET:
                reg = ffg_rd_uleb(&c);
                ffg_set_rule(row, reg, RULE_VAL_OFFSET, (int64_t)ffg_rd_uleb(&c) * f->data_align);
                break;
            case CFA_VAL_OFFSET_SF:
                reg = ffg_rd_uleb(&c);
                ffg_set_rule(row, reg, RULE_VAL_OFFSET, ffg_rd_sleb(&c) * f->data_align);
                break;
            case CFA_RESTORE_EXTENDED:
                reg = ffg_rd_uleb(&c);
                if (reg < FFG_UNW_NREGS)
                    row->reg[reg] = s->initial.reg[reg];
                break;
            case CFA_UNDEFINED:
                ffg_set_rule(row, ffg_rd_uleb(&c), RULE_UNDEFINED, 0);
                break;
            case CFA_SAME_VALUE:
                ffg_set_rule(row, ffg_rd_uleb(&c), RULE_SAME, 0);
                break;
            case CFA_REGISTER:
                reg = ffg_rd_uleb(&c);
                ffg_set_rule(row, reg, RULE_REGISTER, (int64_t)ffg_rd_uleb(&c));
                break;
            case CFA_REMEMBER_STATE:
                if (s->nsaved >= REMEMBER_DEPTH)
                    return 0;
                s->saved[s->nsaved++] = *row;
                break;
            case CFA_RESTORE_STATE:
                if (s->nsaved == 0)
                    return 0;
                *row = s->saved[--s->nsaved];
                break;
            case CFA_DEF_CFA:
                row->cfa_reg = ffg_rd_uleb(&c);
                row->cfa_offset = (int64_t)ffg_rd_uleb(&c);
                row->cfa_unsupported = 0;
                break;
            case CFA_DEF_CFA_SF:
                row->cfa_reg = ffg_rd_uleb(&c);
                row->cfa_offset = ffg_rd_sleb(&c) * f->data_align;
                row->cfa_unsupported = 0;
                break;
            case CFA_DEF_CFA_REGISTER:
                row->cfa_reg = ffg_rd_uleb(&c);
                break;
            case CFA_DEF_CFA_OFFSET:
                row->cfa_offset = (int64_t)ffg_rd_uleb(&c);
                break;
            case CFA_DEF_CFA_OFFSET_SF:
                row->cfa_offset = ffg_rd_sleb(&c) * f->data_align;
                break;
            case CFA_DEF_CFA_EXPRESSION: {
                uint64_t len = ffg_rd_uleb(&c);
                if (len > (uint64_t)(c.end - c.p))
                    return 0;
                c.p += len;
                row->cfa_unsupported = 1;
                break;
            }
            case CFA_EXPRESSION:
            case CFA_VAL_EXPRESSION: {
                reg = ffg_rd_uleb(&c);
                uint64_t len = ffg_rd_uleb(&c);
                if (len > (uint64_t)(c.end - c.p))
                    return 0;
                c.p += len;
                ffg_set_rule(row, reg, RULE_UNSUPPORTED, 0);
                break;
            }
            default:
                return 0; /* an instruction we do not know: its operands cannot be skipped */
            }
        }
        if (advance) {
            uintptr_t next = loc + delta * f->code_align;
            if (next > target || next < loc)
                return !c.bad; /* the row for target is complete */
            loc = next;
        }
    }
    return !c.bad;
}

/* ---- the walk -------------------------------------------------------------------------- */

static int ffg_in_thunk(uintptr_t pc) { return pc >= (uintptr_t)&ffg_thunk && pc < (uintptr_t)&ffg_thunk_end; }

/* One step from the frame (reg, *pc) to its caller: 1 and the caller's registers, or 0
 * when the walk must end. first: pc is the faulting instruction itself. */
static int ffg_step(uintptr_t *reg, uintptr_t *pc, int first, const struct ffg_stack *stack,
                    struct ffg_object_cache *cache)
{
    struct ffg_fde f;
    uintptr_t target = first ? *pc : *pc - 1; /* a return address: look up the call */
    if (!ffg_find_fde(target, &f, cache))
        return 0;
    struct ffg_cfa_state s;
    memset(&s.row, 0, sizeof s.row); /* RULE_SAME everywhere: what libgcc assumes too */
    memset(&s.initial, 0, sizeof s.initial); /* DW_CFA_restore inside the CIE: same value */
    s.nsaved = 0;
    if (!ffg_run_cfa(f.cie_insns, f.cie_insns_end, &f, (uintptr_t)-1, &s))
        return 0;
    s.initial = s.row;
    s.nsaved = 0;
    if (!ffg_run_cfa(f.insns, f.insns_end, &f, target, &s))
        return 0;
    const struct ffg_row *row = &s.row;
    if (row->cfa_unsupported || row->cfa_reg >= FFG_UNW_NREGS || f.ra_column >= FFG_UNW_NREGS)
        return 0;
    uintptr_t cfa = reg[row->cfa_reg] + (uintptr_t)row->cfa_offset;
    uintptr_t next[FFG_UNW_NREGS];
    for (int r = 0; r < FFG_UNW_NREGS; r++) {
        const struct ffg_rule *rule = &row->reg[r];
        switch (rule->kind) {
        case RULE_SAME:
            next[r] = reg[r];
            break;
        case RULE_OFFSET:
            if (!ffg_rd_stack(stack, cfa + (uintptr_t)rule->value, &next[r]))
                return 0;
            break;
        case RULE_VAL_OFFSET:
            next[r] = cfa + (uintptr_t)rule->value;
            break;
        case RULE_REGISTER:
            if ((uint64_t)rule->value >= FFG_UNW_NREGS)
                return 0;
            next[r] = reg[rule->value];
            break;
        case RULE_UNDEFINED:
            if ((uint64_t)r == f.ra_column)
                return 0; /* the outermost frame */
            next[r] = 0;
            break;
        default: /* a DWARF expression: not evaluated here */
            if ((uint64_t)r == f.ra_column || r == FFG_UNW_SP)
                return 0;
            next[r] = 0;
            break;
        }
    }
    uintptr_t ra = ffg_unw_strip_ra(next[f.ra_column]);
    if (cfa < reg[FFG_UNW_SP] || (cfa == reg[FFG_UNW_SP] && ra == *pc) || ra == 0)
        return 0; /* the stack must unwind upwards, and a step must get somewhere */
    next[FFG_UNW_SP] = cfa;
    memcpy(reg, next, sizeof next);
    *pc = ra;
    return 1;
}

int ffg_unwind(const ucontext_t *uc, uintptr_t lo, uintptr_t hi, int bad_call, uintptr_t *pcs, int max,
               volatile int *npcs)
{
    uintptr_t reg[FFG_UNW_NREGS];
    uintptr_t pc = ffg_uc_pc(uc);
    struct ffg_stack stack = {lo, hi};
    struct ffg_object_cache cache = {0, 0, NULL};
    int n = 0;
    *npcs = 0;
    if (max <= 0)
        return 0;
    ffg_unw_regs_from_uc(uc, reg);
    pcs[n++] = pc;
    *npcs = n;
    int first = 1;
    if (bad_call) {
        /* A call to an address with no code (e.g. through NULL): nothing describes pc,
         * but the call just left the caller's state as the architecture defines it. */
        struct ffg_fde none;
        if (!ffg_find_fde(pc, &none, &cache)) {
            if (!ffg_unw_bad_call(reg, pc, lo, hi, &pc))
                return 0;
            if (ffg_in_thunk(pc))
                return 1;
            pcs[n++] = pc;
            *npcs = n;
            first = 0;
        }
    }
    while (n < max && ffg_step(reg, &pc, first, &stack, &cache)) {
        if (ffg_in_thunk(pc)) /* the foreign call's caller: the end of the foreign frames */
            return 1;
        pcs[n++] = pc;
        *npcs = n; /* what was collected stays valid if a later read faults after all */
        first = 0;
    }
    return 0; /* stopped short of the thunk (interrupt, issue 16: the frames are not all known) */
}

#else /* FFG_NO_ARCH: no handler is ever installed */

int ffg_unwind_available(void) { return 0; }
void ffg_unwind_set_available(int on) { (void)on; }

int ffg_unwind(const ucontext_t *uc, uintptr_t lo, uintptr_t hi, int bad_call, uintptr_t *pcs, int max,
               volatile int *npcs)
{
    (void)lo, (void)hi, (void)bad_call;
    *npcs = 0;
    if (max > 0) {
        pcs[0] = ffg_uc_pc(uc);
        *npcs = 1;
    }
    return 0;
}

#endif
