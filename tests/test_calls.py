"""Code written for ctypes keeps working unchanged through the guard."""
import ctypes
import errno
import os
import re
import signal

import pytest

import ffiguard
from conftest import CALLBACK, CRASHERS_PATH, Big, Point, expected_access, map_base, pc_in

c_int, c_long, c_double, c_void_p = ctypes.c_int, ctypes.c_long, ctypes.c_double, ctypes.c_void_p


@pytest.fixture
def libc():
    return ffiguard.CDLL("libc.so.6")


# ---------------------------------------------------------------- the objects


def test_cdll_is_a_ctypes_cdll(crashers):
    assert isinstance(crashers, ctypes.CDLL)
    assert isinstance(crashers, ffiguard.CDLL)
    assert crashers._name == CRASHERS_PATH


def test_functions_are_guarded_function_objects(crashers):
    for fn in (crashers.ffg_add, crashers["ffg_add"]):
        assert isinstance(fn, ffiguard.GuardedFunction)
        assert fn.__name__ == "ffg_add"
        assert isinstance(fn.__wrapped__, ctypes._CFuncPtr)
        assert fn._as_parameter_ is fn.__wrapped__
    assert crashers["ffg_add"](2, 3) == 5
    # Attributes set on lib.fn stay set for the next lib.fn (as with ctypes).
    crashers.ffg_noop.restype = c_int
    assert crashers.ffg_noop.restype is c_int


def test_guarded_function_equals_and_hashes_as_its_function(crashers):
    g = crashers.ffg_add
    other = ffiguard.guard(g.__wrapped__)  # a second wrapper of the same function object
    assert other is not g
    assert g == g.__wrapped__ and g.__wrapped__ == g and g == other and not (g != other)
    assert hash(g) == hash(other)  # ctypes' own function objects are unhashable
    assert {g: 1}[other] == 1
    assert g != crashers.ffg_noop and g != "ffg_add" and g != None  # noqa: E711
    with pytest.raises(TypeError):
        g < other


def test_attribute_forwarding(crashers):
    g = crashers.ffg_add
    assert list(g.argtypes) == [c_int, c_int]
    assert g.argtypes is g.__wrapped__.argtypes
    g.restype = c_long
    assert g.restype is c_long
    assert g.__wrapped__.restype is c_long
    assert g(2, 3) == 5
    g.argtypes = [c_long, c_long]
    g.restype = c_int
    assert list(g.__wrapped__.argtypes) == [c_long, c_long]
    assert g.__wrapped__.restype is c_int
    assert g(2 ** 31 - 1, 1) == -(2 ** 31)  # the C function adds ints
    assert g.errcheck is None


def test_loader(crashers):
    lib = ffiguard.cdll.LoadLibrary(CRASHERS_PATH)
    assert isinstance(lib, ffiguard.CDLL)
    assert isinstance(lib.ffg_add, ffiguard.GuardedFunction)
    lib.ffg_read_null.restype = c_int
    with pytest.raises(ffiguard.SegmentationFault):
        lib.ffg_read_null()


def test_cdll_accepts_ctypes_arguments(plain):
    lib = ffiguard.CDLL(CRASHERS_PATH, mode=os.RTLD_NOW | os.RTLD_GLOBAL,
                        use_errno=True, use_last_error=True)
    assert lib.ffg_add(20, 22) == 42
    lib2 = ffiguard.CDLL("crashers-by-handle", handle=plain._handle)
    assert lib2._handle == plain._handle
    with pytest.raises(ffiguard.SegmentationFault):
        lib2.ffg_read_null()
    main = ffiguard.CDLL(None)  # the process's global namespace, like ctypes.CDLL(None)
    assert main.strlen(b"abcd") == 4


# ---------------------------------------------------------------- argtypes / restype / errcheck


def test_argument_errors_like_ctypes(crashers):
    with pytest.raises(ctypes.ArgumentError):
        crashers.ffg_add("x", 1)
    with pytest.raises(TypeError):
        crashers.ffg_add(1)
    assert crashers.ffg_add(1, 2) == 3


def test_errcheck(crashers):
    seen = []

    def check(result, func, args):
        seen.append((result, func.__name__, args))
        return result * 10

    g = crashers.ffg_add
    g.errcheck = check
    assert g.__wrapped__.errcheck is check
    assert g.errcheck is check
    assert g(2, 3) == 50
    assert seen == [(5, "ffg_add", (2, 3))]


def test_errcheck_exception_propagates(crashers):
    def check(result, func, args):
        raise ValueError(f"bad result {result}")

    crashers.ffg_add.errcheck = check
    with pytest.raises(ValueError, match="bad result 5"):
        crashers.ffg_add(2, 3)


