"""The pytest plugin: with --ffiguard (or -p ffiguard) a segfaulting test fails with the
native report and the session goes on, the summary counts the faulted tests (also from
pytest-xdist workers); without it nothing of ffiguard is loaded and the segfault kills
the run. Each case is a pytest subprocess (runpytest_subprocess)."""
import signal

import pytest

from conftest import CRASHERS_PATH, SIGNATURES_SRC

pytest_plugins = ["pytester"]

TESTS = SIGNATURES_SRC + r'''
import sys

lib = setup_signatures(ctypes.CDLL(%r))   # plain ctypes, at import: guarded if active


def test_state(pytestconfig):
    active = pytestconfig.getoption("ffiguard") or "ffiguard" in pytestconfig.option.plugins
    assert ("ffiguard" in sys.modules) == active
    if active:
        import ffiguard
        assert ffiguard.installed() and isinstance(lib, ffiguard.CDLL)


def test_segv():
    lib.ffg_read_null()


def test_abort():
    lib.ffg_abort()


def test_after():
    assert lib.ffg_add(1, 2) == 3
''' % CRASHERS_PATH


@pytest.fixture
def suite(pytester):
    pytester.makepyfile(test_native=TESTS)
    return pytester


def check_reported(result):
    result.assert_outcomes(passed=2, failed=2)
    out = result.stdout.str()
    assert out.count("ffiguard native report") == 2
    assert "Native backtrace (innermost first" in out          # the full report
    lines = result.stdout.lines
    summary = lines[lines.index(next(l for l in lines if " ffiguard " in l and l.startswith("="))):]
    assert sorted(summary[1:3]) == [   # in the order the reports came (xdist: any)
        "FAULTED test_native.py::test_abort - SIGABRT (failed)",
        "FAULTED test_native.py::test_segv - SIGSEGV (failed)"]
    assert summary[3] == "ffiguard: 2 tests faulted in foreign code (SIGABRT: 1, SIGSEGV: 1)"


def test_faulting_tests_fail_with_the_report_and_the_run_goes_on(suite):
    suite.makepyfile(test_import=SIGNATURES_SRC + "setup_signatures(ctypes.CDLL(%r)).ffg_read_null()\n"
                     % CRASHERS_PATH)
    result = suite.runpytest_subprocess("--ffiguard", "-p", "no:cacheprovider",
                                        "--continue-on-collection-errors")
    result.assert_outcomes(passed=2, failed=2, errors=1)
    assert result.stdout.str().count("ffiguard native report") == 3
    result.stdout.fnmatch_lines([
        "FAULTED test_import.py - SIGSEGV (error during collection)",
        "FAULTED test_native.py::test_segv - SIGSEGV (failed)",
        "FAULTED test_native.py::test_abort - SIGABRT (failed)",
        "ffiguard: 1 module faulted in foreign code while collected (SIGSEGV: 1)",
        "ffiguard: 2 tests faulted in foreign code (SIGABRT: 1, SIGSEGV: 1)"])
    result.stdout.fnmatch_lines([
        "ffiguard *: on (trapping SIGSEGV,SIGBUS,SIGILL,SIGFPE,SIGABRT): libraries loaded "
        "through ctypes and cffi and compiled cffi modules are guarded (what is not: below)"])
    # the end of the session says what was guarded: the crashers library, its functions
    result.stdout.fnmatch_lines(["ffiguard: guarded: 1 library, * functions: _crashers*"
                                 " (ffg_abort, ffg_add, ffg_assert_positive and * more)"])
    assert "every library loaded" not in result.stdout.str()


UNGUARDED_CONFTEST = r'''
import collections, ffiguard
Unguarded = collections.namedtuple("UnguardedModule", "name path reason")
# what ffiguard.unguarded() answers for a module it could not guard
ffiguard.unguarded = lambda: [Unguarded("fakepkg._native", "/x/_native.so",
                                        "imported before ffiguard was installed")]
'''


