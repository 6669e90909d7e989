"""Reports: the symbolized native backtrace (file:line from DWARF, with every backend
present; a stripped copy of the library), lazy symbolization, the traceback notes, the
fault address among the mappings, the call's arguments, and suspect state."""
import ctypes
import mmap
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest

import ffiguard
from ffiguard import report as report_mod
from ffiguard import symbolize
from conftest import (ARG0_REG, CRASHERS_PATH, DIVISION_TRAPS, ENTRY_PAD, PC_REG, UNDER_QEMU,
                      expected_access, map_base, same_file, setup_signatures)

CRASHERS_C = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "src", "ffiguard", "_crashers", "crashers.c")


def source_line(pattern):
    """The 1-based line of crashers.c matching the regular expression `pattern`."""
    with open(CRASHERS_C) as f:
        hits = [i for i, line in enumerate(f, 1) if re.search(pattern, line)]
    assert len(hits) == 1, (pattern, hits)
    return hits[0]


READ_AT_LINE = source_line(r"\bint ffg_read_at\(")
READ_NULL_LINE = source_line(r"\bint ffg_read_null\(")


def catch(fn, *args, cls=ffiguard.ForeignFault):
    with pytest.raises(cls) as info:
        fn(*args)
    return info.value


def dwarf_backends():
    found = symbolize.available_backends()
    return [pytest.param(name, marks=pytest.mark.skipif(
        not found[name], reason="%s is not installed here (the others are tested)" % name))
        for name in ("pyelftools", "llvm-symbolizer", "addr2line")]


@pytest.fixture
def use_backend(monkeypatch):
    def use(name):
        monkeypatch.setenv("FFIGUARD_SYMBOLIZER", name)
        symbolize.clear_cache()
    yield use
    symbolize.clear_cache()


# ---------------------------------------------------------------- symbolization


@pytest.mark.parametrize("backend", dwarf_backends())
def test_backtrace_names_function_library_and_source_line(crashers, use_backend, backend):
    use_backend(backend)
    e = catch(crashers.ffg_read_null, cls=ffiguard.SegmentationFault)
    frames = symbolize.symbolize(e.frames)
    assert [f.symbol for f in frames] == ["ffg_read_at", "ffg_read_null"]
    assert all(same_file(f.library, CRASHERS_PATH) for f in frames)
    base = map_base(CRASHERS_PATH)
    assert [f.offset for f in frames] == [pc - base for pc in e.frames]
    # the first instruction of ffg_read_at reads *address (after AArch64's `bti c`)
    assert frames[0].symbol_offset == ENTRY_PAD
    assert [os.path.basename(f.file) for f in frames] == ["crashers.c", "crashers.c"]
    assert [f.line for f in frames] == [READ_AT_LINE, READ_NULL_LINE]
    text = e.report()
    lib = os.path.basename(CRASHERS_PATH)
    assert "#0 0x%012x ffg_read_at+%#x (%s+0x%x) at " % (e.pc, ENTRY_PAD, lib, e.pc - base) in text
    assert "crashers.c:%d\n" % READ_AT_LINE in text
    assert "crashers.c:%d\n" % READ_NULL_LINE in text
    assert "source lines from %s" % backend in text


def test_backtrace_without_a_dwarf_backend(crashers, use_backend):
    """FFIGUARD_SYMBOLIZER=none: symbols from the ELF tables, no file:line."""
    use_backend("none")
    e = catch(crashers.ffg_read_null, cls=ffiguard.SegmentationFault)
    frames = symbolize.symbolize(e.frames)
    assert [f.symbol for f in frames] == ["ffg_read_at", "ffg_read_null"]
    assert [f.file for f in frames] == [None, None]
    assert "crashers.c:" not in e.report()


