"""Compiled cffi modules (API mode), guarded in place while ffiguard is installed.

Two modules of our own, built at test time, with the same C functions: "shared" calls
them in a shared library it links against (through the PLT/GOT), "static" has them
compiled into the module (direct calls)."""
import errno
import os
import signal
import subprocess
import sys
import sysconfig
import textwrap
import threading

import pytest

from conftest import import_cffi

cffi = import_cffi()

import ffiguard  # noqa: E402
from ffiguard import _core, for_cffi_compiled  # noqa: E402

LINKAGES = ("shared", "static")

# The C functions' declarations, shared by the cdef and the module's C source.
PROTOTYPES = """
struct api_point { int x, y; };
int api_add(int a, int b);
int api_deref(uintptr_t address);
int api_read_null(void);
int api_set_errno(int e);
int api_errno_then_fault(int e);
int api_wait(int *flag, int *started);
int api_point_sum(struct api_point p);
int api_sum(int *xs, int n);
int api_call(int (*cb)(int), int x);
"""

CDEF = PROTOTYPES + """
int api_run_cb(int x);
extern "Python" int api_py_cb(int);
extern int api_counter;
#define API_ANSWER ...
"""

FUNCTIONS = r"""
#include <errno.h>
#include <stdint.h>
#include <unistd.h>
struct api_point { int x, y; };
int api_counter = 5;
__attribute__((noinline)) int api_add(int a, int b) { return a + b; }
__attribute__((noinline)) int api_deref(uintptr_t address) { return *(volatile int *)address; }
__attribute__((noinline)) int api_read_null(void) { return *(volatile int *)(uintptr_t)0; }
int api_set_errno(int e) { errno = e; return -1; }
__attribute__((noinline)) int api_errno_then_fault(int e) { errno = e; return *(volatile int *)(uintptr_t)0x80; }
/* Waits (up to ~20 s) for another thread to set *flag: only possible while the caller
 * has released the GIL. Returns 1 if it was set. */
int api_wait(int *flag, int *started)
{
    *(volatile int *)started = 1;
    for (int i = 0; i < 20000; i++) {
        if (*(volatile int *)flag)
            return 1;
        usleep(1000);
    }
    return 0;
}
int api_point_sum(struct api_point p) { return p.x * 1000 + p.y; }
int api_sum(int *xs, int n) { int s = 0; for (int i = 0; i < n; i++) s += xs[i]; return s; }
int api_call(int (*cb)(int), int x) { return cb(x) + 1; }
"""

DECLARATIONS = "#include <stdint.h>\nextern int api_counter;\n" + PROTOTYPES

MODULE_GLUE = r"""
#define API_ANSWER 42
static int api_py_cb(int);
int api_run_cb(int x) { return api_call(api_py_cb, x); }
"""


def _cc(args):
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, *args], check=True, capture_output=True)


def _build(directory, linkage):
    """Build _ffgapi_<linkage> into directory; returns (module name, path of the object
    holding the C functions)."""
    name = "_ffgapi_" + linkage
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(name, (DECLARATIONS if linkage == "shared" else FUNCTIONS) + MODULE_GLUE)
    c_file = os.path.join(directory, name + ".c")
    ffi.emit_c_code(c_file)
    out = os.path.join(directory, name + sysconfig.get_config_var("EXT_SUFFIX"))
    common = ["-shared", "-fPIC", "-O1", "-g"]
    if linkage == "shared":
        lib_c = os.path.join(directory, "ffgapi_funcs.c")
        with open(lib_c, "w") as f:
            f.write(FUNCTIONS)
        lib = os.path.join(directory, "libffgapi.so")
        _cc(common + [lib_c, "-o", lib])
        # full RELRO (as hardened builds have): the GOT is read-only after loading
        _cc(common + ["-I" + sysconfig.get_paths()["include"], c_file, "-o", out, lib,
                      "-Wl,-rpath," + directory, "-Wl,-z,relro,-z,now"])
        return name, lib
    # -Bsymbolic: the module's own calls to its functions are direct (no PLT/GOT slot)
    _cc(common + ["-Wl,-Bsymbolic", "-I" + sysconfig.get_paths()["include"], c_file, "-o", out])
    return name, out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("cffi_compiled"))
    return directory, {linkage: _build(directory, linkage) for linkage in LINKAGES}


