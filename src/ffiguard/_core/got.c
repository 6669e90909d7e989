/* GOT slots of a loaded object (compiled cffi modules, issue 15): which slots the dynamic
 * linker filled with a function's address, and rewriting one.
 *
 * A compiled cffi module that links against a shared library reaches each of its
 * functions through a GOT slot: a PLT call's (JUMP_SLOT relocation) or, built with
 * -fno-plt, a slot loaded directly (GLOB_DAT). Pointing the slot at the function's guard
 * stub puts the thunk under every call the module makes to that function: armed by the
 * module's GuardedFunction it is a guarded call; otherwise the stub just jumps on.
 *
 * The object is found with dl_iterate_phdr (the loaded segment holding an address in
 * it), its relocations through its PT_DYNAMIC; symbol names from its dynamic symbol
 * table. A slot inside PT_GNU_RELRO was made read-only by the dynamic linker after
 * relocation: it is made writable for the one aligned 8-byte store and read-only again
 * (the page range glibc protected: from the segment's start rounded down to its end
 * rounded down). The store is atomic: a thread calling through the slot meanwhile
 * reads either the old or the new address, both whole.
 *
 * Normal context only (Python API, dl_iterate_phdr's lock): never the signal handler.
 * Writes are serialised by ffg_got_lock (no reliance on the GIL).
 */
#include "core.h"

#include <elf.h>
#include <errno.h>
#include <link.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static pthread_mutex_t ffg_got_lock = PTHREAD_MUTEX_INITIALIZER;

struct ffg_got_object {
    uintptr_t address;     /* in: an address inside the object */
    uintptr_t base;        /* out: its load bias */
    const ElfW(Phdr) *phdr;
    int phnum;
    int found;
};

static int ffg_got_find_cb(struct dl_phdr_info *info, size_t size, void *data)
{
    (void)size;
    struct ffg_got_object *o = data;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *p = &info->dlpi_phdr[i];
        uintptr_t start = info->dlpi_addr + p->p_vaddr;
        if (p->p_type == PT_LOAD && o->address >= start && o->address < start + p->p_memsz) {
            o->base = info->dlpi_addr;
            o->phdr = info->dlpi_phdr;
            o->phnum = info->dlpi_phnum;
            o->found = 1;
            return 1;
        }
    }
    return 0;
}

/* The loaded object holding address; 0 when none does. */
static int ffg_got_object(uintptr_t address, struct ffg_got_object *o)
{
    memset(o, 0, sizeof *o);
    o->address = address;
    dl_iterate_phdr(ffg_got_find_cb, o);
    return o->found;
}

/* A dynamic-section address: glibc relocates these entries in place on x86-64 and
 * AArch64; other loaders leave them as link-time addresses. */
static uintptr_t ffg_got_ptr(uintptr_t base, uintptr_t value)
{
    return value < base ? base + value : value;
}

/* Add {symbol name: [(slot, value), ...]} for the JUMP_SLOT/GLOB_DAT relocations in
 * rela[0..count). -1 with an exception set. */
static int ffg_got_collect(PyObject *out, uintptr_t base, const ElfW(Rela) *rela, size_t count,
                           const ElfW(Sym) *symtab, const char *strtab)
{
    for (size_t i = 0; i < count; i++) {
        unsigned long type = ELF64_R_TYPE(rela[i].r_info);
        unsigned long sym = ELF64_R_SYM(rela[i].r_info);
        if ((type != FFG_R_JUMP_SLOT && type != FFG_R_GLOB_DAT) || sym == 0)
            continue;
        if (ELF64_ST_TYPE(symtab[sym].st_info) != STT_FUNC && ELF64_ST_TYPE(symtab[sym].st_info) != STT_NOTYPE &&
            ELF64_ST_TYPE(symtab[sym].st_info) != STT_GNU_IFUNC)
            continue; /* a data object's address */
        const char *name = strtab + symtab[sym].st_name;
        uintptr_t slot = base + rela[i].r_offset;
        PyObject *key = PyUnicode_DecodeFSDefault(name);
        PyObject *entry = key ? Py_BuildValue("(KK)", (unsigned long long)slot,
                                              (unsigned long long)*(const volatile uintptr_t *)slot)
                              : NULL;
        PyObject *list = key ? PyDict_GetItemWithError(out, key) : NULL; /* borrowed */
        int ok = entry != NULL && !PyErr_Occurred();
        if (ok && !list) {
            list = PyList_New(0);
            ok = list && PyDict_SetItem(out, key, list) == 0;
            Py_XDECREF(list); /* the dict holds it */
        }
        ok = ok && PyList_Append(list, entry) == 0;
        Py_XDECREF(key);
        Py_XDECREF(entry);
        if (!ok)
            return -1;
    }
    return 0;
}

/* got_slots(address) -> {symbol: [(slot, value), ...]}: the function-address GOT slots of
 * the loaded object holding address, and what they hold now. */
