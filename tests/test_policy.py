"""on_fault policies: raise (default), quarantine (until ffiguard.release), exit (report
on stderr, status 70); per library and global."""
import pytest

import ffiguard
from ffiguard import policy
from conftest import CRASHERS_PATH, ENTRY_PAD, expected_access, setup_signatures


@pytest.fixture
def default_policy():
    """Restores the global on_fault after the test."""
    saved = ffiguard.get_default_policy()
    yield
    ffiguard.set_default_policy(saved)


def load(on_fault=None):
    return setup_signatures(ffiguard.CDLL(CRASHERS_PATH, on_fault=on_fault))


def test_raise_is_the_default(crashers):
    assert ffiguard.get_default_policy() == "raise"
    for _ in range(3):
        with pytest.raises(ffiguard.SegmentationFault):
            crashers.ffg_read_null()
        assert crashers.ffg_add(1, 2) == 3
    assert crashers.ffg_add.__policy__.quarantined is False


def test_quarantine_until_released():
    lib = load("quarantine")
    other = load()  # the same file, loaded separately: its own policy
    with pytest.raises(ffiguard.SegmentationFault) as info:
        lib.ffg_read_null()
    assert "  on_fault:   quarantine (the library is quarantined: further calls raise " \
           "LibraryQuarantined until ffiguard.release(lib))\n" in info.value.report()
    with pytest.raises(ffiguard.LibraryQuarantined) as q:
        lib.ffg_add(1, 2)
    assert str(q.value) == "%s is quarantined after a fault: ffg_add not called " \
                           "(release the library to call it again)" % CRASHERS_PATH
    with pytest.raises(ffiguard.LibraryQuarantined):
        lib.ffg_read_null()  # not called: no second fault
    assert other.ffg_add(1, 2) == 3
    assert ffiguard.release(lib) is True
    assert ffiguard.release(lib) is False
    assert lib.ffg_add(1, 2) == 3
    with pytest.raises(ffiguard.SegmentationFault):
        lib.ffg_read_null()
    with pytest.raises(ffiguard.LibraryQuarantined):
        lib.ffg_add(1, 2)
    assert ffiguard.release(lib.ffg_add) is True  # a function of the library releases it too
    assert lib.ffg_add(2, 2) == 4


def test_global_default_applies_to_libraries_without_their_own(default_policy):
    assert ffiguard.set_default_policy("quarantine") == "raise"
    follows, own = load(), load("raise")
    with pytest.raises(ffiguard.SegmentationFault):
        follows.ffg_read_null()
    with pytest.raises(ffiguard.SegmentationFault):
        own.ffg_read_null()
    with pytest.raises(ffiguard.LibraryQuarantined):
        follows.ffg_add(1, 2)
    assert own.ffg_add(1, 2) == 3
    assert policy.is_quarantined(follows) and not policy.is_quarantined(own)
    ffiguard.set_default_policy("raise")
    assert ffiguard.release(follows) is True


def test_policy_can_change_on_a_loaded_library():
    lib = load()
    lib._ffiguard_policy.on_fault = "quarantine"
    with pytest.raises(ffiguard.SegmentationFault):
        lib.ffg_read_null()
    assert lib._ffiguard_policy.quarantined is True
    ffiguard.release(lib._ffiguard_policy)
    assert lib.ffg_add(1, 1) == 2


def test_invalid_values():
    with pytest.raises(ValueError, match="on_fault must be one of raise, quarantine, exit, not 'die'"):
        ffiguard.set_default_policy("die")
    with pytest.raises(ValueError):
        ffiguard.CDLL(CRASHERS_PATH, on_fault="die")
    with pytest.raises(TypeError, match="release\\(\\) takes an ffiguard.CDLL"):
        ffiguard.release(object())


def test_guard_without_a_library_cannot_be_quarantined(default_policy):
    import ctypes

    fn = ffiguard.guard(ctypes.CDLL(CRASHERS_PATH).ffg_read_null)
    ffiguard.set_default_policy("quarantine")
    with pytest.raises(ffiguard.SegmentationFault):
        fn()
    with pytest.raises(ffiguard.SegmentationFault):  # no library policy: nothing to quarantine
        fn()


@pytest.mark.parametrize("how", ["library", "global"])
def test_exit_prints_the_report_and_exits_70(run_python, how):
    on_fault, setup = ("'exit'", "") if how == "library" else ("None", "ffiguard.set_default_policy('exit')")
    rc, out, err = run_python(f"""
        import atexit, ffiguard
        {setup}
        atexit.register(lambda: print("atexit ran"))
        lib = setup_signatures(ffiguard.CDLL(CRASHERS_PATH, on_fault={on_fault}))
        print("before", end="")  # unflushed: the exit policy flushes it
        try:
            lib.ffg_read_null()
        except BaseException as e:
            print("caught", type(e).__name__)
        print("after")
    """)
    assert rc == policy.EXIT_STATUS == 70, (out, err)
    assert out == "before"
    verb = "reading" if expected_access("read") else "at"  # AArch64 under qemu: no ESR
    assert err.startswith("SegmentationFault: SIGSEGV (SEGV_MAPERR: address not mapped) %s 0x0 "
                          "in ffg_read_at" % verb), err
    assert "  ffg_read_null()   (the Python arguments, as passed" in err
    assert "  on_fault:   exit (the process ends now, status 70)\n" in err
    assert "#0 0x" in err and "ffg_read_at+%#x" % ENTRY_PAD in err
    assert err.endswith('\nffiguard: on_fault="exit": ending the process with status 70.\n'), err
