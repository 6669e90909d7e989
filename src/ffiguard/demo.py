"""`python -m ffiguard demo`: every kind of fault, caught and reported, in one process.

Each fault is a deliberate crash in the package's test library (ffiguard._crashers,
loaded with ffiguard.CDLL(ffiguard.crashers_path())). Without ffiguard, any one of
them would kill this process.
"""

import ctypes
import os
import platform
import signal
import sys
import tempfile
from typing import Callable, List, NamedTuple, Optional, TextIO

import ffiguard

c_uintptr = ctypes.c_size_t  # uintptr_t on LP64


class Fault(NamedTuple):
    title: str
    call: str  # the call as shown to the user
    expected: type  # the exact exception class
    code_name: str  # the si_code expected on x86-64 (shown; a mismatch is noted, not fatal)
    run: Callable[[], object]


def _library():
    lib = ffiguard.CDLL(ffiguard.crashers_path())
    for name in ("ffg_read_null", "ffg_illegal_instruction", "ffg_abort", "ffg_call_null"):
        getattr(lib, name).argtypes = []  # (lib[name] would be a fresh, uncached object)
    lib.ffg_read_null.restype = ctypes.c_int
    lib.ffg_write_null.argtypes = []
    lib.ffg_write_null.restype = None
    lib.ffg_readonly_page.argtypes = []
    lib.ffg_readonly_page.restype = c_uintptr
    lib.ffg_write_at.argtypes = [c_uintptr, ctypes.c_int]
    lib.ffg_write_at.restype = None
    lib.ffg_read_past_eof.argtypes = [ctypes.c_int, ctypes.POINTER(c_uintptr)]
    lib.ffg_read_past_eof.restype = ctypes.c_int
    lib.ffg_illegal_instruction.restype = None
    lib.ffg_divide.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.ffg_raise.argtypes = [ctypes.c_int]
    lib.ffg_raise.restype = ctypes.c_int
    lib.ffg_divide.restype = ctypes.c_int
    lib.ffg_abort.restype = None
    lib.ffg_assert_positive.argtypes = [ctypes.c_int]
    lib.ffg_assert_positive.restype = ctypes.c_int
    lib.ffg_recurse.argtypes = [ctypes.c_int]
    lib.ffg_recurse.restype = ctypes.c_int
    lib.ffg_call_null.restype = ctypes.c_int
    return lib


def _read_past_eof(lib):
    # A 1-byte file mapped over two pages: touching the second page is SIGBUS.
    with tempfile.TemporaryFile() as f:
        f.write(b"x")
        f.flush()
        where = c_uintptr(0)
        lib.ffg_read_past_eof(f.fileno(), ctypes.byref(where))
        return where.value  # not reached when the fault is caught


_DIVISION_TRAPS = platform.machine() not in ("aarch64", "arm64")


def faults(lib) -> List[Fault]:
    return [
        Fault("NULL read", "ffg_read_null()", ffiguard.SegmentationFault, "SEGV_MAPERR",
              lambda: lib.ffg_read_null()),
        Fault("NULL write", "ffg_write_null()", ffiguard.SegmentationFault, "SEGV_MAPERR",
              lambda: lib.ffg_write_null()),
        Fault("write to a read-only page", "ffg_write_at(ffg_readonly_page(), 1)",
              ffiguard.SegmentationFault, "SEGV_ACCERR",
              lambda: lib.ffg_write_at(lib.ffg_readonly_page(), 1)),
        Fault("read past the end of a mapped 1-byte file", "ffg_read_past_eof(fd, &where)",
              ffiguard.BusError, "BUS_ADRERR", lambda: _read_past_eof(lib)),
        Fault("illegal instruction", "ffg_illegal_instruction()", ffiguard.IllegalInstruction,
              "ILL_ILLOPN", lambda: lib.ffg_illegal_instruction()),
        # AArch64's division by zero does not trap (it gives 0): there the SIGFPE case is
        # the library raising it, as a runtime that checks for zero does.
        Fault("integer divide by zero", "ffg_divide(1, 0)", ffiguard.ArithmeticFault,
              "FPE_INTDIV", lambda: lib.ffg_divide(1, 0)) if _DIVISION_TRAPS else
        Fault("SIGFPE raised by the library (AArch64: division does not trap)",
              "raise(SIGFPE)", ffiguard.ArithmeticFault, "SI_TKILL",
              lambda: lib.ffg_raise(signal.SIGFPE)),
        Fault("abort()", "ffg_abort()", ffiguard.ForeignAbort, "SI_TKILL",
              lambda: lib.ffg_abort()),
        Fault("failed assert()", "ffg_assert_positive(0)", ffiguard.ForeignAbort, "SI_TKILL",
              lambda: lib.ffg_assert_positive(0)),
        Fault("stack overflow (unbounded recursion)", "ffg_recurse(0)",
              ffiguard.ForeignStackOverflow, "SEGV_MAPERR", lambda: lib.ffg_recurse(0)),
        Fault("call through a NULL function pointer", "ffg_call_null()",
              ffiguard.SegmentationFault, "SEGV_MAPERR", lambda: lib.ffg_call_null()),
    ]


