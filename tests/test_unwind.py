"""The native backtrace of a fault: ffiguard's own unwinder (_core/unwind.c).

It must never take a lock (libgcc's unwinder does once a JIT registered unwind tables),
must follow DWARF CFI through optimized code without frame pointers, must stop at a
corrupt stack instead of faulting, and must say honestly when it cannot walk at all.
"""
import ctypes
import os
import subprocess
import sysconfig

import pytest

import ffiguard
from ffiguard import _core
from conftest import AARCH64, CRASHERS_PATH, return_address_in, setup_signatures

# A small library of our own, built for each test session:
# - jit_register_lost_table registers a valid .eh_frame table with libgcc
#   (__register_frame, as JITs do for their code) and then makes its page unreadable, as
#   a JIT that freed the memory without deregistering it would. libgcc (GCC <= 12) looks
#   every pc up in registered tables under a mutex, so its unwinder faults there with
#   that mutex held.
# - top1 -> mid2 -> mid3 -> leaf_read: -O2 without frame pointers (built so below), each
#   with a frame of its own and work after the call (no tail calls); leaf_read reads *p.
# - wild_sp_trap: sets the stack pointer to an unmapped address, then executes an
#   undefined instruction: every CFA-relative read from there is outside the stack.
UNWIND_LIB_C = r"""
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

extern void __register_frame(void *begin);

#define EXPORT __attribute__((visibility("default"), noinline, noipa))

#if defined(__aarch64__)
#define SP_REG 31
#define RA_REG 30
#define CFA_OFFSET 0
#else
#define SP_REG 7
#define RA_REG 16
#define CFA_OFFSET 8
#endif

static char fake_code[64]; /* the "JIT code" the table describes (never run) */

EXPORT int jit_register_lost_table(void)
{
    long page = sysconf(_SC_PAGESIZE);
    unsigned char *t = mmap(NULL, (size_t)page, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (t == MAP_FAILED)
        return -1;
    /* CIE: length, id 0, version 1, "zR", code align 1, data align -8, RA column,
     * augmentation length 1, FDE encoding absptr; def_cfa sp+CFA_OFFSET; RA at cfa-8. */
    unsigned char cie[] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 'z', 'R', 0, 1, 0x78, RA_REG, 1, 0x00,
                           0x0c, SP_REG, CFA_OFFSET, 0x80 | RA_REG, 1, 0, 0};
    cie[0] = sizeof cie - 4;
    memcpy(t, cie, sizeof cie);
    /* FDE: length, CIE pointer, pc_begin, pc_range, augmentation length 0, padding. */
    unsigned char *fde = t + sizeof cie;
    uint32_t len = 4 + 8 + 8 + 1 + 3, cie_ptr = (uint32_t)(fde + 4 - t);
    uint64_t begin = (uint64_t)(uintptr_t)fake_code, range = sizeof fake_code;
    memcpy(fde, &len, 4);
    memcpy(fde + 4, &cie_ptr, 4);
    memcpy(fde + 8, &begin, 8);
    memcpy(fde + 16, &range, 8);
    memset(fde + 24, 0, 8); /* augmentation length, DW_CFA_nop x3, then the terminator */
    __register_frame(t);
    return mprotect(t, (size_t)page, PROT_NONE);
}

static volatile int sink;

EXPORT int leaf_read(int *p, int x) { int v = *(volatile int *)p; sink = x; return v + x; }

EXPORT int mid3(int *p, int x)
{
    volatile char pad[40];
    pad[x & 31] = (char)x;
    int r = leaf_read(p, x + pad[x & 31]);
    sink = r;
    return r + pad[1] + 1;
}

EXPORT int mid2(int *p, int x)
{
    volatile long pad[6];
    pad[x & 3] = x;
    int r = mid3(p, x * 3);
    sink = r;
    return r + (int)pad[2] + 2;
}

EXPORT int top1(int *p, int x)
{
    volatile int pad[10];
    pad[x & 7] = x;
    int r = mid2(p, x + 1);
    sink = r;
    return r + pad[3] + 3;
}

EXPORT void wild_sp_trap(void)
{
#if defined(__aarch64__)
    __asm__ volatile("mov x9, #0x10000\n\tmov sp, x9\n\tudf #0" ::: "x9", "memory");
#else
    __asm__ volatile("mov $0x10000, %%rsp\n\tud2" ::: "memory");
#endif
}
"""


@pytest.fixture(scope="module")
def unwind_lib(tmp_path_factory):
    directory = tmp_path_factory.mktemp("unwind")
    src = directory / "unwind_lib.c"
    src.write_text(UNWIND_LIB_C)
    so = directory / "libunwindtest.so"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-fomit-frame-pointer", "-fasynchronous-unwind-tables",
                    "-o", str(so), str(src)], check=True)
    return str(so)


def _functions(path, names):
    lib = ctypes.CDLL(path)
    return {n: ctypes.cast(getattr(lib, n), ctypes.c_void_p).value for n in names}


def _symbol_of_return(address):
    """The symbol containing the call instruction before a return address."""
    found = _core.dladdr(address - 1)
    return found[2] if found else None