def test_fault_wins_over_errcheck(crashers):
    def check(result, func, args):
        return result

    g = crashers.ffg_read_null
    g.errcheck = check
    with pytest.raises(ffiguard.SegmentationFault) as info:
        g()
    assert info.value.address == 0
    assert info.value.function == "ffg_read_null"


def test_fault_not_lost_to_raising_errcheck(crashers):
    def check(result, func, args):
        raise ValueError("errcheck saw a garbage result")

    g = crashers.ffg_read_null
    g.errcheck = check
    with pytest.raises(ffiguard.SegmentationFault) as info:
        g()
    assert info.value.function == "ffg_read_null"
    # No fault record left behind for the next call.
    assert crashers.ffg_add(1, 1) == 2


def test_fault_not_consumed_by_guarded_call_in_errcheck(crashers):
    inner = ffiguard.CDLL(CRASHERS_PATH).ffg_add
    inner_results = []

    def check(result, func, args):
        inner_results.append(inner(20, 22))  # a successful guarded call in errcheck
        return result

    g = crashers.ffg_read_null
    g.errcheck = check
    with pytest.raises(ffiguard.SegmentationFault) as info:
        g()
    assert info.value.function == "ffg_read_null"
    assert info.value.address == 0
    assert inner_results in ([], [42])


def test_fault_wins_over_failing_restype_conversion(crashers):
    def restype(value):
        if value == 0:
            raise ValueError("result conversion failed")
        return value

    g = crashers.ffg_read_null
    g.restype = restype
    with pytest.raises(ffiguard.SegmentationFault) as info:
        g()
    assert info.value.address == 0
    assert crashers.ffg_add(1, 1) == 2


# ---------------------------------------------------------------- prototypes


def test_paramflags_prototype_guarded(plain):
    proto = ctypes.CFUNCTYPE(c_int, ctypes.POINTER(c_int), c_int)
    f = proto(("ffg_fill", plain), ((2, "out"), (1, "value", 9)))
    g = ffiguard.guard(f)
    assert isinstance(g, ffiguard.GuardedFunction)
    assert g.__wrapped__ is f
    assert g(5) == 5
    assert g(value=6) == 6
    assert g() == 9


def test_paramflags_prototype_from_guarded_library(crashers):
    proto = ctypes.CFUNCTYPE(c_int, ctypes.POINTER(c_int), c_int)
    g = ffiguard.guard(proto(("ffg_fill", crashers), ((2, "out"), (1, "value"))))
    assert g(value=-3) == -3


def test_paramflags_prototype_fault(plain):
    proto = ctypes.CFUNCTYPE(c_int, ctypes.c_size_t)
    g = ffiguard.guard(proto(("ffg_read_at", plain), ((1, "address"),)))
    with pytest.raises(ffiguard.SegmentationFault) as info:
        g(address=0x40)
    assert info.value.address == 0x40
    assert info.value.symbol == "ffg_read_at"


# ---------------------------------------------------------------- errno


def test_use_errno_libc():
    libc = ffiguard.CDLL("libc.so.6", use_errno=True)
    libc.close.argtypes = [c_int]
    libc.close.restype = c_int
    ctypes.set_errno(0)
    assert libc.close(-1) == -1
    assert ctypes.get_errno() == errno.EBADF


def test_use_errno_is_passed_through():
    lib = ffiguard.CDLL(CRASHERS_PATH, use_errno=True)
    lib.ffg_add.argtypes = [c_int, c_int]
    ctypes.set_errno(123)
    assert lib.ffg_add(1, 2) == 3
    assert ctypes.get_errno() == 123  # the guard does not clobber errno


# ---------------------------------------------------------------- pointers and structs


def test_byref_out_param(crashers):
    out = c_int(0)
    assert crashers.ffg_fill(ctypes.byref(out), 42) == 1
    assert out.value == 42
    assert crashers.ffg_fill(ctypes.pointer(out), -7) == 1
    assert out.value == -7
    arr = (c_int * 3)(1, 2, 3)
    assert crashers.ffg_fill(arr, 99) == 1
    assert list(arr) == [99, 2, 3]


def test_struct_return_in_registers(crashers):
    p = crashers.ffg_make_point(3, -4)
    assert isinstance(p, Point)
    assert (p.x, p.y) == (3, -4)


def test_struct_argument_by_value(crashers):
    assert crashers.ffg_point_sum(Point(5, 7)) == 5007
    assert crashers.ffg_point_sum(crashers.ffg_make_point(-2, 9)) == -1991


