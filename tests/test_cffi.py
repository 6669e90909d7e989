"""cffi: ffiguard.guard(lib), guard(ffi, lib), guard(function pointer).

ABI mode (ffi.dlopen of the crashers library and libc) for every kind of fault and
for cffi's calling conventions; API mode with a module compiled into a temporary
directory."""
import errno
import importlib
import os
import signal
import subprocess
import sys
import sysconfig
import threading

import pytest

from conftest import import_cffi

cffi = import_cffi()

import ffiguard  # noqa: E402
# What differs between architectures is named once, in conftest.
from conftest import (  # noqa: E402
    ARG0_REG, CRASHERS_PATH, DIVISION_TRAPS, ENTRY_PAD, ILL_CODE_NAME, SP_REG, UNDER_QEMU,
    expected_access, pc_in, return_address_in, same_file,
)

CDEF = """
int ffg_read_at(uintptr_t address);
void ffg_write_at(uintptr_t address, int value);
int ffg_read_null(void);
void ffg_write_null(void);
uintptr_t ffg_readonly_page(void);
int ffg_read_past_eof(int fd, uintptr_t *where);
void ffg_illegal_instruction(void);
int ffg_divide(int a, int b);
void ffg_abort(void);
int ffg_assert_positive(int x);
int ffg_recurse(int depth);
int ffg_call_null(void);
int ffg_raise(int signum);
void ffg_noop(void);
int ffg_add(int a, int b);
int ffg_fill(int *out, int value);
int ffg_call_callback(int (*cb)(int), int x);
double ffg_mix12(int, int, int, int, int, int, int, int, double, double, double, double);
long ffg_vsum(int n, ...);
double ffg_vsumd(int n, ...);
struct ffg_point { int x, y; };
struct ffg_big { long a, b, c, d; };
struct ffg_point ffg_make_point(int x, int y);
int ffg_point_sum(struct ffg_point p);
struct ffg_big ffg_make_big(long base);
#define FFG_ANSWER 42
enum ffg_colour { FFG_RED, FFG_GREEN = 5 };
"""

LIBC_CDEF = """
size_t strlen(const char *s);
char *strerror(int errnum);
char *getenv(const char *name);
int close(int fd);
int abs(int x);
extern int optind;
"""


@pytest.fixture(scope="module")
def ffi():
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.cdef(LIBC_CDEF)
    return ffi


@pytest.fixture(scope="module")
def plain(ffi):
    return ffi.dlopen(CRASHERS_PATH)


@pytest.fixture(scope="module")
def lib(ffi):
    return ffiguard.guard(ffi, ffi.dlopen(CRASHERS_PATH))


@pytest.fixture(scope="module")
def libc(ffi):
    return ffiguard.guard(ffi.dlopen("libc.so.6"))


def catch(fn, *args, cls=ffiguard.ForeignFault):
    with pytest.raises(cls) as info:
        fn(*args)
    assert type(info.value) is cls
    return info.value


def check(e, signum, code_name, function, symbol=None):
    assert e.signal == signum
    assert e.code_name == code_name
    assert e.function == function
    assert e.frames and e.frames[0] == e.pc
    assert str(e).endswith("during call to %s" % function), str(e)
    if symbol is not None:
        assert pc_in(e.pc, symbol), (hex(e.pc), symbol)
        assert e.symbol == symbol
        assert same_file(e.library, CRASHERS_PATH), e.library


def test_addressof_and_equality(ffi, lib):
    f = lib.ffg_add
    pointer = ffi.addressof(lib, "ffg_add")  # the pointer the guarded function calls
    assert str(ffi.typeof(pointer)) == "<ctype 'int(*)(int, int)'>"
    assert pointer == f and f == pointer and hash(pointer) == hash(f)
    assert pointer(40, 2) == 42  # through the stub: unguarded, same function
    assert f == lib.ffg_add and f != lib.ffg_noop