@pytest.fixture
def stripped_copy(tmp_path):
    strip = shutil.which("strip")
    if strip is None:
        pytest.skip("strip (binutils) is not installed")
    path = tmp_path / "libcrashers_stripped.so"
    shutil.copyfile(CRASHERS_PATH, path)
    subprocess.run([strip, str(path)], check=True)
    out = subprocess.run(["readelf", "-S", str(path)], capture_output=True, text=True).stdout \
        if shutil.which("readelf") else ""
    assert ".debug_line" not in out and ".symtab" not in out
    return str(path)


@pytest.mark.parametrize("backend", ["none"] + [p.values[0] for p in dwarf_backends()
                                                 if symbolize.available_backends()[p.values[0]]])
def test_stripped_library(stripped_copy, use_backend, backend):
    use_backend(backend)
    lib = setup_signatures(ffiguard.CDLL(stripped_copy))
    # called directly: ffg_read_null's call to ffg_read_at would be interposed by the
    # copy of ffg_read_at already loaded from the original library
    e = catch(lib.ffg_read_at, 0x10, cls=ffiguard.SegmentationFault)
    frame = symbolize.symbolize(e.frames)[0]
    base = map_base(stripped_copy)
    assert frame.library == stripped_copy
    assert frame.offset == e.pc - base
    # the exported symbol is still named (.dynsym), but there is no source line
    assert (frame.symbol, frame.symbol_offset) == ("ffg_read_at", ENTRY_PAD)
    assert (frame.file, frame.line) == (None, None)
    assert not symbolize._library(stripped_copy).elf.has_symtab
    text = e.report()
    assert "#0 0x%012x ffg_read_at+%#x (libcrashers_stripped.so+0x%x)\n" % (
        e.pc, ENTRY_PAD, e.pc - base) in text
    assert "crashers.c" not in text
    assert "crashers.c" not in "".join(e.__notes__)


def test_replaced_library_file_is_not_served_from_the_cache(tmp_path, use_backend):
    use_backend("none")
    path = str(tmp_path / "lib.so")
    shutil.copyfile(CRASHERS_PATH, path)
    first = symbolize._library(path)
    assert symbolize._library(path) is first
    os.utime(path, ns=(1, 1))
    assert symbolize._library(path) is not first


def test_libc_internal_function_named_or_honestly_unknown(use_backend):
    """strlen(NULL) faults in an internal, unexported function (__strlen_avx2 & co.):
    named from libc's .symtab when its debug symbols are installed, else <unknown>."""
    use_backend("none")
    libc = ffiguard.CDLL("libc.so.6")
    libc.strlen.argtypes = [ctypes.c_char_p]
    libc.strlen.restype = ctypes.c_size_t
    e = catch(libc.strlen, None, cls=ffiguard.SegmentationFault)
    (frame,) = symbolize.symbolize(e.frames)[:1]
    lib = symbolize._library(frame.library)
    assert os.path.basename(frame.library) == "libc.so.6"
    if lib.symbols.has_symtab:
        assert frame.symbol.startswith("__strlen_"), frame
    else:
        assert frame.symbol is None
        assert frame.where().startswith("<unknown> (libc.so.6+0x")


# ---------------------------------------------------------------- laziness


def test_no_symbolization_until_the_report_is_read(crashers, monkeypatch):
    calls = []
    real = symbolize.symbolize

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(symbolize, "symbolize", spy)
    before = symbolize.calls
    e = catch(crashers.ffg_read_null, cls=ffiguard.SegmentationFault)
    assert calls == [] and symbolize.calls == before
    str(e), repr(e), e.symbol, e.library, e.frames
    assert calls == [] and symbolize.calls == before
    notes = e.__notes__
    assert len(calls) == 1
    assert notes[0].startswith("Native backtrace of ffg_read_null(), innermost first")
    e.report()
    assert len(calls) == 1  # cached on the exception


