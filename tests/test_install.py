"""ffiguard.install() / uninstall(): every library loaded while installed is guarded.

In-process tests go through the `installed` fixture, which uninstalls afterwards and
checks that ctypes is exactly as before; what must start from a fresh interpreter (cffi
not yet imported, code that imported CDLL before install, on_fault="exit") runs in a
subprocess."""
import ctypes
import signal
import sys

import pytest

import ffiguard
from ffiguard import everything

from conftest import CRASHERS_PATH, import_cffi, setup_signatures

ORIGINAL_CDLL = ctypes.CDLL
ORIGINAL_CDLL_LOADER = ctypes.cdll
ORIGINAL_DLLTYPE = ctypes.cdll._dlltype


def assert_pristine():
    assert not ffiguard.installed()
    assert ctypes.CDLL is ORIGINAL_CDLL
    assert ctypes.cdll is ORIGINAL_CDLL_LOADER
    assert ctypes.cdll._dlltype is ORIGINAL_CDLL
    assert not any(isinstance(f, everything._CffiImportHook) for f in sys.meta_path)
    api = sys.modules.get("cffi.api")
    if api is not None:
        assert not any(hasattr(getattr(api.FFI, m), "__wrapped__") for m in everything._FFI_METHODS)
    backend = sys.modules.get("_cffi_backend")
    if backend is not None:
        assert backend.FFI.__module__ == "_cffi_backend" and backend.FFI.__base__ is object


@pytest.fixture
def installed():
    assert_pristine()
    handle = ffiguard.install()
    try:
        yield handle
    finally:
        ffiguard.uninstall()
        assert_pristine()


def test_not_installed_by_import():
    assert_pristine()


def test_ctypes_CDLL_is_guarded(installed):
    lib = setup_signatures(ctypes.CDLL(CRASHERS_PATH))
    assert isinstance(lib.ffg_read_null, ffiguard.GuardedFunction)
    with pytest.raises(ffiguard.SegmentationFault) as info:
        lib.ffg_read_null()
    e = info.value
    assert (e.signal, e.code_name, e.address, e.function) == (
        signal.SIGSEGV, "SEGV_MAPERR", 0, "ffg_read_null")
    assert lib.ffg_add(2, 3) == 5


@pytest.fixture
def uncache():
    """Names to drop from ctypes.cdll's cache afterwards (it keeps what it loaded)."""
    names = []
    yield names
    for name in names:
        ctypes.cdll.__dict__.pop(name, None)


def test_from_ctypes_import_after_install_is_guarded(installed, uncache):
    from ctypes import CDLL, cdll, LibraryLoader
    uncache.append(CRASHERS_PATH)
    for lib in (CDLL(CRASHERS_PATH), cdll.LoadLibrary(CRASHERS_PATH), cdll[CRASHERS_PATH],
                LibraryLoader(CDLL).LoadLibrary(CRASHERS_PATH)):
        setup_signatures(lib)
        with pytest.raises(ffiguard.ForeignAbort):
            lib.ffg_abort()
        assert lib.ffg_add(1, 2) == 3


def test_cdll_cache_keeps_what_it_loaded(uncache):
    assert_pristine()
    uncache.append(CRASHERS_PATH)
    before = ctypes.cdll[CRASHERS_PATH]  # cached by ctypes.cdll, unguarded
    with ffiguard.install():
        assert ctypes.cdll[CRASHERS_PATH] is before
        assert not isinstance(before.ffg_noop, ffiguard.GuardedFunction)
        ctypes.cdll.__dict__.pop(CRASHERS_PATH)
        during = ctypes.cdll[CRASHERS_PATH]
        assert isinstance(during.ffg_noop, ffiguard.GuardedFunction)
    assert ctypes.cdll[CRASHERS_PATH] is during  # still cached, still guarded