# ---------------------------------------------------------------- faults (ABI mode)


def test_read_null(lib):
    e = catch(lib.ffg_read_null, cls=ffiguard.SegmentationFault)
    check(e, signal.SIGSEGV, "SEGV_MAPERR", "ffg_read_null", "ffg_read_at")
    assert (e.code, e.address, e.access) == (1, 0, expected_access("read"))
    assert return_address_in(e.frames[1], "ffg_read_null")


@pytest.mark.parametrize("address", [0x10, 0xDEAD0000])
def test_read_at(lib, address):
    e = catch(lib.ffg_read_at, address, cls=ffiguard.SegmentationFault)
    check(e, signal.SIGSEGV, "SEGV_MAPERR", "ffg_read_at", "ffg_read_at")
    assert e.address == address
    assert e.registers[ARG0_REG] == address


def test_write_null(lib):
    e = catch(lib.ffg_write_null, cls=ffiguard.SegmentationFault)
    check(e, signal.SIGSEGV, "SEGV_MAPERR", "ffg_write_null", "ffg_write_at")
    assert (e.address, e.access) == (0, expected_access("write"))


def test_write_readonly_page(lib, plain):
    page = plain.ffg_readonly_page()
    assert page and lib.ffg_readonly_page() == page
    e = catch(lib.ffg_write_at, page, 7, cls=ffiguard.SegmentationFault)
    check(e, signal.SIGSEGV, "SEGV_ACCERR", "ffg_write_at", "ffg_write_at")
    assert (e.code, e.address, e.access) == (2, page, expected_access("write"))
    assert lib.ffg_read_at(page) == 0


def test_call_null(lib):
    e = catch(lib.ffg_call_null, cls=ffiguard.SegmentationFault)
    check(e, signal.SIGSEGV, "SEGV_MAPERR", "ffg_call_null")
    assert (e.address, e.pc, e.access, e.symbol) == (0, 0, "execute", None)


def test_bus_error(lib, ffi, tmp_path):
    path = tmp_path / "one_byte"
    path.write_bytes(b"x")
    fd = os.open(str(path), os.O_RDONLY)
    try:
        where = ffi.new("uintptr_t *")
        e = catch(lib.ffg_read_past_eof, fd, where, cls=ffiguard.BusError)
    finally:
        os.close(fd)
    check(e, signal.SIGBUS, "BUS_ADRERR", "ffg_read_past_eof", "ffg_read_past_eof")
    assert where[0] and e.address == where[0]


def test_illegal_instruction(lib, plain, ffi):
    e = catch(lib.ffg_illegal_instruction, cls=ffiguard.IllegalInstruction)
    check(e, signal.SIGILL, ILL_CODE_NAME, "ffg_illegal_instruction", "ffg_illegal_instruction")
    start = int(ffi.cast("uintptr_t", plain.ffg_illegal_instruction)) + ENTRY_PAD
    assert e.pc == e.address == start


@pytest.mark.parametrize("a, b", [(1, 0), (-(2 ** 31), -1)])
def test_divide(lib, a, b):
    if not DIVISION_TRAPS:
        # AArch64: no divide trap (x / 0 == 0, INT_MIN / -1 == INT_MIN); the SIGFPE
        # there is the library raising it (test_raised_signals).
        assert lib.ffg_divide(a, b) == (0 if b == 0 else a)
        return
    e = catch(lib.ffg_divide, a, b, cls=ffiguard.ArithmeticFault)
    check(e, signal.SIGFPE, "FPE_INTDIV", "ffg_divide", "ffg_divide")
    assert e.address == e.pc
    assert lib.ffg_divide(7, 2) == 3


