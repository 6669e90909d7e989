"""Shared fixtures for the ffiguard tests.

`crashers` is the deliberate-crash library loaded through ffiguard (every function
guarded), `plain` is the same library through plain ctypes (nothing guarded).
Both have argtypes/restype set for every ffg_* function.  `run_python(code)` runs a
snippet in a fresh interpreter, for everything that is expected to kill a process.
"""
import ctypes
import os
import signal
import subprocess
import sys
import sysconfig
import textwrap
import threading

import pytest

import ffiguard


# The signature table is kept as source text so that subprocess snippets can exec
# it without importing ffiguard (some of them must set things up before that).
SIGNATURES_SRC = r'''
import ctypes
import platform
import signal


class Point(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int)]


class Big(ctypes.Structure):
    _fields_ = [("a", ctypes.c_long), ("b", ctypes.c_long),
                ("c", ctypes.c_long), ("d", ctypes.c_long)]


CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)
ADDRESS_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_size_t)

_I, _D, _L, _UP = ctypes.c_int, ctypes.c_double, ctypes.c_long, ctypes.c_size_t

# name -> (argtypes, restype); argtypes None for the variadic functions, whose
# arguments the tests pass as explicit ctypes instances.
SIGNATURES = {
    "ffg_read_at": ([_UP], _I),
    "ffg_write_at": ([_UP, _I], None),
    "ffg_read_null": ([], _I),
    "ffg_write_null": ([], None),
    "ffg_readonly_page": ([], _UP),
    "ffg_read_past_eof": ([_I, ctypes.POINTER(_UP)], _I),
    "ffg_illegal_instruction": ([], None),
    "ffg_divide": ([_I, _I], _I),
    "ffg_abort": ([], None),
    "ffg_assert_positive": ([_I], _I),
    "ffg_recurse": ([_I], _I),
    "ffg_call_null": ([], _I),
    "ffg_raise": ([_I], _I),
    "ffg_noop": ([], None),
    "ffg_add": ([_I, _I], _I),
    "ffg_fill": ([ctypes.POINTER(_I), _I], _I),
    "ffg_call_callback": ([CALLBACK, _I], _I),
    "ffg_call_then_read": ([ADDRESS_CALLBACK], _I),
    "ffg_block_and_fault": ([_I], _I),
    "ffg_spin_ms": ([_I], _I),
    "ffg_call_then_write": ([CALLBACK, _UP, _I], None),
    "ffg_install_reader_handler": ([_UP], _I),
    "ffg_mix12": ([_I] * 8 + [_D] * 4, _D),
    "ffg_vsum": (None, _L),
    "ffg_vsumd": (None, _D),
    "ffg_make_point": ([_I, _I], Point),
    "ffg_point_sum": ([Point], _I),
    "ffg_make_big": ([_L], Big),
}


# ---- what differs between architectures (every test states the difference it relies on)
AARCH64 = platform.machine() in ("aarch64", "arm64")
ARCH = "aarch64" if AARCH64 else "x86_64"

# ForeignFault.registers names: the pc, the stack pointer, the first integer argument.
PC_REG, SP_REG, ARG0_REG = ("pc", "sp", "x0") if AARCH64 else ("rip", "rsp", "rdi")

# Integer division by zero traps on x86-64 (SIGFPE, FPE_INTDIV, at the idiv). On AArch64
# sdiv/udiv by zero return 0 and never trap: a SIGFPE there comes from code that raises
# it itself (a runtime checking for zero), so that is the SIGFPE case tested there.
DIVISION_TRAPS = not AARCH64
FPE_CODE_NAME = "FPE_INTDIV" if DIVISION_TRAPS else "SI_TKILL"


def fpe_call(lib):
    """(function, args) of the call into `lib` that ends in SIGFPE on this architecture."""
    return (lib.ffg_divide, (1, 0)) if DIVISION_TRAPS else (lib.ffg_raise, (signal.SIGFPE,))


FPE_SNIPPET = "{0}.ffg_divide(1, 0)" if DIVISION_TRAPS else "{0}.ffg_raise(signal.SIGFPE)"

# The SIGILL si_code of an undefined instruction (crashers' ffg_illegal_instruction):
# x86-64 ud2 gives ILL_ILLOPN; AArch64 udf gives ILL_ILLOPC (Linux on hardware) but
# ILL_ILLOPN under qemu-user, which reports every undefined instruction that way.
def _under_qemu_user():
    # qemu-user reports no AT_MINSIGSTKSZ (0); Linux on AArch64 always does (>= 4 KiB).
    if not AARCH64:
        return False
    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    return getauxval(51) == 0  # AT_MINSIGSTKSZ


UNDER_QEMU = _under_qemu_user()
ILL_CODE_NAME, ILL_CODE = ("ILL_ILLOPC", 1) if AARCH64 and not UNDER_QEMU else ("ILL_ILLOPN", 2)


def expected_access(kind):
    """ForeignFault.access for a data fault of `kind` ("read"/"write"): x86-64 always
    knows (the page-fault error code). AArch64 knows from the ESR record the kernel saves
    in the signal frame: Linux on hardware writes one, qemu-user never does, and then
    access is None (an instruction fetch is still recognised: the address is the pc)."""
    return None if UNDER_QEMU else kind


def setup_signatures(lib):
    for name, (argtypes, restype) in SIGNATURES.items():
        fn = getattr(lib, name)
        if argtypes is not None:
            fn.argtypes = argtypes
        fn.restype = restype
    return lib
'''
exec(SIGNATURES_SRC, globals())