def test_cdll_attribute_loading_is_guarded(installed):
    libc = ctypes.cdll.LoadLibrary("libc.so.6")
    assert isinstance(libc.strlen, ffiguard.GuardedFunction)
    libc.strlen.argtypes = [ctypes.c_char_p]
    libc.strlen.restype = ctypes.c_size_t
    assert libc.strlen(b"abc") == 3
    with pytest.raises(ffiguard.SegmentationFault) as info:
        libc.strlen(None)
    assert info.value.function == "strlen" and info.value.address == 0


def test_isinstance_and_issubclass(installed):
    before = None
    try:
        ffiguard.uninstall()
        before = ORIGINAL_CDLL(CRASHERS_PATH)  # loaded before install
    finally:
        ffiguard.install()
    guarded = ctypes.CDLL(CRASHERS_PATH)
    assert isinstance(guarded, ctypes.CDLL) and isinstance(guarded, ORIGINAL_CDLL)
    assert isinstance(guarded, ffiguard.CDLL)
    assert isinstance(before, ctypes.CDLL) and not isinstance(before, ffiguard.CDLL)
    assert isinstance(ctypes.pythonapi, ctypes.CDLL)
    assert issubclass(ctypes.PyDLL, ctypes.CDLL) and issubclass(ffiguard.CDLL, ctypes.CDLL)
    assert not isinstance(42, ctypes.CDLL) and not issubclass(int, ctypes.CDLL)
    assert ctypes.CDLL.__name__ == "CDLL"


def test_library_loaded_before_install_is_not_guarded(installed):
    ffiguard.uninstall()
    before = ctypes.CDLL(CRASHERS_PATH)
    ffiguard.install()
    assert not isinstance(before.ffg_noop, ffiguard.GuardedFunction)


def test_subclass_defined_while_installed_is_guarded(installed):
    class MyLib(ctypes.CDLL):
        pass

    lib = setup_signatures(MyLib(CRASHERS_PATH))
    assert isinstance(lib, MyLib) and isinstance(lib, ctypes.CDLL)
    with pytest.raises(ffiguard.ForeignAbort):
        lib.ffg_abort()
    assert not isinstance(ctypes.CDLL(CRASHERS_PATH), MyLib)


def test_pythonapi_and_pydll_are_not_guarded(installed):
    assert not isinstance(ctypes.pythonapi.Py_IsInitialized, ffiguard.GuardedFunction)
    assert not isinstance(ctypes.PyDLL(None).Py_IsInitialized, ffiguard.GuardedFunction)

    class PyLike(ctypes.CDLL):  # a CDLL subclass calling Python's C API, as PyDLL does
        _func_flags_ = ctypes._FUNCFLAG_CDECL | ctypes._FUNCFLAG_PYTHONAPI

    f = PyLike(None).Py_IsInitialized
    assert not isinstance(f, ffiguard.GuardedFunction)
    f.restype = ctypes.c_int
    assert f() == 1


def test_callbacks_are_not_guarded_but_work(installed):
    lib = setup_signatures(ctypes.CDLL(CRASHERS_PATH))
    cb = CALLBACK_T(lambda x: x * 3)
    assert not isinstance(cb, ffiguard.GuardedFunction)
    assert lib.ffg_call_callback(cb, 7) == 22  # cb(x) + 1


CALLBACK_T = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)


def test_ctypes_idioms_on_installed_functions(installed):
    lib = ctypes.CDLL(CRASHERS_PATH)
    f = lib.ffg_add
    f.argtypes = [ctypes.c_int, ctypes.c_int]
    f.restype = ctypes.c_int
    f.errcheck = lambda result, func, args: result * 10
    assert f(1, 2) == 30
    assert f.argtypes == [ctypes.c_int, ctypes.c_int]
    # the address ctypes.cast finds is the guard stub's, which calls the target (unguarded)
    address = ctypes.cast(lib.ffg_noop, ctypes.c_void_p).value
    target = ORIGINAL_CDLL(CRASHERS_PATH).ffg_noop
    assert ffiguard._core.stub_target(address) == ctypes.cast(target, ctypes.c_void_p).value
    # passed where a function pointer is expected: ctypes takes _as_parameter_
    lib.ffg_call_callback.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.ffg_call_callback.restype = ctypes.c_int
    inc = ffiguard.CDLL("libc.so.6").abs  # int(int): a real function pointer argument
    assert lib.ffg_call_callback(inc, -5) == 6  # abs(-5) + 1