def test_abort_and_assert(lib, capfd):
    for fn, args, name in ((lib.ffg_abort, (), "ffg_abort"),
                           (lib.ffg_assert_positive, (0,), "ffg_assert_positive")):
        e = catch(fn, *args, cls=ffiguard.ForeignAbort)
        check(e, signal.SIGABRT, "SI_TKILL", name)
        assert e.address is None
        assert os.path.basename(e.library).startswith("libc")
        assert any(return_address_in(f, name) for f in e.frames)
    assert "Assertion `x > 0' failed" in capfd.readouterr().err
    assert lib.ffg_assert_positive(5) == 5


@pytest.mark.parametrize("signum, cls", [
    (signal.SIGSEGV, ffiguard.SegmentationFault),
    (signal.SIGBUS, ffiguard.BusError),
    (signal.SIGILL, ffiguard.IllegalInstruction),
    (signal.SIGFPE, ffiguard.ArithmeticFault),
    (signal.SIGABRT, ffiguard.ForeignAbort),
])
def test_raised_signals(lib, signum, cls):
    e = catch(lib.ffg_raise, signum, cls=cls)
    check(e, signum, "SI_TKILL", "ffg_raise")
    assert e.address is None


def test_stack_overflow(lib):
    e = catch(lib.ffg_recurse, 0, cls=ffiguard.ForeignStackOverflow)
    # qemu-user: a PROT_NONE guard page below the main stack (SEGV_ACCERR)
    code = "SEGV_ACCERR" if UNDER_QEMU else "SEGV_MAPERR"
    check(e, signal.SIGSEGV, code, "ffg_recurse", "ffg_recurse")
    assert abs(e.address - e.registers[SP_REG]) <= 4096
    assert lib.ffg_add(2, 3) == 5


def test_libc_fault_names_function_and_library(libc):
    e = catch(libc.strlen, ffiguard_null(), cls=ffiguard.SegmentationFault)
    check(e, signal.SIGSEGV, "SEGV_MAPERR", "strlen")
    assert e.address == 0
    assert os.path.basename(e.library).startswith("libc")


def ffiguard_null():
    return cffi.FFI().NULL


def test_report_names_the_function(lib):
    e = catch(lib.ffg_write_at, 0x10, 5, cls=ffiguard.SegmentationFault)
    report = e.report()
    assert "ffg_write_at(16, 5)" in report  # the call, with the Python arguments
    verb = "writing" if expected_access("write") else "at"  # AArch64 under qemu: no ESR
    assert "%s 0x10 in ffg_write_at" % verb in report
    e = catch(lib.ffg_read_null, cls=ffiguard.SegmentationFault)
    assert "during call to ffg_read_null" in e.report()  # the function called ...
    assert "ffg_read_at" in e.report()  # ... and the one that faulted
    assert e.__traceback__ is not None


def test_guarded_call_after_many_faults(lib):
    for i in range(200):
        with pytest.raises(ffiguard.SegmentationFault):
            lib.ffg_read_null()
        assert lib.ffg_add(i, 1) == i + 1


# ---------------------------------------------------------------- calls keep cffi's behaviour


def test_results_and_types(lib, plain, ffi):
    assert lib.ffg_add(2, 3) == 5 and type(lib.ffg_add(2, 3)) is int
    assert lib.ffg_add(2 ** 31 - 1, 1) == -(2 ** 31)
    assert lib.ffg_noop() is None
    args = (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 0.25, 0.125, 1.5)
    assert lib.ffg_mix12(*args) == plain.ffg_mix12(*args)
    assert type(lib.ffg_mix12(*args)) is float


def test_structs_by_value(lib, ffi):
    p = lib.ffg_make_point(3, 4)
    assert ffi.typeof(p) is ffi.typeof("struct ffg_point")
    assert (p.x, p.y) == (3, 4)
    assert lib.ffg_point_sum(p) == 3004
    assert lib.ffg_point_sum({"x": 1, "y": 2}) == 1002
    b = lib.ffg_make_big(10)
    assert (b.a, b.b, b.c, b.d) == (10, 11, 12, 13)