def test_backtrace_through_optimized_code_without_frame_pointers(unwind_lib):
    """-O2 without frame pointers: each caller is found from the CFI alone, every frame is
    there in order, and the walk ends exactly at the guarded call (top1 was called by the
    guard thunk: nothing beyond it)."""
    lib = ffiguard.CDLL(unwind_lib)
    lib.top1.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.top1.restype = ctypes.c_int
    with pytest.raises(ffiguard.SegmentationFault) as info:
        lib.top1(None, 5)
    e = info.value
    assert e.symbol == "leaf_read" and e.frames[0] == e.pc and e.address == 0
    assert [_symbol_of_return(f) for f in e.frames[1:]] == ["mid3", "mid2", "top1"], \
        [hex(f) for f in e.frames]
    # The same functions called again give the same backtrace (nothing cached wrongly).
    with pytest.raises(ffiguard.SegmentationFault) as again:
        lib.top1(None, 6)
    assert again.value.frames == e.frames


def test_wild_stack_pointer_ends_the_walk(unwind_lib):
    """A stack pointer outside the thread's stack: the unwinder reads nothing there (every
    stack read is checked) and the backtrace is the pc alone; the call is recovered and
    the next fault unwinds normally."""
    lib = ffiguard.CDLL(unwind_lib)
    lib.wild_sp_trap.argtypes, lib.wild_sp_trap.restype = [], None
    escapes = _core.unwind_escapes()
    with pytest.raises(ffiguard.IllegalInstruction) as info:
        lib.wild_sp_trap()
    e = info.value
    assert e.symbol == "wild_sp_trap"
    assert e.frames == [e.pc]
    assert _core.unwind_escapes() == escapes  # stopped by the checks, not by a fault
    crashers = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
    with pytest.raises(ffiguard.SegmentationFault) as info:
        crashers.ffg_read_null()
    assert len(info.value.frames) == 2 and return_address_in(info.value.frames[1], "ffg_read_null")


def test_no_lock_with_jit_registered_unwind_tables(run_python, unwind_lib):
    """Unwind tables registered at run time (__register_frame, as LLVM/llvmlite, wasm
    engines and LuaJIT do) whose memory became unreadable: libgcc's unwinder faulted
    reading them under its object mutex, the fault was escaped with siglongjmp, the
    mutex stayed locked, and the next fault hung in the handler. Ours never looks at
    libgcc's registry: every fault is a ForeignFault with its full backtrace, including
    one whose stack pointer is wild."""
    try:
        rc, out, err = run_python("""
            import ffiguard
            lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
            jit = ctypes.CDLL(%r)
            assert jit.jit_register_lost_table() == 0
            wild = ffiguard.CDLL(%r).wild_sp_trap
            wild.restype = None
            for i in range(3):
                try:
                    lib.ffg_read_null()
                except ffiguard.SegmentationFault as e:
                    print("caught", i, len(e.frames), flush=True)
                try:
                    wild()
                except ffiguard.IllegalInstruction as e:
                    print("wild", i, len(e.frames), flush=True)
        """ % (unwind_lib, unwind_lib), timeout=20)
    except subprocess.TimeoutExpired as exc:
        pytest.fail("the fault handler hung after a fault inside the unwinder: %r" % (exc.stdout,))
    assert rc == 0, err
    assert out.split("\n") == [
        "caught 0 2", "wild 0 1", "caught 1 2", "wild 1 1", "caught 2 2", "wild 2 1", ""], out


def test_without_dl_find_object(crashers):
    """On a glibc without _dl_find_object (< 2.35) no unwind table can be found without
    the loader's lock: the backtrace is the pc alone, plus a bad call's return address,
    which the architecture defines without unwind tables."""
    assert _core.unwind_available()
    _core._set_unwind_available(False)
    try:
        assert not _core.unwind_available()
        with pytest.raises(ffiguard.SegmentationFault) as info:
            crashers.ffg_read_null()
        assert info.value.frames == [info.value.pc]
        with pytest.raises(ffiguard.SegmentationFault) as info:
            crashers.ffg_call_null()
        e = info.value
        assert e.pc == 0 and len(e.frames) == 2 and return_address_in(e.frames[1], "ffg_call_null")
    finally:
        _core._set_unwind_available(True)
    with pytest.raises(ffiguard.SegmentationFault) as info:
        crashers.ffg_read_null()
    assert len(info.value.frames) == 2


def test_bad_call_continues_into_the_callers(unwind_lib, crashers):
    """A call through a bad pointer: the caller is found from the call's return address,
    and the walk goes on from there through the callers' CFI (libgcc stopped at the
    first). libc's qsort calling a comparator at address 16: the frames after the bad
    pc are all inside libc, ending at the guarded call."""
    libc = ffiguard.CDLL("libc.so.6")
    libc.qsort.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p]
    libc.qsort.restype = None
    buf = (ctypes.c_long * 4)(4, 3, 2, 1)
    with pytest.raises(ffiguard.SegmentationFault) as info:
        libc.qsort(buf, 4, ctypes.sizeof(ctypes.c_long), 16)
    e = info.value
    assert e.pc == 16 and e.address == 16
    libc_path = _core.dladdr(ctypes.cast(ctypes.CDLL("libc.so.6").qsort, ctypes.c_void_p).value)[0]
    assert len(e.frames) >= 3, [hex(f) for f in e.frames]
    assert all(_core.dladdr(f - 1)[0] == libc_path for f in e.frames[1:]), [hex(f) for f in e.frames]