def test_struct_return_through_hidden_pointer(crashers):
    b = crashers.ffg_make_big(10 ** 12)
    assert isinstance(b, Big)
    assert (b.a, b.b, b.c, b.d) == (10 ** 12, 10 ** 12 + 1, 10 ** 12 + 2, 10 ** 12 + 3)


def test_mix12_exact_weighted_sum(crashers, plain):
    ints = [11, -22, 33, -44, 55, -66, 77, -88]
    doubles = [0.5, 1.25, -2.75, 1024.0625]
    args = ints + doubles
    expected = sum(v * (i + 1) for i, v in enumerate(args))
    assert crashers.ffg_mix12(*args) == expected
    assert plain.ffg_mix12(*args) == expected
    # Swapping two stack-passed ints changes the result: the test can tell.
    swapped = ints[:6] + [ints[7], ints[6]] + doubles
    assert crashers.ffg_mix12(*swapped) != expected


@pytest.mark.parametrize("n", [0, 1, 5, 6, 20])
def test_variadic_longs(crashers, n):
    values = [(-1) ** i * (2 ** 40 + i * 1000003) for i in range(n)]
    expected = sum(v * (i + 1) for i, v in enumerate(values))
    assert crashers.ffg_vsum(c_int(n), *[c_long(v) for v in values]) == expected


@pytest.mark.parametrize("n", [0, 1, 8, 9, 20])
def test_variadic_doubles(crashers, n):
    values = [i + 0.5 if i % 2 else -(i + 0.25) for i in range(n)]
    expected = sum(v * (i + 1) for i, v in enumerate(values))
    assert crashers.ffg_vsumd(c_int(n), *[c_double(v) for v in values]) == expected


# ---------------------------------------------------------------- functions as values


def test_python_callback(crashers):
    seen = []

    @CALLBACK
    def triple(x):
        seen.append(x)
        return 3 * x

    assert crashers.ffg_call_callback(triple, 14) == 43
    assert seen == [14]


def test_guarded_function_passed_as_argument(crashers, libc):
    absf = libc.abs
    absf.argtypes = [c_int]
    absf.restype = c_int
    cc = crashers.ffg_call_callback
    cc.argtypes = [c_void_p, c_int]
    assert cc(absf, -20) == 21
    cc.argtypes = None
    assert cc(absf, c_int(-30)) == 31


def test_fault_in_function_passed_as_argument_is_caught_by_outer_call(crashers):
    cc = crashers.ffg_call_callback
    cc.argtypes = [c_void_p, c_int]
    with pytest.raises(ffiguard.SegmentationFault) as info:
        cc(crashers.ffg_read_at, 0x77)
    e = info.value
    assert e.address == 0x77
    assert e.function == "ffg_call_callback"
    assert pc_in(e.pc, "ffg_read_at")
    assert e.symbol == "ffg_read_at"


def test_null_callback_faults_in_outer_call(crashers):
    with pytest.raises(ffiguard.SegmentationFault) as info:
        crashers.ffg_call_callback(CALLBACK(), 1)  # a NULL function pointer
    e = info.value
    assert e.pc == 0 and e.address == 0
    assert e.access == "execute"
    assert e.function == "ffg_call_callback"


def test_cast_to_void_p(crashers, plain):
    g = crashers.ffg_add
    addr = ctypes.cast(g, c_void_p).value
    assert addr
    assert addr == ctypes.cast(g.__wrapped__, c_void_p).value
    add = ctypes.cast(g, ctypes.CFUNCTYPE(c_int, c_int, c_int))
    assert add(20, 22) == 42


# ---------------------------------------------------------------- guard()


def test_guard_existing_function(plain):
    f = plain.ffg_read_null
    g = ffiguard.guard(f)
    assert isinstance(g, ffiguard.GuardedFunction)
    assert g.__wrapped__ is f
    assert g.__name__ == "ffg_read_null"
    with pytest.raises(ffiguard.SegmentationFault) as info:
        g()
    assert info.value.function == "ffg_read_null"
    assert info.value.address == 0
    add = ffiguard.guard(plain.ffg_add)
    assert add(2, 3) == 5
    assert plain.ffg_read_null is f
    assert plain.ffg_add(4, 5) == 9


def test_guard_keeps_original_unguarded(run_python):
    rc, out, err = run_python("""
        import ffiguard
        f = setup_signatures(ctypes.CDLL(CRASHERS_PATH)).ffg_read_null
        g = ffiguard.guard(f)
        try:
            g()
        except ffiguard.SegmentationFault:
            print("guarded ok", flush=True)
        f()
        print("survived", flush=True)
    """)
    assert out == "guarded ok\n", (out, err)
    assert rc == -signal.SIGSEGV, err