def test_pointers(lib, ffi):
    out = ffi.new("int *")
    assert lib.ffg_fill(out, 77) == 1
    assert out[0] == 77
    arr = ffi.new("int[4]")
    lib.ffg_fill(arr + 2, 5)
    assert list(arr) == [0, 0, 5, 0]


def test_variadic(lib, ffi):
    assert lib.ffg_vsum(3, ffi.cast("long", 1), ffi.cast("long", 2), ffi.cast("long", 3)) == 14
    assert lib.ffg_vsumd(2, ffi.cast("double", 1.5), ffi.cast("double", 2.0)) == 5.5
    with pytest.raises(TypeError):
        lib.ffg_vsum(1, 2)  # cffi needs the type of a variadic argument


def test_char_pointers(libc, ffi):
    assert libc.strlen(b"hello") == 5
    assert ffi.string(libc.strerror(errno.ENOENT)) == os.strerror(errno.ENOENT).encode()
    os.environ["FFIGUARD_CFFI_TEST"] = "yes"
    assert ffi.string(libc.getenv(b"FFIGUARD_CFFI_TEST")) == b"yes"
    assert libc.getenv(b"FFIGUARD_CFFI_NOT_SET") == ffi.NULL


def test_errno(libc, ffi):
    ffi.errno = 0
    assert libc.close(-1) == -1
    assert ffi.errno == errno.EBADF


def test_callbacks(lib, ffi):
    cb = ffi.callback("int(int)", lambda x: x * 3)
    assert lib.ffg_call_callback(cb, 7) == 22  # cb(x) + 1
    seen = []

    @ffi.callback("int(int)")
    def faulting(x):
        try:
            lib.ffg_read_at(x)  # a guarded call inside the callback faults
        except ffiguard.SegmentationFault as e:
            seen.append((e.function, e.address))
            return -1
        return 0

    assert lib.ffg_call_callback(faulting, 0x20) == 0
    assert seen == [("ffg_read_at", 0x20)]


def test_guarded_function_passed_as_function_pointer(lib, plain, ffi, libc):
    # cffi only takes cdata for a function-pointer argument, not a GuardedFunction:
    # pass its __wrapped__ (cdata calling the guard stub, which just jumps to the
    # target when called from C: unguarded) or the library's own function.
    guarded_abs = libc.abs
    with pytest.raises(TypeError):
        lib.ffg_call_callback(guarded_abs, -5)
    wrapped = guarded_abs.__wrapped__
    assert ffi.typeof(wrapped) is ffi.typeof("int(*)(int)")
    assert ffiguard._core.stub_target(int(ffi.cast("uintptr_t", wrapped))) == int(
        ffi.cast("uintptr_t", libc.__wrapped__.abs))
    assert lib.ffg_call_callback(wrapped, -5) == 6  # abs(-5) + 1


@pytest.mark.parametrize("args", [("x", 1), (1,), (1, 2, 3), (1.5, 2), (None, 1), (2 ** 40, 1)])
def test_bad_arguments_raise_as_in_cffi(lib, plain, args):
    with pytest.raises((TypeError, OverflowError)) as want:
        plain.ffg_add(*args)
    with pytest.raises(type(want.value)) as got:
        lib.ffg_add(*args)
    assert str(got.value) == str(want.value)


def test_keyword_arguments_raise_as_in_cffi(lib, plain):
    with pytest.raises(TypeError) as want:
        plain.ffg_add(a=1, b=2)
    with pytest.raises(TypeError) as got:
        lib.ffg_add(a=1, b=2)
    assert str(got.value) == str(want.value)


def test_constants_enums_globals_and_dir(libc, lib, plain, ffi):
    assert lib.FFG_ANSWER == 42
    assert (lib.FFG_RED, lib.FFG_GREEN) == (0, 5)
    saved = libc.optind
    try:
        libc.optind = 7
        assert libc.optind == 7
        assert ffi.dlopen("libc.so.6").optind == 7
    finally:
        libc.optind = saved
    assert "ffg_add" in dir(lib) and "FFG_ANSWER" in dir(lib)
    with pytest.raises(AttributeError):
        lib.no_such_function