def test_on_fault_applies_to_libraries_loaded_while_installed():
    assert_pristine()
    with ffiguard.install(on_fault="quarantine") as handle:
        assert handle.on_fault == "quarantine"
        lib = setup_signatures(ctypes.CDLL(CRASHERS_PATH))
        with pytest.raises(ffiguard.SegmentationFault):
            lib.ffg_read_null()
        with pytest.raises(ffiguard.LibraryQuarantined):
            lib.ffg_add(1, 2)
        assert ffiguard.release(lib)
        assert lib.ffg_add(1, 2) == 3
        # an explicit on_fault still wins
        other = setup_signatures(ctypes.CDLL(CRASHERS_PATH, on_fault="raise"))
        with pytest.raises(ffiguard.SegmentationFault):
            other.ffg_read_null()
        assert other.ffg_add(1, 2) == 3
    assert_pristine()


def test_context_manager_uninstalls():
    assert_pristine()
    with ffiguard.install() as handle:
        assert ffiguard.installed() and ctypes.CDLL is not ORIGINAL_CDLL
        lib = ctypes.CDLL(CRASHERS_PATH)
    assert_pristine()
    assert "uninstalled" in repr(handle)
    # libraries loaded while installed stay guarded
    setup_signatures(lib)
    assert isinstance(lib, ctypes.CDLL)
    with pytest.raises(ffiguard.SegmentationFault):
        lib.ffg_read_null()


def test_context_manager_uninstalls_on_exception():
    with pytest.raises(KeyError):
        with ffiguard.install():
            raise KeyError
    assert_pristine()


def test_nested_and_repeated_install_is_idempotent():
    assert_pristine()
    try:
        with ffiguard.install() as outer:
            installed_cdll = ctypes.CDLL
            with ffiguard.install() as inner:
                assert ctypes.CDLL is installed_cdll
                assert inner.on_fault is None
            # the inner block did not install, so it does not uninstall
            assert ffiguard.installed() and ctypes.CDLL is installed_cdll
            ffiguard.install()
            assert ctypes.CDLL is installed_cdll
            with pytest.raises(ValueError, match="already installed"):
                ffiguard.install(on_fault="exit")
        assert_pristine()
        assert outer is not inner
    finally:
        ffiguard.uninstall()


def test_uninstall_when_not_installed():
    assert_pristine()
    assert ffiguard.uninstall() is False
    with ffiguard.install():
        assert ffiguard.uninstall() is True
        assert ffiguard.uninstall() is False
    assert_pristine()


def test_install_rejects_bad_on_fault():
    with pytest.raises(ValueError):
        ffiguard.install(on_fault="ignore")
    assert_pristine()


def test_code_that_imported_cdll_before_install_stays_unguarded(run_python):
    rc, out, err = run_python("""
        from ctypes import CDLL as EarlyCDLL
        import ffiguard
        ffiguard.install()
        early = EarlyCDLL(CRASHERS_PATH)
        late = ctypes.CDLL(CRASHERS_PATH)
        print(type(early.ffg_noop).__name__, type(late.ffg_noop).__name__, flush=True)
        setup_signatures(early).ffg_read_null()
    """)
    assert out == "_FuncPtr GuardedFunction\n", (out, err)
    assert rc == -signal.SIGSEGV, (rc, err)