def test_header_and_summary_name_what_is_not_guarded(pytester):
    pytester.makeconftest(UNGUARDED_CONFTEST)
    pytester.makepyfile(test_ok="def test_ok():\n    pass\n")
    result = pytester.runpytest_subprocess("--ffiguard", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    lines = result.stdout.lines
    assert lines.count("ffiguard: NOT guarded: 1 module imported unguarded: fakepkg._native "
                       "(imported before ffiguard was installed)") == 2   # header and end
    assert "ffiguard: guarded: no library loaded through ctypes/cffi yet" in lines


UNRAISABLE_TESTS = SIGNATURES_SRC + r'''
import gc
lib = setup_signatures(ctypes.CDLL(%r))


class Holder:
    def __del__(self):
        lib.ffg_read_null()   # a fault in a finalizer: "Exception ignored in"


def test_first():
    pass


def test_finalizer_faults():
    h = Holder()
    del h


def test_after():
    assert lib.ffg_add(1, 2) == 3
''' % CRASHERS_PATH


@pytest.mark.parametrize("xdist", [False, True])
def test_fault_in_a_finalizer_is_counted_and_names_its_test(pytester, xdist):
    if xdist:
        pytest.importorskip("xdist")
    pytester.makepyfile(test_del=UNRAISABLE_TESTS)
    args = ["--ffiguard", "-p", "no:cacheprovider"] + (["-n", "2"] if xdist else [])
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=3, warnings=1)   # pytest's own warning stays
    result.stdout.fnmatch_lines([
        "FAULTED test_del.py::test_finalizer_faults - SIGSEGV (raised where it could not "
        "propagate: Exception ignored * <function Holder.__del__ at *>)",
        "ffiguard: 0 tests faulted in foreign code",
        "ffiguard: 1 fault in foreign code raised where it could not propagate (__del__, "
        "callbacks: \"Exception ignored\") (SIGSEGV: 1)"])


def test_p_ffiguard_with_xdist(suite):
    pytest.importorskip("xdist")
    result = suite.runpytest_subprocess("-p", "ffiguard", "-n", "2", "-p", "no:cacheprovider",
                                        "test_native.py")
    check_reported(result)


def test_without_the_option_a_segfault_kills_the_run(suite):
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-x", "--ffiguard-signals",
                                        "SEGV")  # an option alone does not activate
    assert result.ret == -signal.SIGSEGV
    out = result.stdout.str()
    assert "guarded" not in out and "faulted" not in out and " passed" not in out
    assert "Fatal Python error: Segmentation fault" in result.stderr.str()


COMPILED_TESTS = r'''
import sys
sys.path.insert(0, %r)
from %s import lib   # a compiled cffi module, imported by the test module: guarded


def test_call():
    assert lib.api_add(2, 3) == 5


def test_fault():
    lib.api_deref(0x60)
'''


def test_summary_names_guarded_compiled_cffi_modules(pytester, tmp_path):
    pytest.importorskip("cffi")
    from test_cffi_compiled import _build

    name, _ = _build(str(tmp_path), "static")
    pytester.makepyfile(test_compiled=COMPILED_TESTS % (str(tmp_path), name))
    result = pytester.runpytest_subprocess("--ffiguard", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "FAULTED test_compiled.py::test_fault - SIGSEGV (failed)",
        "ffiguard: 1 test faulted in foreign code (SIGSEGV: 1)",
        "ffiguard: guarded compiled cffi modules: %s" % name])
    assert "NOT guarded" not in result.stdout.str()


def test_every_compiled_module_is_either_guarded_or_named(tmp_path):
    # a module inside a package whose lib is named after set_source's name, not the
    # module's (PyNaCl: nacl._sodium has lib "_sodium.lib"): guarded, not left out
    pytest.importorskip("cffi")
    from conftest import run_python
    from test_cffi_compiled import _build

    package = tmp_path / "pkgx"
    package.mkdir()
    (package / "__init__.py").write_text("")
    name, _ = _build(str(package), "static")
    rc, out, err = run_python("""
        import ffiguard
        from ffiguard import inventory
        ffiguard.install()
        sys.path.insert(0, %r)
        import pkgx.%s as mod
        assert mod.lib.__name__ == "%s.lib"
        guarded = "pkgx.%s" in ffiguard.guarded_modules()
        named = [u for u in inventory.unguarded() if u[0] == "pkgx.%s"]
        print(guarded, named)
    """ % (str(tmp_path), name, name, name, name))
    assert rc == 0, err
    assert out.startswith("True []"), out