def test_functions_are_guarded_once_and_cached(lib):
    assert isinstance(lib, ffiguard.GuardedLibrary)
    f = lib.ffg_add
    assert isinstance(f, ffiguard.GuardedFunction)
    assert lib.ffg_add is f
    assert f.__guarded_name__ == "ffg_add"
    assert ffiguard.guard(f) is f
    assert ffiguard.guard(lib) is lib


def test_on_fault_per_library(ffi):
    q = ffiguard.guard(ffi, ffi.dlopen(CRASHERS_PATH), on_fault="quarantine")
    other = ffiguard.guard(ffi, ffi.dlopen(CRASHERS_PATH))
    with pytest.raises(ffiguard.SegmentationFault):
        q.ffg_read_null()
    with pytest.raises(ffiguard.LibraryQuarantined):
        q.ffg_add(1, 2)
    assert other.ffg_add(1, 2) == 3
    assert ffiguard.release(q)
    assert q.ffg_add(1, 2) == 3


def test_function_pointer_alone(plain, ffi):
    g = ffiguard.guard(plain.ffg_read_null)
    assert isinstance(g, ffiguard.GuardedFunction)
    e = catch(g, cls=ffiguard.SegmentationFault)
    assert e.function == "ffg_read_null"  # named after the symbol at its address
    anon = ffiguard.guard(ffi.cast("int(*)(uintptr_t)", plain.ffg_read_at), name="read_at")
    e = catch(anon, 0x50, cls=ffiguard.SegmentationFault)
    assert (e.function, e.address, e.symbol) == ("read_at", 0x50, "ffg_read_at")
    # the original cdata still works, unguarded
    assert plain.ffg_add(1, 2) == 3


def test_guard_rejects_other_things(ffi, plain):
    for bad in (42, None, "ffg_add", lambda: 0, print, ffi.new("int *"), ffi):
        with pytest.raises(TypeError):
            ffiguard.guard(bad)
    with pytest.raises(TypeError):
        ffiguard.guard(ffi, 42)
    with pytest.raises(TypeError):
        ffiguard.guard(plain, plain)
    with pytest.raises(ValueError):
        ffiguard.guard(ffi.cast("int(*)(void)", 0))
    with pytest.raises(ValueError):
        ffiguard.guard(ffi, plain, on_fault="ignore")


def test_dlclose(ffi):
    g = ffiguard.guard(ffi, ffi.dlopen(CRASHERS_PATH))
    assert g.ffg_add(1, 1) == 2
    ffi.dlclose(g)
    with pytest.raises(ValueError):  # cffi: "library ... has already been closed"
        g.ffg_add


def test_threads_fault_concurrently(lib):
    errors = []
    calls = [
        (lib.ffg_read_at, (0x30,), ffiguard.SegmentationFault, 0x30),
        (lib.ffg_raise, (signal.SIGFPE,), ffiguard.ArithmeticFault, None),
        (lib.ffg_abort, (), ffiguard.ForeignAbort, None),
        (lib.ffg_illegal_instruction, (), ffiguard.IllegalInstruction, None),
    ]
    start = threading.Barrier(8)

    def work(i):
        start.wait()
        fn, args, cls, address = calls[i % len(calls)]
        for n in range(50):
            try:
                fn(*args)
            except cls as e:
                if address is not None and e.address != address:
                    errors.append(("address", e.address))
                if lib.ffg_add(n, i) != n + i:
                    errors.append(("add", n, i))
            except BaseException as e:  # noqa: B902
                errors.append(repr(e))
            else:
                errors.append("no fault")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_unguarded_cffi_fault_still_kills(run_python):
    rc, out, err = run_python("""
        import cffi, ffiguard
        ffi = cffi.FFI()
        ffi.cdef("int ffg_read_null(void);")
        plain = ffi.dlopen(CRASHERS_PATH)
        guarded = ffiguard.guard(ffi, ffi.dlopen(CRASHERS_PATH))
        try:
            guarded.ffg_read_null()
        except ffiguard.SegmentationFault:
            print("caught", flush=True)
        plain.ffg_read_null()
    """)
    assert out == "caught\n"
    assert rc == -signal.SIGSEGV, (rc, err)