# ---- the demo -------------------------------------------------------------------------------


def use_color(out: TextIO) -> bool:
    """Colour only for a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


def run(out: Optional[TextIO] = None, n_frames: int = 4, full: bool = True,
        color: Optional[bool] = None) -> int:
    from ffiguard import report as _report

    out = out or sys.stdout
    color = use_color(out) if color is None else color
    style = _report._Style(color)
    _report.NOTE_FRAMES = n_frames
    lib = _library()
    cases = faults(lib)
    failed = []
    print(style.head(f"ffiguard demo: {len(cases)} deliberate faults in foreign code, pid {os.getpid()}"),
          file=out)
    print(f"library: {ffiguard.crashers_path()}", file=out)
    for i, case in enumerate(cases, 1):
        print("\n" + style.head(f"[{i}/{len(cases)}] {case.title}: {case.call}"), file=out)
        out.flush()
        sys.stderr.flush()  # assert() writes its message to stderr: keep the order readable
        try:
            result = case.run()
        except ffiguard.ForeignFault as e:
            sys.stderr.flush()
            ok = type(e) is case.expected
            if ok:
                print(style.good(f"caught {type(e).__name__}, as expected") + ":", file=out)
            else:
                print(style.bad(f"caught {type(e).__name__}, but expected {case.expected.__name__}") + ":",
                      file=out)
            if full:
                text = e.report(color=color)
            else:
                text = f"{type(e).__name__}: {e}\n" + "\n".join(e.__notes__) + "\n"
            out.write("  " + text.rstrip("\n").replace("\n", "\n  ") + "\n")
            code_name = getattr(e, "code_name", None)
            if code_name != case.code_name:
                print(f"  note: code_name {code_name}, expected {case.code_name} on x86-64", file=out)
            if not ok:
                failed.append(f"{case.title}: {type(e).__name__}, expected {case.expected.__name__}")
        except Exception as e:  # not a ForeignFault at all
            print(style.bad(f"  FAILED: raised {type(e).__name__}: {e}"), file=out)
            failed.append(f"{case.title}: {type(e).__name__}, expected {case.expected.__name__}")
        else:
            print(style.bad(f"  FAILED: returned {result!r} without a fault"), file=out)
            failed.append(f"{case.title}: no exception, expected {case.expected.__name__}")

    print(f"\nffiguard.stats(): {ffiguard.stats()}", file=out)
    if failed:
        print(style.bad(f"\nThe process survived, but {len(failed)} of {len(cases)} faults were not "
                        f"caught as expected:"), file=out)
        for f in failed:
            print(f"  - {f}", file=out)
        return 1
    print(style.good(f"\nThe process (pid {os.getpid()}) survived all {len(cases)} faults.") +
          " State inside the faulting library may be suspect after a recovered fault.", file=out)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from ffiguard.__main__ import main as cli

    return cli(["demo"] + list(argv or []))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