def test_install_exit_policy(run_python):
    rc, out, err = run_python("""
        import ffiguard
        ffiguard.install(on_fault="exit")
        lib = setup_signatures(ctypes.CDLL(CRASHERS_PATH))
        print("before", flush=True)
        lib.ffg_write_null()
        print("not reached")
    """)
    assert rc == 70, (rc, out, err)
    assert out == "before\n"
    assert "SIGSEGV" in err and "ffg_write_null" in err


def test_import_ffiguard_does_not_import_cffi(run_python):
    rc, out, err = run_python("""
        import ffiguard
        ffiguard.install()
        print("cffi" in sys.modules, "_cffi_backend" in sys.modules, "ffiguard.for_cffi" in sys.modules)
        ffiguard.uninstall()
        print("cffi" in sys.modules)
    """)
    assert (rc, out) == (0, "False False False\nFalse\n"), (rc, out, err)


# ---------------------------------------------------------------- cffi

CFFI_CDEF = "int ffg_read_null(void); int ffg_add(int, int); void ffg_abort(void);"


def test_cffi_dlopen_is_guarded(installed):
    cffi = import_cffi()
    ffi = cffi.FFI()
    ffi.cdef(CFFI_CDEF)
    lib = ffi.dlopen(CRASHERS_PATH)
    assert type(lib).__name__ == "GuardedLibrary"
    assert isinstance(lib.ffg_add, ffiguard.GuardedFunction)
    assert lib.ffg_add(2, 2) == 4
    with pytest.raises(ffiguard.SegmentationFault) as info:
        lib.ffg_read_null()
    assert (info.value.function, info.value.address) == ("ffg_read_null", 0)
    ffi.dlclose(lib)


def test_cffi_dlopen_restored_exactly():
    cffi = import_cffi()
    original = cffi.FFI.__dict__["dlopen"]
    with ffiguard.install(on_fault="quarantine"):
        assert cffi.FFI.dlopen is not original
        ffi = cffi.FFI()
        ffi.cdef(CFFI_CDEF)
        lib = ffi.dlopen(CRASHERS_PATH)
        with pytest.raises(ffiguard.ForeignAbort):
            lib.ffg_abort()
        with pytest.raises(ffiguard.LibraryQuarantined):
            lib.ffg_add(1, 2)
    assert cffi.FFI.__dict__["dlopen"] is original
    assert_pristine()
    assert type(ffi.dlopen(CRASHERS_PATH)).__name__.startswith("FFILibrary")


def test_cffi_imported_after_install(run_python):
    import_cffi()
    rc, out, err = run_python("""
        import ffiguard
        ffiguard.install()
        assert "cffi" not in sys.modules
        import cffi
        ffi = cffi.FFI()
        ffi.cdef("int ffg_read_null(void); int ffg_add(int, int);")
        lib = ffi.dlopen(CRASHERS_PATH)
        print(type(lib).__name__, lib.ffg_add(20, 22))
        try:
            lib.ffg_read_null()
        except ffiguard.SegmentationFault as e:
            print("caught", e.function, e.address)
        import cffi.api, linecache
        print(cffi.api.__spec__.loader.get_source("cffi.api") is not None)
        ffiguard.uninstall()
        print(type(ffi.dlopen(CRASHERS_PATH)).__name__.startswith("FFILibrary"),
              [type(f).__name__ for f in sys.meta_path if "Cffi" in type(f).__name__])
    """)
    assert (rc, out) == (0, "GuardedLibrary 42\ncaught ffg_read_null 0\nTrue\nTrue []\n"), (
        rc, out, err)


def test_cffi_imported_after_uninstall_is_not_patched(run_python):
    import_cffi()
    rc, out, err = run_python("""
        import ffiguard
        with ffiguard.install():
            pass
        import cffi
        ffi = cffi.FFI()
        ffi.cdef("int ffg_add(int, int);")
        print(type(ffi.dlopen(CRASHERS_PATH)).__name__.startswith("FFILibrary"))
    """)
    assert (rc, out) == (0, "True\n"), (rc, out, err)