# ---------------------------------------------------------------- API mode


API_CDEF = """
struct api_point { int x, y; };
int api_add(int a, int b);
int api_read_at(uintptr_t address);
int api_divide(int a, int b);
int api_store(int address, int value);
int api_point_sum(struct api_point p);
struct api_point api_make_point(int x, int y);
int api_call(int (*cb)(int), int x);
int ffg_add(int a, int b);
int ffg_read_null(void);
extern int api_counter;
extern int (*api_fp)(int, int);
#define API_ANSWER ...
"""

API_SOURCE = r"""
#include <stdint.h>
struct api_point { int x, y; };
#define API_ANSWER 42
int api_counter = 5;
__attribute__((noinline)) int api_add(int a, int b) { return a + b; }
__attribute__((noinline)) int api_read_at(uintptr_t address) { return *(volatile int *)address; }
__attribute__((noinline)) int api_divide(int a, int b) { volatile int x = a, y = b; return x / y; }
__attribute__((noinline)) int api_store(int address, int value)
{
    *(volatile int *)(uintptr_t)address = value;
    return 0;
}
int api_point_sum(struct api_point p) { return p.x * 1000 + p.y; }
struct api_point api_make_point(int x, int y) { struct api_point p = {x, y}; return p; }
int api_call(int (*cb)(int), int x) { return cb(x) + 1; }
int (*api_fp)(int, int) = api_add;
int ffg_add(int a, int b);
int ffg_read_null(void);
"""


def _build_api_module(directory, name):
    ffi = cffi.FFI()
    ffi.cdef(API_CDEF)
    crashers_dir = os.path.dirname(CRASHERS_PATH)
    ffi.set_source(name, API_SOURCE, extra_link_args=[CRASHERS_PATH, "-Wl,-rpath," + crashers_dir])
    try:
        import setuptools  # noqa: F401  (cffi's compile() needs it)
    except ImportError:
        # no setuptools (Python 3.12+ venvs): emit the C and compile it ourselves
        c_file = os.path.join(directory, name + ".c")
        ffi.emit_c_code(c_file)
        cc = os.environ.get("CC", "cc")
        out = os.path.join(directory, name + sysconfig.get_config_var("EXT_SUFFIX"))
        subprocess.run([cc, "-shared", "-fPIC", "-O1", "-I" + sysconfig.get_paths()["include"],
                        c_file, "-o", out, CRASHERS_PATH, "-Wl,-rpath," + crashers_dir],
                       check=True, capture_output=True)
    else:
        ffi.compile(tmpdir=str(directory))


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cffi_api")
    name = "_ffiguard_api_test"
    _build_api_module(str(directory), name)
    sys.path.insert(0, str(directory))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(str(directory))
    yield module
    sys.modules.pop(name, None)


def test_api_mode_calls(api):
    ffi, plain = api.ffi, api.lib
    lib = ffiguard.guard(ffi, plain)
    assert type(plain.api_add).__name__ == "builtin_function_or_method"
    assert isinstance(lib.api_add, ffiguard.GuardedFunction)
    assert lib.api_add(2, 3) == 5
    assert lib.ffg_add(4, 5) == 9
    p = lib.api_make_point(3, 4)
    assert (p.x, p.y) == (3, 4)
    assert lib.api_point_sum(p) == 3004
    assert lib.api_call(ffi.callback("int(int)", lambda x: x * 2), 5) == 11
    with pytest.raises(TypeError):
        lib.api_add("x", 1)
    with pytest.raises(TypeError):
        lib.api_add(1)