def test_fault_path_does_not_import_the_symbolizer(run_python):
    rc, out, err = run_python("""
        import ffiguard
        lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
        try:
            lib.ffg_read_null()
        except ffiguard.SegmentationFault as e:
            exc = e
        print("ffiguard.symbolize" in sys.modules, "ffiguard.report" in sys.modules)
        # the message names the symbol as the report does: from the ELF symbol tables
        print(str(exc).startswith("SIGSEGV"), "ffiguard.symbolize" in sys.modules)
    """)
    assert rc == 0, err
    # ffiguard.report is imported by ffiguard (the 3.10 hook) but not the symbolizer
    assert out.split("\n")[:2] == ["False True", "True True"]


# ---------------------------------------------------------------- notes & traceback


def test_notes_appear_in_an_uncaught_traceback(run_python):
    rc, out, err = run_python("""
        import ffiguard
        lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
        lib.ffg_read_null()
    """)
    assert rc == 1, err
    lines = err.splitlines()
    head = [i for i, l in enumerate(lines) if l.startswith("ffiguard.faults.SegmentationFault: SIGSEGV")]
    assert len(head) == 1, err
    i = head[0]
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[i + 1].startswith("Native backtrace of ffg_read_null(), innermost first"), err
    assert re.match(r"  #0 0x[0-9a-f]{12} ffg_read_at\+%#x \(_crashers.*\+0x[0-9a-f]+\) at .*crashers\.c:%d$"
                    % (ENTRY_PAD, READ_AT_LINE), lines[i + 2]), err
    assert re.match(r"  #1 0x[0-9a-f]{12} ffg_read_null\+0x[0-9a-f]+ .* at .*crashers\.c:%d$"
                    % READ_NULL_LINE, lines[i + 3]), err
    assert lines[i + 4] == "Full report: e.report()"


def test_notes_appear_for_an_uncaught_fault_in_a_thread(run_python):
    rc, out, err = run_python("""
        import threading, ffiguard
        lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))
        t = threading.Thread(target=lib.ffg_read_null)
        t.start(); t.join()
        print("alive")
    """)
    assert rc == 0 and out == "alive\n", err
    assert "SegmentationFault: SIGSEGV" in err
    assert "Native backtrace of ffg_read_null(), innermost first" in err


@pytest.mark.skipif(sys.version_info < (3, 11), reason="add_note() is new in Python 3.11")
def test_add_note_keeps_the_backtrace_note(crashers):
    e = catch(crashers.ffg_read_null)
    e.add_note("mine")
    assert len(e.__notes__) == 2
    assert e.__notes__[0].startswith("Native backtrace of ffg_read_null()")
    assert e.__notes__[1] == "mine"


def test_notes_can_be_replaced_and_deleted(crashers):
    e = catch(crashers.ffg_read_null)
    e.__notes__ = ["a"]
    assert e.__notes__ == ["a"]
    del e.__notes__
    assert not hasattr(e, "__notes__")
    with pytest.raises(AttributeError):
        del e.__notes__
    assert ffiguard.ForeignFault("by hand").__notes__ == []


def test_pickle_keeps_notes_and_report(crashers):
    e = catch(crashers.ffg_read_null)
    e.__notes__.append("mine")
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        c = pickle.loads(pickle.dumps(e, protocol=proto))
        assert c.__notes__ == e.__notes__
        assert c.__notes__[-1] == "mine"
        assert c.report() == e.report()


# ---------------------------------------------------------------- the report's sections