PyObject *ffg_m_got_slots(PyObject *mod, PyObject *arg)
{
    (void)mod;
    uintptr_t address = (uintptr_t)PyLong_AsVoidPtr(arg);
    if (PyErr_Occurred())
        return NULL;
    struct ffg_got_object o;
    if (!ffg_got_object(address, &o)) {
        PyErr_Format(PyExc_ValueError, "no loaded object holds address %p", (void *)address);
        return NULL;
    }
    const ElfW(Dyn) *dyn = NULL;
    for (int i = 0; i < o.phnum; i++)
        if (o.phdr[i].p_type == PT_DYNAMIC)
            dyn = (const ElfW(Dyn) *)(o.base + o.phdr[i].p_vaddr);
    PyObject *out = PyDict_New();
    if (!out || !dyn)
        return out; /* a static object: no slots */
    uintptr_t symtab = 0, strtab = 0, jmprel = 0, rela = 0;
    size_t pltrelsz = 0, relasz = 0, relaent = sizeof(ElfW(Rela));
    long pltrel = DT_RELA;
    for (; dyn->d_tag != DT_NULL; dyn++) {
        switch (dyn->d_tag) {
        case DT_SYMTAB: symtab = ffg_got_ptr(o.base, dyn->d_un.d_ptr); break;
        case DT_STRTAB: strtab = ffg_got_ptr(o.base, dyn->d_un.d_ptr); break;
        case DT_JMPREL: jmprel = ffg_got_ptr(o.base, dyn->d_un.d_ptr); break;
        case DT_RELA: rela = ffg_got_ptr(o.base, dyn->d_un.d_ptr); break;
        case DT_PLTRELSZ: pltrelsz = dyn->d_un.d_val; break;
        case DT_RELASZ: relasz = dyn->d_un.d_val; break;
        case DT_RELAENT: relaent = dyn->d_un.d_val; break;
        case DT_PLTREL: pltrel = (long)dyn->d_un.d_val; break;
        default: break;
        }
    }
    if (!symtab || !strtab || relaent != sizeof(ElfW(Rela)) || pltrel != DT_RELA)
        return out; /* REL-format relocations: not on x86-64 or AArch64 */
    const ElfW(Sym) *syms = (const ElfW(Sym) *)symtab;
    const char *strs = (const char *)strtab;
    if ((jmprel && ffg_got_collect(out, o.base, (const ElfW(Rela) *)jmprel, pltrelsz / relaent, syms, strs) < 0) ||
        (rela && ffg_got_collect(out, o.base, (const ElfW(Rela) *)rela, relasz / relaent, syms, strs) < 0)) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* got_write(slot, expected, new) -> True when the slot held expected and now holds new,
 * False when it held something else (left alone). */
PyObject *ffg_m_got_write(PyObject *mod, PyObject *args)
{
    (void)mod;
    unsigned long long slot_arg, expected, value;
    if (!PyArg_ParseTuple(args, "KKK:got_write", &slot_arg, &expected, &value))
        return NULL;
    uintptr_t slot = (uintptr_t)slot_arg;
    if (slot % sizeof(uintptr_t)) {
        PyErr_SetString(PyExc_ValueError, "got_write: a GOT slot is pointer-aligned");
        return NULL;
    }
    struct ffg_got_object o;
    if (!ffg_got_object(slot, &o)) {
        PyErr_Format(PyExc_ValueError, "got_write: no loaded object holds %p", (void *)slot);
        return NULL;
    }
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    uintptr_t relro_lo = 0, relro_hi = 0;
    for (int i = 0; i < o.phnum; i++)
        if (o.phdr[i].p_type == PT_GNU_RELRO) {
            uintptr_t start = o.base + o.phdr[i].p_vaddr;
            relro_lo = start & ~(uintptr_t)(page - 1);
            relro_hi = (start + o.phdr[i].p_memsz) & ~(uintptr_t)(page - 1);
        }
    int in_relro = slot >= relro_lo && slot < relro_hi;
    void *slot_page = (void *)(slot & ~(uintptr_t)(page - 1));
    int written = 0, saved_errno = 0;
    pthread_mutex_lock(&ffg_got_lock);
    if (__atomic_load_n((uintptr_t *)slot, __ATOMIC_ACQUIRE) == (uintptr_t)expected) {
        if (in_relro && mprotect(slot_page, page, PROT_READ | PROT_WRITE) != 0) {
            saved_errno = errno;
        } else {
            __atomic_store_n((uintptr_t *)slot, (uintptr_t)value, __ATOMIC_RELEASE);
            written = 1;
            if (in_relro && mprotect(slot_page, page, PROT_READ) != 0)
                saved_errno = errno;
        }
    }
    pthread_mutex_unlock(&ffg_got_lock);
    if (saved_errno) {
        errno = saved_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBool_FromLong(written);
}