def test_api_mode_faults(api):
    lib = ffiguard.guard(api.ffi, api.lib)
    e = catch(lib.api_read_at, 0x40, cls=ffiguard.SegmentationFault)
    check(e, signal.SIGSEGV, "SEGV_MAPERR", "api_read_at")
    assert e.address == 0x40
    assert e.symbol == "api_read_at"
    assert same_file(e.library, api.__file__)
    e = catch(lib.api_store, 0x60, 1, cls=ffiguard.SegmentationFault)
    check(e, signal.SIGSEGV, "SEGV_MAPERR", "api_store")
    assert (e.address, e.access, e.symbol) == (0x60, expected_access("write"), "api_store")
    if DIVISION_TRAPS:
        e = catch(lib.api_divide, 1, 0, cls=ffiguard.ArithmeticFault)
        check(e, signal.SIGFPE, "FPE_INTDIV", "api_divide")
    # a library the module links to, called through the module
    e = catch(lib.ffg_read_null, cls=ffiguard.SegmentationFault)
    check(e, signal.SIGSEGV, "SEGV_MAPERR", "ffg_read_null", "ffg_read_at")
    assert lib.api_add(1, 1) == 2


def test_api_mode_constants_and_globals(api):
    lib = ffiguard.guard(api.ffi, api.lib)
    assert lib.API_ANSWER == 42
    assert lib.api_counter == 5
    lib.api_counter = 9
    assert api.lib.api_counter == 9
    api.lib.api_counter = 5
    assert "api_add" in dir(lib) and "api_counter" in dir(lib)


def test_api_mode_lib_alone_finds_its_ffi(api):
    lib = ffiguard.guard(api.lib)
    assert lib.api_add(1, 2) == 3
    with pytest.raises(ffiguard.SegmentationFault):
        lib.api_read_at(0)


def test_api_mode_function_pointer_variable_passes_through(api):
    # a global variable holding a function pointer can change: it is read afresh on
    # every access, as cffi does, and not guarded (ffiguard.guard() it to call it guarded)
    ffi = api.ffi
    lib = ffiguard.guard(ffi, api.lib)
    fp = lib.api_fp
    assert not isinstance(fp, ffiguard.GuardedFunction)
    assert ffi.typeof(fp) is ffi.typeof("int(*)(int, int)")
    assert fp(2, 2) == 4
    lib.api_fp = ffi.addressof(api.lib, "api_store")
    try:
        assert ffi.typeof(lib.api_fp) is ffi.typeof("int(*)(int, int)")
        with pytest.raises(ffiguard.SegmentationFault) as info:
            ffiguard.guard(lib.api_fp)(0, 1)
        # ffi.addressof gives cffi's static wrapper, which has no symbol of its own
        # (api_store, where the fault is, does)
        assert info.value.function.startswith("<int(*)(int, int) at 0x")
        assert info.value.symbol == "api_store"
    finally:
        lib.api_fp = ffi.addressof(api.lib, "api_add")


def test_benchmark_cffi_rows():
    from ffiguard import bench

    result = bench.run(rounds=1, n_calls=10, n_faults=2, isolate=False)
    rows = {r["name"]: r for r in result["calls"]}
    assert rows["cffi ffg_noop()"]["goal"] is True
    assert "cffi ffg_add(1, 2)" in rows
    assert rows["cffi API-mode ffg_add(1, 2)"]["goal"] == bench.GOAL_ADDED_ONLY
    assert "cffi API-mode ffg_add(1, 2) (guard(ffi, lib))" in rows
    assert [s for s in result["skipped"] if s.startswith("cffi")] == []
    assert any(g["what"].startswith("cffi ffg_noop()") for g in result["goals"])
    assert "cffi ffg_noop()" in bench.format_table(result)
