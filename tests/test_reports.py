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
from conftest import (ARG0_REG, CRASHERS_PATH, ENTRY_PAD, PC_REG, UNDER_QEMU, expected_access, map_base,
                      same_file, setup_signatures)

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
        print(str(exc).startswith("SIGSEGV"), "ffiguard.symbolize" in sys.modules,
              "ffiguard.report" in sys.modules)
        exc.__notes__
        print("ffiguard.symbolize" in sys.modules)
    """)
    assert rc == 0, err
    # ffiguard.report is imported by ffiguard (the 3.10 hook) but not the symbolizer
    assert out.split("\n")[:2] == ["True False True", "True"]


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