@pytest.fixture(scope="module")
def modules(built):
    """Both modules, imported while installed (and the installation, for the tests)."""
    directory, names = built
    assert not ffiguard.installed()
    sys.path.insert(0, directory)
    installation = ffiguard.install()
    try:
        imported = {}
        for linkage, (name, where) in names.items():
            __import__(name)
            imported[linkage] = (sys.modules[name], where)
        yield imported
    finally:
        sys.path.remove(directory)
        ffiguard.uninstall()
        for name, _ in names.values():
            sys.modules.pop(name, None)
        del installation


@pytest.fixture(params=LINKAGES)
def mod(request, modules):
    return modules[request.param]


def _same(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


def test_fault_raises_naming_the_function(mod):
    module, where = mod
    lib = module.lib
    # through the shared library's GOT slot, or the whole wrapper where there is none
    expected_mode = "got" if module.__name__.endswith("shared") else "wrapper"
    assert for_cffi_compiled.mode(lib.api_deref) == expected_mode
    with pytest.raises(ffiguard.SegmentationFault) as info:
        lib.api_deref(0x40)  # METH_O
    e = info.value
    assert (e.signal, e.address, e.function, e.symbol) == (signal.SIGSEGV, 0x40, "api_deref", "api_deref")
    assert _same(e.library, where)
    with pytest.raises(ffiguard.SegmentationFault) as info:
        lib.api_read_null()  # METH_NOARGS
    assert (info.value.address, info.value.function) == (0, "api_read_null")
    # the module works afterwards, and its functions are still cffi's builtins
    assert lib.api_add(2, 3) == 5  # METH_VARARGS
    assert type(lib.api_add).__name__ == "builtin_function_or_method"
    assert lib.api_add is lib.api_add
    assert module.__name__ in ffiguard.guarded_modules()
    assert all(u.name != module.__name__ for u in ffiguard.unguarded())
    with pytest.raises(TypeError):
        lib.api_add(1)
    with pytest.raises(TypeError):
        lib.api_deref(1, 2)
    with pytest.raises(TypeError):
        lib.api_add(1, b=2)


def test_errno_after_a_fault(mod):
    # GOT mode: the wrapper runs to its end after the recovery and saves errno for
    # ffi.errno; whole-wrapper mode skips that (docs/design.md): ffi.errno is left as it was
    module = mod[0]
    lib, ffi = module.lib, module.ffi
    ffi.errno = 0
    with pytest.raises(ffiguard.SegmentationFault) as info:
        lib.api_errno_then_fault(errno.ENOENT)
    assert info.value.address == 0x80
    assert ffi.errno == (errno.ENOENT if module.__name__.endswith("shared") else 0)


def test_report_names_symbol_and_source_line(mod):
    from ffiguard import symbolize
    module, where = mod
    with pytest.raises(ffiguard.SegmentationFault) as info:
        module.lib.api_deref(0x98)
    frames = symbolize.symbolize(info.value.frames)
    assert frames[0].symbol == "api_deref" and _same(frames[0].library, where)
    if frames[0].file is None:
        pytest.skip("no DWARF line reader here (pyelftools / addr2line)")
    source = "ffgapi_funcs.c" if module.__name__.endswith("shared") else module.__name__ + ".c"
    line = next(i for i, text in enumerate(FUNCTIONS.splitlines(), 1) if "int api_deref(" in text)
    if source != "ffgapi_funcs.c":  # the module's C: cffi's prelude comes first
        line = None
    assert os.path.basename(frames[0].file) == source
    assert line is None or frames[0].line == line
    assert "%s:%d\n" % (source, frames[0].line) in info.value.report()


def test_fault_at_a_specialised_call_site(mod):
    # 3.11+ specialise a call site of a METH_O builtin to call its C function directly
    lib, ffi = mod[0].lib, mod[0].ffi
    cell = ffi.new("int *", 7)
    address = int(ffi.cast("uintptr_t", cell))

    def call(a):
        return lib.api_deref(a)

    for _ in range(1000):
        assert call(address) == 7
    with pytest.raises(ffiguard.SegmentationFault) as info:
        call(0x48)
    assert info.value.address == 0x48


def test_errno_and_gil_release(mod):
    lib, ffi = mod[0].lib, mod[0].ffi
    ffi.errno = 0
    assert lib.api_set_errno(errno.EBADF) == -1
    assert ffi.errno == errno.EBADF
    flag, started = ffi.new("int *"), ffi.new("int *")
    result = []
    t = threading.Thread(target=lambda: result.append(lib.api_wait(flag, started)))
    t.start()
    while not started[0]:
        pass  # this thread runs while the other is inside api_wait
    flag[0] = 1
    t.join()
    assert result == [1]


def test_lib_and_ffi_unchanged(mod):
    module = mod[0]
    lib, ffi = module.lib, module.ffi
    fp = ffi.addressof(lib, "api_add")
    assert ffi.typeof(fp) is ffi.typeof("int(*)(int, int)")
    assert fp(4, 5) == 9
    assert {"api_add", "api_counter", "API_ANSWER"} <= set(dir(lib))
    assert lib.API_ANSWER == 42
    assert lib.api_counter == 5
    lib.api_counter = 9
    try:
        assert lib.api_counter == 9
        assert ffi.addressof(lib, "api_counter")[0] == 9
    finally:
        lib.api_counter = 5
    p = ffi.new("struct api_point *", (3, 4))
    assert lib.api_point_sum(p[0]) == 3004
    assert lib.api_sum(list(range(1000)), 1000) == sum(range(1000))  # a malloc'd array argument
    assert ffi.typeof(lib.api_add) is ffi.typeof("int(*)(int, int)")


def test_def_extern_callbacks(mod):
    module = mod[0]
    lib, ffi = module.lib, module.ffi
    seen, errors = [], []

    @ffi.def_extern(name="api_py_cb")
    def catching(x):
        # a guarded call made from a callback inside a guarded call, and its fault
        try:
            lib.api_deref(0x50)
        except ffiguard.SegmentationFault as e:
            seen.append(e.address)
        return lib.api_add(x, 10)

    assert lib.api_run_cb(1) == 12
    assert seen == [0x50]

    @ffi.def_extern(name="api_py_cb", onerror=lambda *exc: errors.append(exc[0]))
    def raising(x):
        raise ValueError(x)

    assert lib.api_run_cb(1) == 1  # cffi's default 0, plus one
    assert errors == [ValueError]
    assert lib.api_add(1, 1) == 2


def test_guard_by_hand_while_installed(mod):
    # the module's builtins are guarded in place already: a guard() by hand makes its
    # own GuardedFunctions for them, calling the same wrapper the same way
    module = mod[0]
    g = ffiguard.guard(module.ffi, module.lib, on_fault="raise")
    assert g.api_add(1, 2) == 3
    cell = module.ffi.new("int *", 11)
    assert g.api_deref(int(module.ffi.cast("uintptr_t", cell))) == 11
    with pytest.raises(ffiguard.SegmentationFault) as info:
        g.api_deref(0x90)
    assert (info.value.address, info.value.function) == (0x90, "api_deref")
    assert for_cffi_compiled.mode(module.lib.api_deref) == \
        ("got" if module.__name__.endswith("shared") else "wrapper")


def test_guard_by_hand_uses_the_builtin(built):
    directory, names = built
    code = """
        import sys, ffiguard
        sys.path.insert(0, %r)
        import %s as m
        g = ffiguard.guard(m.ffi, m.lib)
        f = g.api_deref
        assert isinstance(f, ffiguard.GuardedFunction) and f.__wrapped__ is m.lib.api_deref
        try:
            f(0x58)
        except ffiguard.SegmentationFault as e:
            assert (e.address, e.function) == (0x58, "api_deref"), (e.address, e.function)
        else:
            raise SystemExit("no fault")
        assert g.api_add(1, 2) == 3 and g.API_ANSWER == 42
        assert ffiguard._core.cffi_patched(m.lib.api_deref) is None  # the module is left alone
        print("ok", ffiguard.unguarded()[0].reason)
    """ % (directory, names["static"][0])
    rc, out, err = _run(code)
    assert (rc, out.split()[0]) == (0, "ok"), err
    assert "not installed" in out


def _run(code):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"})
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("linkage", LINKAGES)
def test_imported_before_install(built, linkage):
    directory, names = built
    code = """
        import sys, ffiguard
        sys.path.insert(0, %r)
        from %s import ffi, lib
        deref = lib.api_deref  # a reference taken before install()
        u = ffiguard.unguarded()
        assert [x.name for x in u] == [%r] and u[0].path.endswith(".so"), u
        ffiguard.install()
        assert ffiguard.guarded_modules() == [%r] and ffiguard.unguarded() == []
        try:
            deref(0x60)
        except ffiguard.SegmentationFault as e:
            assert e.address == 0x60
        else:
            raise SystemExit("no fault")
        ffiguard.uninstall()
        assert ffiguard.guarded_modules() == [] and ffiguard._core.cffi_patched(deref) is None
        assert lib.api_add(2, 2) == 4
        print("ok")
    """ % (directory, names[linkage][0], names[linkage][0], names[linkage][0])
    rc, out, err = _run(code)
    assert (rc, out) == (0, "ok\n"), err


@pytest.mark.parametrize("linkage", LINKAGES)
def test_uninstall_puts_back(built, linkage):
    # after uninstall() a fault kills the process again: the module is cffi's own
    directory, names = built
    code = """
        import sys, ffiguard
        sys.path.insert(0, %r)
        ffiguard.install()
        from %s import lib
        assert ffiguard._core.cffi_patched(lib.api_deref) is not None
        ffiguard.uninstall()
        assert ffiguard._core.cffi_patched(lib.api_deref) is None
        print("unguarded", flush=True)
        lib.api_deref(0x68)
    """ % (directory, names[linkage][0])
    rc, out, err = _run(code)
    assert (rc, out) == (-signal.SIGSEGV, "unguarded\n"), err


@pytest.mark.parametrize("linkage", LINKAGES)
@pytest.mark.parametrize("how", ["argument conversion", "callback"])
def test_fault_with_the_gil_held_is_not_recovered(built, how, linkage):
    directory, names = built
    code = """
        import sys, ffiguard
        sys.path.insert(0, %r)
        ffiguard.install()
        from %s import ffi, lib
        assert ffiguard.guarded_modules()
        bad = ffi.cast("struct api_point *", 0x70)[0]  # no read yet
        @ffi.def_extern()
        def api_py_cb(x):
            return ffi.cast("int *", 0x78)[0]
        print("calling", flush=True)
        if %r == "callback":
            lib.api_run_cb(1)
        else:
            lib.api_point_sum(bad)  # the wrapper copies the struct, holding the GIL
    """ % (directory, names[linkage][0], how)
    rc, out, err = _run(code)
    assert (rc, out) == (-signal.SIGSEGV, "calling\n"), err


def test_quarantine_and_release(built):
    directory, names = built
    code = """
        import sys, ffiguard
        sys.path.insert(0, %r)
        ffiguard.install(on_fault="quarantine")
        from %s import lib
        try:
            lib.api_deref(0x88)
        except ffiguard.SegmentationFault:
            pass
        try:
            lib.api_add(1, 2)
        except ffiguard.LibraryQuarantined as e:
            print("quarantined:", e)
        assert ffiguard.release(lib) is True
        assert lib.api_add(1, 2) == 3
        print("ok")
    """ % (directory, names["shared"][0])
    rc, out, err = _run(code)
    assert rc == 0, err
    assert out.splitlines() == ["quarantined: _ffgapi_shared is quarantined after a fault: api_add not "
                                "called (release the library to call it again)", "ok"]


def test_module_placed_in_a_package_is_guarded(modules, tmp_path):
    # set_source("_ffgpkg_mod") built into a package and imported as ffgpkg._ffgpkg_mod,
    # as PyNaCl's nacl._sodium is: its lib is named "_ffgpkg_mod.lib", not after the
    # module's full name. A module that only imported that lib is not taken for it.
    package = tmp_path / "ffgpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "user.py").write_text("from ._ffgpkg_mod import ffi, lib\n")
    ffi = cffi.FFI()
    ffi.cdef("int pkg_deref(uintptr_t address);")
    ffi.set_source("_ffgpkg_mod", "#include <stdint.h>\n"
                   "int pkg_deref(uintptr_t a) { return *(volatile int *)a; }\n")
    c_file = str(package / "_ffgpkg_mod.c")
    ffi.emit_c_code(c_file)
    _cc(["-shared", "-fPIC", "-O1", "-I" + sysconfig.get_paths()["include"], c_file,
         "-o", str(package / ("_ffgpkg_mod" + sysconfig.get_config_var("EXT_SUFFIX")))])
    sys.path.insert(0, str(tmp_path))
    assert ffiguard.installed()  # by the modules fixture
    try:
        from ffgpkg import _ffgpkg_mod, user
        assert _ffgpkg_mod.lib.__name__ == "_ffgpkg_mod.lib"
        assert "ffgpkg._ffgpkg_mod" in ffiguard.guarded_modules()
        assert "ffgpkg.user" not in ffiguard.guarded_modules()
        assert all(u.name != "ffgpkg.user" for u in ffiguard.unguarded())
        with pytest.raises(ffiguard.SegmentationFault) as info:
            user.lib.pkg_deref(0x48)
        assert (info.value.address, info.value.function) == (0x48, "pkg_deref")
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("ffgpkg", "ffgpkg.user", "ffgpkg._ffgpkg_mod"):
            sys.modules.pop(name, None)


def test_shield_false_per_library(mod):
    # shield (issue 13): a compiled module's functions lock shielded memory like any
    # guarded function; guard(ffi, lib, shield=False) gives a library whose calls don't
    import ctypes
    module = mod[0]
    buf = ffiguard.protected_buffer(4096, access="none")
    buf[16:20] = (1234).to_bytes(4, "little")  # Python code: unaffected
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf)) + 16
    loose = ffiguard.guard(module.ffi, module.lib, shield=False)
    try:
        with pytest.raises(ffiguard.ProtectionKeyViolation) as info:
            module.lib.api_deref(address)
        assert info.value.address == address
        assert not loose.api_deref.__shield__
        assert loose.api_deref(address) == 1234
        assert ffiguard.guard(module.ffi, module.lib).api_deref.__shield__
    finally:
        ffiguard.unshield(buf)


def test_timeout_stops_a_compiled_modules_call(mod):
    # interrupt (issue 16) through both modes: by hand (guard(ffi, lib, timeout=)) and in
    # place (the module guarded with install()'s timeout); the module works afterwards
    module = mod[0]
    ffi, lib = module.ffi, module.lib
    flag, started = ffi.new("int *"), ffi.new("int *")
    timed = ffiguard.guard(ffi, lib, timeout=0.1)
    with pytest.raises(ffiguard.ForeignTimeout) as info:
        timed.api_wait(flag, started)  # polls a flag nobody sets, for up to 20 s
    assert started[0] == 1 and info.value.timeout == 0.1 and info.value.function == "api_wait"
    assert lib.api_add(2, 3) == 5 and timed.api_add(2, 3) == 5
    assert for_cffi_compiled.guard_module(module, None, None, 0.1)
    try:
        assert _core.cffi_patched(lib.api_wait).timeout == 0.1
        with pytest.raises(ffiguard.ForeignTimeout):
            lib.api_wait(flag, started)
    finally:
        assert for_cffi_compiled.guard_module(module)  # as the fixture installed it
    assert _core.cffi_patched(lib.api_wait).timeout is None
    assert lib.api_add(1, 1) == 2