def test_guard_function_made_from_an_address(plain):
    """A prototype called on a bare address has no name: the report says nothing
    about the guarded function rather than 'None'."""
    addr = ctypes.cast(ctypes.CDLL(CRASHERS_PATH).ffg_read_null, c_void_p).value
    g = ffiguard.guard(ctypes.CFUNCTYPE(c_int)(addr))
    with pytest.raises(ffiguard.SegmentationFault) as info:
        g()
    e = info.value
    assert e.address == 0 and e.symbol == "ffg_read_at"
    assert e.function in (None, "ffg_read_null")
    assert "None" not in str(e), str(e)


def test_unguarded_call_during_argument_conversion_does_not_steal_the_guard(run_python):
    """Python code run by ctypes while converting a guarded call's arguments
    (_as_parameter_, from_param, a __del__ run by the GC) may call another ctypes
    function. When that function was itself passed to guard() earlier (so its object
    now goes through a stub), its plain, unguarded call must not take the guard meant
    for the outer call: the outer call must still be guarded."""
    rc, out, err = run_python("""
        import ffiguard
        plain = setup_signatures(ctypes.CDLL(CRASHERS_PATH))
        guarded_add = ffiguard.guard(plain.ffg_add)   # plain.ffg_add keeps working, unguarded
        lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH))

        class Address:
            @property
            def _as_parameter_(self):
                assert plain.ffg_add(1, 2) == 3         # an ordinary call, no guard asked
                return 0

        try:
            lib.ffg_read_at(Address())
        except ffiguard.SegmentationFault as e:
            print("recovered", e.function, e.address, flush=True)
    """)
    assert (rc, out) == (0, "recovered ffg_read_at 0\n"), (rc, out, err)


@pytest.mark.parametrize("bad", [42, None, "strlen", lambda: 0, ctypes.c_int(3), ctypes.CDLL, print])
def test_guard_rejects_non_functions(bad):
    with pytest.raises(TypeError):
        ffiguard.guard(bad)


# ---------------------------------------------------------------- libc


def test_libc_functions(libc):
    libc.strlen.argtypes = [ctypes.c_char_p]
    libc.strlen.restype = ctypes.c_size_t
    assert libc.strlen(b"hello") == 5
    assert libc.abs(-7) == 7
    buf = ctypes.create_string_buffer(32)
    n = libc.snprintf(buf, 32, b"%d-%s-%.2f", 42, b"ab", c_double(1.5))
    assert n == 10
    assert buf.value == b"42-ab-1.50"
    libc.strchr.restype = ctypes.c_char_p
    assert libc.strchr(b"hello", ord("l")) == b"llo"
    libc.strtold.argtypes = [ctypes.c_char_p, c_void_p]
    libc.strtold.restype = ctypes.c_longdouble  # returned on the x87 stack
    assert libc.strtold(b"1.25", None) == 1.25
    libc.atof.restype = c_double
    assert libc.atof(b"-2.5") == -2.5


def test_libc_strlen_null(libc):
    libc.strlen.argtypes = [ctypes.c_char_p]
    libc.strlen.restype = ctypes.c_size_t
    with pytest.raises(ffiguard.SegmentationFault) as info:
        libc.strlen(None)
    e = info.value
    assert e.signal == signal.SIGSEGV
    assert e.code_name == "SEGV_MAPERR"
    assert e.address == 0
    assert e.access == expected_access("read")
    assert e.function == "strlen"
    assert e.library is not None and os.path.basename(e.library).startswith("libc.so")
    # strlen is an IFUNC: the pc lies in a CPU-specific variant (__strlen_avx2...)
    # that dladdr may not name; the report then shows the address instead.
    verb = "reading" if expected_access("read") else "at"
    assert re.fullmatch(r"SIGSEGV \(SEGV_MAPERR: [^)]+\) " + verb + r" 0x0 (in \S+|at 0x[0-9a-f]+) "
                        r"\(libc\.so\.6\+0x[0-9a-f]+\) during call to strlen", str(e)), str(e)
    assert e.pc - map_base(e.library) == int(str(e).split("libc.so.6+")[1].split(")")[0], 16)
    assert libc.strlen(b"ok") == 2