def test_report_sections_for_a_write_to_a_read_only_page(crashers):
    page = crashers.ffg_readonly_page()
    e = catch(crashers.ffg_write_at, page, 7, cls=ffiguard.SegmentationFault)
    text = e.report()
    assert text.startswith("SegmentationFault: " + str(e) + "\n")
    assert "  signal:   SIGSEGV (11), segmentation fault: an invalid memory access\n" in text
    assert "  code:     SEGV_ACCERR (2): access not allowed by the page's protection\n" in text
    if expected_access("write"):
        assert "  access:   write (as the CPU reported it)\n" in text
    else:  # AArch64 under qemu-user: no ESR record in the signal frame
        assert "  access:   not reported by the CPU\n" in text
    assert "  address:  0x%x\n" % page in text
    assert "  ffg_write_at(%d, 7)   (the Python arguments, as passed" % page in text
    assert "(/proc/self/maps read at report time, not at the fault" in text
    assert "  0x%x is inside anonymous mapping (0x%x-0x%x, r--p), at +0x0\n" % (
        page, page, page + mmap.PAGESIZE) in text
    if expected_access("write"):
        assert "    the mapping allows read only: writing it is not allowed\n" in text
    assert "  %-6s 0x%016x" % (PC_REG, e.pc) in text
    # the second integer argument: rsi on x86-64, x1 on AArch64
    assert "  %-6s 0x%016x" % ("x1" if ARG0_REG == "x0" else "rsi", 7) in text
    assert "  no frame in the C library's allocator or stdio.\n" in text
    assert "  on_fault:   raise (the library can be called again)\n" in text


def test_report_null_page_and_keyword_arguments(crashers):
    e = catch(crashers.ffg_read_at, 0x18)
    text = e.report()
    assert "  ffg_read_at(24)   " in text
    assert "  0x18 is in the NULL page region (below 0x" in text
    assert "a NULL pointer plus an offset of 0x18\n" in text
    long_arg = "x" * 500

    class Weird:
        def __repr__(self):
            raise RuntimeError("no")

    call = report_mod.format_call
    e._call = ((1, long_arg, Weird()), ("key",))
    text = call(e)
    assert text.startswith("ffg_read_at(1, '" + "x" * 76 + "..., key=<Weird: repr failed: RuntimeError>)"), text


def test_report_stack_overflow_and_bus_error(crashers, one_byte_fd):
    e = catch(crashers.ffg_recurse, 0, cls=ffiguard.ForeignStackOverflow)
    text = e.report()
    assert "  verdict:  stack overflow: the foreign code ran out of stack\n" in text
    assert "beyond the stack" in text or "a guard page" in text, text
    where = ctypes.c_size_t(0)
    e = catch(crashers.ffg_read_past_eof, one_byte_fd, ctypes.byref(where), cls=ffiguard.BusError)
    text = e.report()
    assert "  code:     BUS_ADRERR (2): no memory behind the address" in text
    assert "  0x%x is inside " % where.value in text


def test_describe_address_synthetic_maps():
    maps = [
        (0x10000, 0x11000, "r--p", 0, "/lib/x.so"),
        (0x20000, 0x21000, "---p", 0, ""),
        (0x21000, 0x40000, "rw-p", 0, ""),
        (0x7ff000000, 0x7ff100000, "rw-p", 0, "[stack]"),
    ]
    d = report_mod.describe_address
    assert d(None, maps) == ["no fault address (this signal does not carry one)"]
    assert d(0x20010, maps)[1].startswith("  a guard page (mapped with no access): just below a writable")
    assert d(0x10008, maps, access="write") == [
        "0x10008 is inside /lib/x.so (0x10000-0x11000, r--p), at +0x8",
        "  the mapping allows read only: writing it is not allowed"]
    assert d(0x7fefff000, maps)[1] == (
        "  0x1000 below the main thread's stack ([stack] starts at 0x7ff000000): the stack "
        "guard gap, beyond the stack -- a stack overflow")
    assert d(0x15000, maps) == [
        "0x15000 is not mapped",
        "  nearest below: /lib/x.so (0x10000-0x11000, r--p), ends 0x4001 below",
        "  nearest above: anonymous mapping (0x20000-0x21000, ---p), starts 0xb000 above"]
    assert d(1 << 60, maps)[0].endswith("beyond the user address space (non-canonical or kernel address): a wild pointer")


# ---------------------------------------------------------------- suspect state