CRASHERS_PATH = ffiguard.crashers_path()


def _entry_pad():
    """Bytes before a crasher function's first real instruction: on AArch64 the library
    is built with -mbranch-protection=standard, so a function reached by an indirect
    call starts with its BTI landing pad, `bti c` (a NOP without BTI)."""
    if not AARCH64:
        return 0
    fn = ctypes.CDLL(CRASHERS_PATH).ffg_read_at
    first = ctypes.c_uint32.from_address(ctypes.cast(fn, ctypes.c_void_p).value).value
    return 4 if first == 0xD503245F else 0  # bti c


ENTRY_PAD = _entry_pad()

# This thread's signal mask before any guarded call: every recovery must leave it so.
INITIAL_MASK = signal.pthread_sigmask(signal.SIG_BLOCK, [])


@pytest.fixture
def crashers():
    """The crashers library through ffiguard: every function is guarded."""
    return setup_signatures(ffiguard.CDLL(CRASHERS_PATH))


@pytest.fixture
def plain():
    """The crashers library through plain ctypes: nothing is guarded."""
    return setup_signatures(ctypes.CDLL(CRASHERS_PATH))


def _function_ranges():
    """[start, end) of every exported ffg_* function, from the sorted symbol addresses."""
    lib = ctypes.CDLL(CRASHERS_PATH)
    names = list(SIGNATURES) + ["PyInit__crashers"]
    addrs = sorted((ctypes.cast(getattr(lib, n), ctypes.c_void_p).value, n) for n in names)
    ranges = {}
    for (start, name), (end, _) in zip(addrs, addrs[1:]):
        ranges[name] = (start, end)
    # The last one (whatever it is) gets a generous bound.
    start, name = addrs[-1]
    ranges[name] = (start, start + 4096)
    return ranges


FUNCTION_RANGES = _function_ranges()


def func_range(name):
    return FUNCTION_RANGES[name]


def pc_in(pc, name):
    """True if pc (a faulting instruction) lies inside crasher function `name`."""
    start, end = FUNCTION_RANGES[name]
    return start <= pc < end


def return_address_in(addr, name):
    """True if addr is a return address into `name` (addr - 1 inside it; handles
    calls to noreturn functions whose return address is one past the end)."""
    start, end = FUNCTION_RANGES[name]
    return start < addr <= end


