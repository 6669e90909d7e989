"""Choosing which signals are trapped: ffiguard.signals.parse() and select()."""
import signal

import pytest

from ffiguard import signals


@pytest.mark.parametrize("spec, expected", [
    ("SEGV,BUS", (signal.SIGBUS, signal.SIGSEGV)),
    ("sigsegv", (signal.SIGSEGV,)),
    ("11, abrt", (signal.SIGABRT, signal.SIGSEGV)),
    ("all", tuple(sorted(signals.ALL))),
    ("none", ()),
    ("", ()),
])
def test_parse(spec, expected):
    assert signals.parse(spec) == expected


@pytest.mark.parametrize("spec", ["SEGV,INT", "KILL", "bogus", "9"])
def test_parse_rejects_signals_ffiguard_does_not_trap(spec):
    with pytest.raises(ValueError, match="ffiguard traps SIGSEGV"):
        signals.parse(spec)


def test_deselected_signal_dies_selected_one_is_still_trapped(run_python):
    rc, out, err = run_python("""
        import ffiguard
        from ffiguard import signals
        assert signals.select("SEGV") == (signal.SIGSEGV,)
        lib = ffiguard.CDLL(CRASHERS_PATH)
        setup_signatures(lib)
        try:
            lib.ffg_read_null()
        except ffiguard.SegmentationFault:
            print("segv trapped", flush=True)
        print(ffiguard._core.is_trapped(signal.SIGABRT), flush=True)
        lib.ffg_abort()
        print("not reached")
    """)
    assert out == "segv trapped\nFalse\n", (out, err)
    assert rc == -signal.SIGABRT, (rc, err)


def test_deselect_puts_back_the_previous_python_handler(run_python):
    rc, out, err = run_python("""
        def previous(signum, frame):
            print("previous handler", signum, flush=True)
            os._exit(7)
        signal.signal(signal.SIGABRT, previous)
        import ffiguard
        ffiguard.signals.select("SEGV,BUS,ILL,FPE")
        print(signal.getsignal(signal.SIGABRT) is previous, flush=True)
        os.kill(os.getpid(), signal.SIGABRT)
    """)
    assert out == "True\nprevious handler 6\n", (out, err)
    assert rc == 7, err


def test_reselect_traps_again(run_python):
    rc, out, err = run_python("""
        import ffiguard
        ffiguard.signals.select("none")
        ffiguard.signals.select("all")
        lib = ffiguard.CDLL(CRASHERS_PATH)
        setup_signatures(lib)
        for f in (lib.ffg_read_null, lib.ffg_abort, lib.ffg_illegal_instruction):
            try:
                f()
            except ffiguard.ForeignFault as e:
                print(e.signal.name, flush=True)
    """)
    assert out == "SIGSEGV\nSIGABRT\nSIGILL\n", (out, err)
    assert rc == 0, err