@pytest.fixture
def libc():
    lib = ffiguard.CDLL("libc.so.6")
    lib.malloc.argtypes = [ctypes.c_size_t]
    lib.malloc.restype = ctypes.c_void_p
    lib.free.argtypes = [ctypes.c_void_p]
    lib.free.restype = None
    lib.fputs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.fputs.restype = ctypes.c_int
    return lib


def test_heap_corruption_abort_is_suspect(libc, capfd):
    before = ffiguard.stats()["suspect"]
    p = libc.malloc(100)
    e = catch(libc.free, p + 8, cls=ffiguard.ForeignAbort)  # glibc: "munmap_chunk(): invalid pointer"
    assert "invalid pointer" in capfd.readouterr().err
    assert report_mod.suspect(e)[0] == "heap corruption"
    assert "  SUSPECT: the C library's allocator detected heap corruption (in " in e.report()
    assert "Suspect state: the C library's allocator detected heap corruption" in e.__notes__[0]
    assert ffiguard.stats()["suspect"] == before + 1


def test_stdio_fault_is_suspect(libc):
    before = ffiguard.stats()["suspect"]
    e = catch(libc.fputs, b"x", 0x10, cls=ffiguard.SegmentationFault)  # a bogus FILE *
    assert report_mod.suspect(e) == ("stdio", "fputs")
    assert "  SUSPECT: the fault happened inside the C library's stdio (fputs)" in e.report()
    assert ffiguard.stats()["suspect"] == before + 1


def test_ordinary_fault_is_not_suspect(crashers):
    before = ffiguard.stats()
    for _ in range(300):  # more than the queue holds: classified in batches
        catch(crashers.ffg_read_null)
    after = ffiguard.stats()
    assert after["suspect"] == before["suspect"]
    assert after["recovered"] == before["recovered"] + 300


def test_classify_names():
    from ffiguard.policy import classify_names

    assert classify_names(["_int_free", "__libc_free"]) == ("allocator", "_int_free")
    assert classify_names(["raise", "abort", "__libc_message", "malloc_printerr", None, "free"]) == (
        "heap corruption", "malloc_printerr")
    assert classify_names(["__strlen_avx2", "__vfprintf_internal", "_IO_printf"]) == (
        "stdio", "__vfprintf_internal")
    assert classify_names(["__fprintf_chk"]) == ("stdio", "__fprintf_chk")
    assert classify_names(["ffg_read_at", "sprintf_like", None]) == (None, None)


def test_classify_names_outside_exported_symbols():
    # glibc 2.43's "free(): invalid pointer" aborts from code GCC split off free (a cold
    # part, outside the exported symbol), and the backtrace never reaches free itself:
    # such code is named by its local symbol where the library has a .symtab, else by
    # the exported functions around it (policy.frame_names).
    from ffiguard.policy import classify_names

    gap = "<libc.so.6+0xa0b81> between timer_settime and __default_morecore"
    assert classify_names(["gsignal", "abort", "<libc.so.6+0x29540> between perror and vwarn",
                           gap]) == ("heap corruption", gap)
    assert classify_names(["raise", "abort", "__libc_message.cold", "free.cold"]) == (
        "heap corruption", "free.cold")
    assert classify_names(["_int_free.part.0", "__libc_free"]) == ("allocator", "_int_free.part.0")
    stdio_gap = "<libc.so.6+0x8000> between _IO_file_write and write"
    assert classify_names([stdio_gap]) == ("stdio", stdio_gap)
    assert classify_names(["<libfoo.so+0x10> between foo and bar", "strlen.cold"]) == (None, None)