def test_cffi_ffi_methods_accept_guarded_objects(installed):
    cffi = import_cffi()
    import weakref
    ffi = cffi.FFI()
    ffi.cdef(CFFI_CDEF)
    lib = ffi.dlopen(CRASHERS_PATH)
    add = lib.ffg_add
    assert str(ffi.typeof(add)) == "<ctype 'int(*)(int, int)'>"
    address = ffi.addressof(lib, "ffg_add")
    assert str(ffi.typeof(address)) == "<ctype 'int(*)(int, int)'>"
    assert address(40, 2) == 42
    assert address == add and add == address and hash(address) == hash(add)
    unguarded = ffi.cast("int(*)(int, int)", add)  # a pointer to the stub: runs unguarded
    assert unguarded(1, 2) == 3
    assert unguarded == add
    assert ffi.addressof(lib, "ffg_add") != ffi.addressof(lib, "ffg_read_null")
    lib_ref = weakref.ref(lib)
    del lib
    import gc
    gc.collect()
    assert lib_ref() is not None, "ffi keeps its guarded library alive, as cffi does"
    assert add(2, 3) == 5
    ffi.dlclose(lib_ref())


OUT_OF_LINE = """
import cffi
ffi = cffi.FFI()
ffi.cdef("int ffg_read_null(void); int ffg_add(int, int);")
ffi.set_source("_ool_crashers", None)
ffi.emit_python_code(PATH)
"""


def test_cffi_out_of_line_abi_module_is_guarded(run_python, tmp_path):
    import_cffi()
    module = tmp_path / "_ool_crashers.py"
    rc, out, err = run_python("PATH = %r\n" % str(module) + OUT_OF_LINE)
    assert rc == 0 and module.exists(), err
    rc, out, err = run_python("""
        sys.path.insert(0, @DIR@)
        import ffiguard
        install = ffiguard.install()
        assert "_cffi_backend" not in sys.modules
        from _ool_crashers import ffi             # generated: _cffi_backend.FFI(...)
        lib = ffi.dlopen(CRASHERS_PATH)
        print(type(lib).__name__, lib.ffg_add(40, 2), ffi.typeof(lib.ffg_add).cname,
              ffi.addressof(lib, "ffg_add")(1, 1))
        try:
            lib.ffg_read_null()
        except ffiguard.SegmentationFault as e:
            print("caught", e.function, e.address)
        ffiguard.uninstall()
        import _cffi_backend
        print(_cffi_backend.FFI is type(ffi).__base__, type(ffi.dlopen(CRASHERS_PATH)).__name__)
    """.replace("@DIR@", repr(str(tmp_path))))
    assert (rc, out) == (0, "GuardedLibrary 42 int(*)(int, int) 2\ncaught ffg_read_null 0\n"
                            "True Lib\n"), (rc, out, err)


def test_cffi_out_of_line_module_with_backend_imported_before_install(run_python, tmp_path):
    import_cffi()
    module = tmp_path / "_ool_crashers.py"
    rc, out, err = run_python("PATH = %r\n" % str(module) + OUT_OF_LINE)
    assert rc == 0, err
    rc, out, err = run_python("""
        sys.path.insert(0, @DIR@)
        import cffi, _cffi_backend, ffiguard
        with ffiguard.install():
            from _ool_crashers import ffi
            lib = ffi.dlopen(CRASHERS_PATH)
            try:
                lib.ffg_read_null()
            except ffiguard.SegmentationFault as e:
                print("caught", e.function)
        print(_cffi_backend.FFI.__module__, _cffi_backend.FFI.__base__ is object)
    """.replace("@DIR@", repr(str(tmp_path))))
    assert (rc, out) == (0, "caught ffg_read_null\n_cffi_backend True\n"), (rc, out, err)