def test_libc_variadic_fault_with_stack_arguments(libc):
    """A fault deep inside a variadic call whose arguments partly live on the stack
    (snprintf reading a bad %s pointer): recovered, and the next calls work."""
    buf = ctypes.create_string_buffer(64)
    args = [1, 2, 3, 4, 5, 6, 7, 8]
    with pytest.raises(ffiguard.SegmentationFault) as info:
        libc.snprintf(buf, 64, b"%d %d %d %d %d %d %d %d %s", *args, c_void_p(0x10))
    e = info.value
    assert e.code_name == "SEGV_MAPERR"
    assert e.access == expected_access("read")
    assert e.address is not None and e.address <= 0x10 < e.address + 64
    assert e.function == "snprintf"
    assert libc.snprintf(buf, 64, b"%d %d %d %d %d %d %d %d %s", *args, b"ok") == 18
    assert buf.value == b"1 2 3 4 5 6 7 8 ok"


# ---------------------------------------------------------------- bad input


def test_missing_library_raises_oserror_like_ctypes():
    name = "/nonexistent/libffiguard-nope.so"
    with pytest.raises(OSError) as want:
        ctypes.CDLL(name)
    with pytest.raises(OSError) as got:
        ffiguard.CDLL(name)
    assert type(got.value) is type(want.value)
    assert str(got.value) == str(want.value)
    assert not isinstance(got.value, ffiguard.ForeignFault)


def test_missing_symbol_raises_attributeerror_like_ctypes(crashers, plain):
    with pytest.raises(AttributeError) as want:
        plain.ffg_no_such_function
    with pytest.raises(AttributeError) as got:
        crashers.ffg_no_such_function
    assert "ffg_no_such_function" in str(got.value)
    assert str(got.value) == str(want.value)
    with pytest.raises(AttributeError):
        crashers["ffg_no_such_function"]


BTI_LIBRARY_S = r"""
    .text
    .globl  with_pad
    .type   with_pad, %function
with_pad:                   // a proper landing pad
    bti     c
    add     x0, x0, #1
    ret
    .globl  without_pad
    .type   without_pad, %function
without_pad:                // none: an indirect call must fault where BTI is enforced
    add     x0, x0, #2
    ret
    .section .note.GNU-stack, "", %progbits
    .section .note.gnu.property, "a"
    .p2align 3
    .word   4, 16, 5        // GNU NT_GNU_PROPERTY_TYPE_0
    .asciz  "GNU"
    .word   0xc0000000, 4, 3, 0   // AARCH64_FEATURE_1_AND: BTI | PAC
"""


def test_bti_target_library(tmp_path):
    """AArch64 BTI: a library marked BTI (built here without the C start files, which
    on some distributions carry no BTI note and would unmark it) has its landing pads
    enforced where the CPU has BTI (qemu's default CPU does). The guard enters the
    target with `blr x16` when armed and `br x16` when not: both must be accepted by a
    `bti c` pad, and a function without one must fault, inside the guard, as SIGILL."""
    import platform
    import subprocess
    import sysconfig
    if platform.machine() not in ("aarch64", "arm64"):
        pytest.skip("AArch64 only: x86-64 Linux enforces no landing pads in user space")
    src = tmp_path / "bti.S"
    src.write_text(BTI_LIBRARY_S)
    so = tmp_path / "libbti.so"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    subprocess.run([cc, "-shared", "-nostartfiles", "-o", str(so), str(src)], check=True)
    libc = ctypes.CDLL(None)
    libc.getauxval.restype, libc.getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    bti = bool(libc.getauxval(26) & (1 << 17))  # AT_HWCAP2 & HWCAP2_BTI

    plain = ctypes.CDLL(str(so))
    raw = {}
    for name in ("with_pad", "without_pad"):
        fn = raw[name] = getattr(plain, name)
        fn.argtypes, fn.restype = [c_long], c_long
    start = {name: ctypes.cast(fn, c_void_p).value for name, fn in raw.items()}
    with_pad, without_pad = ffiguard.guard(raw["with_pad"]), ffiguard.guard(raw["without_pad"])
    assert ctypes.cast(raw["with_pad"], c_void_p).value != start["with_pad"]  # now the stub
    assert with_pad(41) == 42          # armed: the thunk calls it with blr x16
    assert raw["with_pad"](41) == 42   # unarmed: the stub, then the thunk's br x16
    if bti:
        with pytest.raises(ffiguard.IllegalInstruction) as info:
            without_pad(1)
        e = info.value
        assert (e.signal, e.function, e.pc) == (signal.SIGILL, "without_pad", start["without_pad"])
        assert e.symbol == "without_pad"
    else:  # e.g. QEMU_CPU=cortex-a72 (ARMv8.0): bti is a NOP, nothing is enforced
        assert without_pad(1) == 3
    assert with_pad(1) == 2
