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
    result.stdout.fnmatch_lines(["ffiguard *: every library loaded through ctypes/cffi is "
                                 "guarded (trapping SIGSEGV,SIGBUS,SIGILL,SIGFPE,SIGABRT)"])


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
