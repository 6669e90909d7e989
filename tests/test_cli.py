"""`python -m ffiguard demo` and `python -m ffiguard doctor` run, exit 0, and print what
they should; the demo has colours only for a terminal, and never with NO_COLOR."""
import os
import subprocess
import platform
import sys

import pytest

import ffiguard
from conftest import _clean_env


def run_cli(*args, env=None, timeout=120):
    e = _clean_env()
    e.pop("NO_COLOR", None)
    e.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "ffiguard", *args], capture_output=True,
                          text=True, timeout=timeout, env=e, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout, proc.stderr


def test_doctor():
    rc, out, err = run_cli("doctor")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "ffiguard doctor: what this machine supports (paste this into bug reports)"
    assert "ffiguard:        %s" % ffiguard.__version__ in lines
    assert "architecture:    %s" % platform.machine() in lines
    assert any(l.startswith("kernel:          Linux ") for l in lines)
    assert any(l.startswith("libc:            glibc ") for l in lines)
    impl = "python:          CPython %d.%d." % sys.version_info[:2]
    assert any(l.startswith(impl) for l in lines), out
    assert any(("free-threaded build" in l or "GIL build (not free-threaded)" in l)
               for l in lines if l.startswith("python:"))
    for name in ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT"):
        assert "  %-8s ffiguard's handler is installed" % name in lines
    keys = [l for l in lines if l.startswith("protection keys: ")]
    assert len(keys) == 1
    assert keys[0] in ("protection keys: yes", "protection keys: no (pkey_alloc: Invalid argument)") \
        or keys[0].startswith("protection keys: no (")
    assert any(l.startswith("symbolizers:     (in order of preference; in use: ") for l in lines)
    for name in ("pyelftools", "llvm-symbolizer", "addr2line", "fallback"):
        assert any(l.startswith("  %-16s " % name) for l in lines), name


def test_protection_keys_answer():
    from ffiguard.__main__ import protection_keys

    answer = protection_keys()
    assert answer == "yes" or answer.startswith("no (pkey_alloc: "), answer


@pytest.mark.parametrize("env", [{"NO_COLOR": "1"}, {}])
def test_demo_plain_without_a_terminal(env):
    rc, out, err = run_cli("demo", env=env)
    assert rc == 0, (out, err)
    assert "\x1b" not in out and "\x1b" not in err
    assert out.count(", as expected:") == 10
    assert "[10/10] call through a NULL function pointer: ffg_call_null()" in out
    assert out.count("Native backtrace") == 10
    assert "crashers.c:" in out
    assert "The process (pid " in out and "survived all 10 faults" in out


def test_demo_colour_when_asked_and_short_form():
    rc, out, err = run_cli("demo", "--color", "always", "--short", "--frames", "1")
    assert rc == 0, (out, err)
    assert "\x1b[1m[1/10] NULL read: ffg_read_null()\x1b[0m" in out
    assert "\x1b[32mcaught SegmentationFault, as expected\x1b[0m:" in out
    assert "  ... 1 more frames: see e.report()" in out  # ffg_read_null's second frame
    rc, out, err = run_cli("demo", "--color", "always", env={"NO_COLOR": "1"})
    assert rc == 0 and "\x1b[" in out  # an explicit --color always wins over NO_COLOR


def test_demo_colour_on_a_terminal_unless_no_color():
    import pty

    for env, coloured in (({}, True), ({"NO_COLOR": "1"}, False)):
        master, slave = pty.openpty()
        e = _clean_env()
        e.pop("NO_COLOR", None)
        e.update(env)
        proc = subprocess.Popen([sys.executable, "-m", "ffiguard", "demo", "--short"],
                                stdout=slave, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=e)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        os.close(master)
        assert proc.wait(timeout=120) == 0
        out = b"".join(chunks).decode()
        assert ("\x1b[" in out) is coloured, env
        assert "survived all 10 faults" in out


def test_doctor_says_whose_handler_is_first(run_python):
    """doctor tells apart ffiguard's handler, one put over it (first in line, chaining to
    ffiguard) and SIG_DFL put over it (refresh() puts ffiguard's back)."""
    rc, out, err = run_python("""
import faulthandler, runpy
import ffiguard
faulthandler.enable()                     # over ffiguard's, which goes back on top
signal.signal(signal.SIGILL, signal.SIG_DFL)
signal.signal(signal.SIGFPE, lambda *a: None)  # a Python handler over ffiguard's
sys.argv = ["ffiguard", "doctor"]
runpy.run_module("ffiguard", run_name="__main__")
""")
    assert rc == 0, err
    lines = {l.split()[0]: l for l in out.splitlines() if l.startswith("  SIG")}
    assert "NOT trapped now: SIG_DFL was installed" in lines["SIGILL"], out
    assert "another handler" in lines["SIGFPE"] and "first in line" in lines["SIGFPE"], out
    # faulthandler.enable() is followed: ffiguard goes back on top of faulthandler's.
    assert lines["SIGSEGV"].endswith("ffiguard's handler is installed"), out