def test_frame_names_outside_exported_symbols():
    # A pc between two exported functions of libc, in none of them: named by both.
    from ffiguard import _core, symbolize
    from ffiguard.policy import frame_names

    # libc's own free (CDLL(None).free can be the executable's: Debian's python3.14
    # exports one)
    free = ctypes.cast(ctypes.CDLL("libc.so.6").free, ctypes.c_void_p).value
    path, base = _core.dladdr(free)[:2]
    elf = symbolize._library(path).elf
    gaps = [(start + size, nxt) for (start, size, _), (nxt, _, _) in zip(elf._syms, elf._syms[1:])
            if start + size < nxt]
    end, nxt = gaps[len(gaps) // 2]
    pc = base + end - elf.load_vaddr
    if _core.dladdr(pc) is None or _core.dladdr(pc)[2]:
        pytest.skip("no unexported code between exported functions here")
    (name,) = frame_names([pc])
    before, after = elf.neighbours(end)
    assert name == "<%s+%#x> between %s and %s" % (os.path.basename(path), end - elf.load_vaddr,
                                                   before, after)


# ---------------------------------------------------------------- issue 15: honest reports

def _compile(tmp_path, name, source, cxx=False):
    """A shared library built from `source` here (skips without a compiler)."""
    cc = shutil.which("g++" if cxx else "cc") or shutil.which("c++" if cxx else "gcc")
    if cc is None:
        pytest.skip("no %s compiler" % ("C++" if cxx else "C"))
    src = tmp_path / (name + (".cpp" if cxx else ".c"))
    src.write_text(source)
    out = tmp_path / ("lib%s.so" % name)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-g", str(src), "-o", str(out)], check=True)
    return str(out)


HIDDEN_SOURCE = r"""
__attribute__((visibility("hidden"), noinline)) int hidden_reader(volatile int *p) { return *p + 1; }
int visible_entry(volatile int *p) { return hidden_reader(p) * 2; }
"""


def test_symbol_agrees_with_the_report(tmp_path, use_backend):
    # the fault is in a function only .symtab names (hidden: not in .dynsym); e.symbol
    # and the message used to say what dladdr said while the report named hidden_reader
    use_backend("none")
    lib = ffiguard.CDLL(_compile(tmp_path, "hidden", HIDDEN_SOURCE))
    lib.visible_entry.argtypes = [ctypes.c_void_p]
    e = catch(lib.visible_entry, 0x40, cls=ffiguard.SegmentationFault)
    frame = symbolize.symbolize(e.frames)[0]
    assert frame.symbol == "hidden_reader"
    assert e.symbol == "hidden_reader"
    assert " 0x40 in hidden_reader (libhidden.so+0x" in str(e)  # "reading 0x40" / "at 0x40"
    assert "  faulted in: hidden_reader+0x" in e.report()


CXX_SOURCE = r"""
namespace shapes {
struct Widget {
    __attribute__((noinline)) int poke(volatile int *p, long n) { return *p + (int)n; }
};
}
extern "C" int cxx_entry(volatile int *p) { shapes::Widget w; return w.poke(p, 1) + 1; }
"""

# A C function under Rust mangled names (__asm__ labels): what a Rust library exports.
# The v0 name is rustc's own for <std::sync::poison::mutex::Mutex<Vec<u8>>>::lock
# (checked against c++filt, which prints the crate hashes too).
RUST_V0 = ("_RNvMs5_NtNtNtCsjrHSEGnQ3l9_3std4sync6poison5mutexINtB5_5MutexINtNtCslNYArtu3iFV_"
           "5alloc3vec3VechEE4lockBb_")
RUST_LEGACY = "_ZN7mycrate6widget4poke17h0123456789abcdefE"
RUST_SOURCE = r"""
__attribute__((noinline)) int rust_v0(volatile int *p) __asm__("%s");
__attribute__((noinline)) int rust_v0(volatile int *p) { return *p + 1; }
__attribute__((noinline)) int rust_legacy(volatile int *p) __asm__("%s");
__attribute__((noinline)) int rust_legacy(volatile int *p) { return *p + 2; }
""" % (RUST_V0, RUST_LEGACY)


def test_cxx_symbols_demangled(tmp_path, use_backend):
    use_backend("none")
    lib = ffiguard.CDLL(_compile(tmp_path, "shapes", CXX_SOURCE, cxx=True))
    lib.cxx_entry.argtypes = [ctypes.c_void_p]
    e = catch(lib.cxx_entry, 0x48, cls=ffiguard.SegmentationFault)
    name = "shapes::Widget::poke(int volatile*, long)"
    assert e.symbol == name
    frame = symbolize.symbolize(e.frames)[0]
    assert (frame.symbol, frame.linkage_name) == (name, "_ZN6shapes6Widget4pokeEPVil")
    assert "  faulted in: %s+0x" % name in e.report()
    assert " in %s (libshapes.so+0x" % name in str(e)


@pytest.mark.parametrize("mangled, demangled", [
    (RUST_V0, "<std::sync::poison::mutex::Mutex<alloc::vec::Vec<u8>>>::lock"),
    (RUST_LEGACY, "mycrate::widget::poke")])
def test_rust_symbols_demangled(tmp_path, use_backend, mangled, demangled):
    use_backend("none")
    lib = ffiguard.CDLL(_compile(tmp_path, "rusty", RUST_SOURCE))
    fn = lib[mangled]
    fn.argtypes = [ctypes.c_void_p]
    e = catch(fn, 0x50, cls=ffiguard.SegmentationFault)
    assert e.symbol == demangled
    assert symbolize.symbolize(e.frames)[0].linkage_name == mangled
    assert "  faulted in: %s+0x" % demangled in e.report()


def test_rust_v0_demangler():
    from ffiguard import demangle

    # rustc's own names (a rustc 1.95 cdylib's std), demangled as c++filt does (minus
    # the crate hashes): generics, impls, trait impls, closures, shims, consts, dyn, fn
    cases = {
        "_RINvMNtCsgEmfK2I1SDS_4core3stre18trim_start_matchesReECsgY6Mt91CT9J_14rustc_demangle":
            "<str>::trim_start_matches::<&str>",
        "_RNSNvYNCNvNtNtNtCsjrHSEGnQ3l9_3std3sys11personality3gcc14find_eh_action0INtNtNtCsgEmf"
        "K2I1SDS_4core3ops8function6FnOnceuE9call_once6vtableBe_":
            "<std::sys::personality::gcc::find_eh_action::{closure#0} as "
            "core::ops::function::FnOnce<()>>::call_once::{shim:vtable#0}",
        "_RINvNtCsgEmfK2I1SDS_4core6escape14escape_unicodeKja_ECsgY6Mt91CT9J_14rustc_demangle":
            "core::escape::escape_unicode::<10: usize>",
        "_RNvXs1g_NtCsgEmfK2I1SDS_4core3fmtRDNtB6_5DebugEL_Bx_3fmtB8_":
            "<&dyn core::fmt::Debug as core::fmt::Debug>::fmt",
        "_RNvMs3_NtCslNYArtu3iFV_5alloc7raw_vecINtB5_6RawVecTOhFUKCBN_EuENtNtCsjrHSEGnQ3l9_3std"
        "5alloc6SystemE8grow_oneB13_":
            '<alloc::raw_vec::RawVec<(*mut u8, unsafe extern "C" fn(*mut u8)), '
            'std::alloc::System>>::grow_one',
        "_RINvNtCsgEmfK2I1SDS_4core3ptr13drop_in_placeINtNvNtCsjrHSEGnQ3l9_3std2io17default_"
        "write_fmt7AdapterINtNtBL_6cursor6CursorQShEEEBN_":
            "core::ptr::drop_in_place::<std::io::default_write_fmt::Adapter<"
            "std::io::cursor::Cursor<&mut [u8]>>>",
        "_RNCNCNvNtNtCsjrHSEGnQ3l9_3std3sys9backtrace10__print_fmts_00B9_":
            "std::sys::backtrace::_print_fmt::{closure#1}::{closure#0}",
    }
    for mangled, expected in cases.items():
        assert demangle.rust_v0(mangled) == expected
        assert demangle.demangle(mangled) == expected
    # not v0, malformed, truncated: left as they are
    for name in ("_RaiseException", "_RNvC", "_RNvCs_3abc", "_RB0_", "_RNvCs1234_7mycrate"):
        assert demangle.demangle(name) == name
    assert demangle.rust_legacy("_ZN4core3fmt9Formatter3pad17h0123456789abcdefE") == \
        "core::fmt::Formatter::pad"
    assert demangle.rust_legacy("_ZN5alloc3vec12Vec$LT$T$GT$4push17h0123456789abcdefE") == \
        "alloc::vec::Vec<T>::push"


def test_pointer_arguments_in_hex(libc):
    libc.strlen.argtypes = [ctypes.c_void_p]
    e = catch(libc.strlen, ctypes.c_void_p(0xdeadbee0), cls=ffiguard.SegmentationFault)
    assert "  strlen(c_void_p(0xdeadbee0))   (the Python arguments" in e.report()
    libc.strlen.argtypes = [ctypes.c_char_p]
    e = catch(libc.strlen, ctypes.c_char_p(0xdeadbee0), cls=ffiguard.SegmentationFault)
    assert "  strlen(c_char_p(0xdeadbee0))" in e.report()


def test_abort_registers_leave_out_the_last_fault(crashers):
    # a page fault first: the kernel's per-thread err/trapno/cr2 now hold its values
    e = catch(crashers.ffg_read_null, cls=ffiguard.SegmentationFault)
    regs = e.registers
    if ffiguard._core.TRAP_REGISTERS:
        assert regs["trapno"] == ffiguard._core.TRAP_PAGE_FAULT and "cr2" in regs
    e = catch(crashers.ffg_abort, cls=ffiguard.ForeignAbort)   # sent: no trap, no cr2
    assert e.code <= 0
    text = e.report()
    for name in ffiguard._core.TRAP_REGISTERS:
        assert name not in e.registers
        assert " %s " % name not in text
    assert "rip" in e.registers or "pc" in e.registers
    if not DIVISION_TRAPS:  # aarch64: an integer division by zero does not trap
        return
    e = catch(crashers.ffg_divide, 1, 0, cls=ffiguard.ArithmeticFault)  # a trap, not #PF
    for name in ffiguard._core.PAGE_FAULT_REGISTERS:
        assert name not in e.registers
    if ffiguard._core.TRAP_REGISTERS:
        assert "trapno" in e.registers


def _glibc():
    import platform

    lib, version = platform.libc_ver()
    return lib == "glibc"


@pytest.mark.skipif(not _glibc(), reason="__abort_msg is glibc's")
def test_abort_message_from_glibc(libc, crashers, capfd):
    p = libc.malloc(64)
    e = catch(libc.free, p + 1, cls=ffiguard.ForeignAbort)   # misaligned: not a chunk
    assert e.abort_message == "free(): invalid pointer"
    assert "The C library's message before aborting: free(): invalid pointer" in e.__notes__[0]
    assert "  message:  free(): invalid pointer   (what the C library wrote" in e.report()
    e = catch(crashers.ffg_assert_positive, -3, cls=ffiguard.ForeignAbort)
    assert e.abort_message.endswith("crashers.c:%d: ffg_assert_positive: Assertion `x > 0' "
                                    "failed." % ASSERT_LINE), e.abort_message
    e = catch(crashers.ffg_abort, cls=ffiguard.ForeignAbort)   # abort() writes nothing:
    assert e.abort_message is None                             # not the assert's again
    assert "message:" not in e.report()
    capfd.readouterr()


def _assert_line():
    with open(os.path.join(os.path.dirname(ffiguard.__file__), "_crashers", "crashers.c")) as f:
        return next(i for i, line in enumerate(f, 1) if "assert(x > 0)" in line)


ASSERT_LINE = _assert_line()