def map_base(path):
    """Lowest address at which `path` is mapped in this process (its load base)."""
    real = os.path.realpath(path)
    base = None
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and os.path.realpath(parts[5]) == real:
                start = int(parts[0].split("-")[0], 16)
                if base is None or start < base:
                    base = start
    return base


def same_file(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def stack_guard_code(address):
    """The si_code a stack overflow hitting `address` gets, from how libc laid out the
    thread's stack guard (read /proc/self/maps while the thread and its fault are still
    there): a guard page that is a mapping of its own (PROT_NONE, glibc <= 2.42; the
    main thread under qemu-user) faults as SEGV_ACCERR; a guard region installed inside
    the stack's own mapping (glibc 2.43: madvise(MADV_GUARD_INSTALL), no mapping of its
    own) or no mapping at all faults as SEGV_MAPERR. Either way a ForeignStackOverflow."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                return "SEGV_ACCERR" if perms.startswith("---") else "SEGV_MAPERR"
    return "SEGV_MAPERR"


# cffi refuses free-threaded CPython 3.13 (it supports free-threading from 3.14 on), and
# the test extra does not install it there (setup.py): its tests are skipped, saying so.
CFFI_UNSUPPORTED = (
    "cffi does not support free-threaded CPython %d.%d (from 3.14t on it does)" % sys.version_info[:2]
    if sysconfig.get_config_var("Py_GIL_DISABLED") and sys.version_info < (3, 14) else None)


def import_cffi():
    """cffi for a test, or skip with the reason: unsupported on this interpreter, or not
    installed (it is an optional dependency, in the test extra)."""
    if CFFI_UNSUPPORTED:
        pytest.skip(CFFI_UNSUPPORTED, allow_module_level=True)
    return pytest.importorskip("cffi", reason="cffi is not installed (pip install '.[test]')")


def _clean_env():
    env = dict(os.environ)
    env.pop("PYTHONFAULTHANDLER", None)
    env.pop("PYTHONDEVMODE", None)
    return env


def run_python(code, *args, timeout=30):
    """Run `code` with sys.executable [args...] -c in a subprocess.

    The snippet is preceded by PRELUDE (ctypes, os, signal, sys, Point/Big/CALLBACK,
    setup_signatures, CRASHERS_PATH; ffiguard is NOT imported).
    Returns (returncode, stdout, stderr); returncode is -N when killed by signal N.
    """
    code = PRELUDE + textwrap.dedent(code)
    proc = subprocess.run(
        [sys.executable, *args, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_clean_env(),
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    return proc.returncode, proc.stdout, proc.stderr


# Prelude for subprocess snippets: ctypes, the signature table and the crashers
# path, without importing ffiguard (the snippet decides when to do that).
PRELUDE = "import ctypes, os, signal, sys\n" + SIGNATURES_SRC + f"\nCRASHERS_PATH = {CRASHERS_PATH!r}\n"


def run_together(n, target, join_timeout=120):
    """Run target(i) on n threads released at once by a barrier; re-raise the first
    failure (with how many threads failed)."""
    barrier = threading.Barrier(n)
    failures = []

    def body(i):
        try:
            barrier.wait(timeout=30)
            target(i)
        except BaseException as exc:  # noqa: B902 - reported below
            failures.append((i, exc))

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=join_timeout)
        assert not t.is_alive(), "thread hung"
    if failures:
        i, exc = failures[0]
        raise AssertionError(f"thread {i} failed ({len(failures)} failures)") from exc


@pytest.fixture(name="run_python")
def run_python_fixture():
    return run_python


@pytest.fixture
def one_byte_fd(tmp_path):
    """A read-only fd on a one-byte file (mapping its second page gives SIGBUS)."""
    p = tmp_path / "one_byte"
    p.write_bytes(b"x")
    fd = os.open(str(p), os.O_RDONLY)
    yield fd
    os.close(fd)
