"""`python -m ffiguard run`: the program runs as under plain python (argv, sys.path[0],
__main__, exit codes, tracebacks), with every library guarded from its first line; an
uncaught ForeignFault exits 70 with the report. Each case runs both ways and compares."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import CRASHERS_PATH, SIGNATURES_SRC, _clean_env

SHOW = r'''
import sys
main = sys.modules["__main__"]
print("argv", sys.argv)
print("path0", sys.path[0])
print("name", __name__, main is sys.modules[__name__])
print("file", __file__)
print("spec", None if __spec__ is None else (__spec__.name, __spec__.origin))
print("package", repr(__package__), "doc", repr(__doc__))
# exactly the names python sets, which change between versions: 3.15 dropped __cached__,
# 3.14 the empty __annotations__ of __main__
print("names", sorted(k for k in globals() if k.startswith("__")))
print("cached", repr(globals().get("__cached__", "<absent>")),
      "annotations", repr(globals().get("__annotations__", "<absent>")))
print("loader", type(__loader__).__name__)
'''

FAULT = SIGNATURES_SRC + r'''
import sys
lib = setup_signatures(ctypes.CDLL(sys.argv[1]))   # plain ctypes: guarded by `run`
print("before", flush=True)
def go():
    return lib.ffg_read_null()
go()
'''


def run(args, cwd, timeout=60):
    env = _clean_env()
    env.pop("FFIGUARD", None)  # plain python must stay plain (see test_env.py)
    proc = subprocess.run([sys.executable, *args], cwd=str(cwd), capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout, proc.stderr


def both(tmp_path, *target):
    """(plain python, ffiguard run) results for the same target and arguments."""
    return run(list(target), tmp_path), run(["-m", "ffiguard", "run", *target], tmp_path)


def without_runpy(lines):
    """A traceback's lines without the frames of runpy (and their source lines)."""
    kept, skipping = [], False
    for line in lines:
        if line.startswith("  File "):
            skipping = "runpy" in line
        elif not line.startswith("    "):
            skipping = False
        if not skipping:
            kept.append(line)
    return kept


@pytest.fixture
def prog(tmp_path):
    (tmp_path / "show.py").write_text(SHOW)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "mod.py").write_text(SHOW)
    (tmp_path / "pkg" / "__main__.py").write_text(SHOW)
    (tmp_path / "fault.py").write_text(FAULT)
    return tmp_path


def test_script_runs_as_under_python(prog):
    (prog / "sub").mkdir()
    os.symlink(str(prog / "show.py"), str(prog / "sub" / "link.py"))
    for target in (["show.py", "a", "--signals", "x", "-m", "y"], ["sub/link.py"],
                   [str(prog / "show.py")]):
        plain, guarded = both(prog, *target)
        assert plain[0] == guarded[0] == 0, guarded
        assert guarded[1] == plain[1], target
        assert "argv ['show.py', 'a', '--signals', 'x', '-m', 'y']" in both(prog, *target)[1][1] \
            or target[0] != "show.py"


@pytest.mark.parametrize("module", ["pkg.mod", "pkg"])
def test_module_runs_as_under_python(prog, module):
    plain, guarded = both(prog, "-m", module, "--on-fault", "x")
    assert plain[0] == guarded[0] == 0, guarded
    assert guarded[1] == plain[1]
    assert "argv ['%s', '--on-fault', 'x']" % (prog / "pkg" / (
        "mod.py" if module == "pkg.mod" else "__main__.py")) in guarded[1]


def test_exit_codes_and_tracebacks(prog):
    (prog / "exit3.py").write_text("import sys; sys.exit(3)\n")
    (prog / "exitmsg.py").write_text("raise SystemExit('bye now')\n")
    (prog / "error.py").write_text("def f():\n    raise ValueError('boom')\nprint('out')\nf()\n")
    (prog / "interrupt.py").write_text("raise KeyboardInterrupt\n")
    (prog / "syntax.py").write_text("print(1)\nx = = 1\n")
    for script in ("exit3.py", "exitmsg.py", "error.py", "interrupt.py", "syntax.py"):
        plain, guarded = both(prog, script)
        assert guarded == plain, script
        assert plain[0] == {"exit3.py": 3, "interrupt.py": -signal.SIGINT}.get(script, 1)
    # -m: the same traceback, minus python's own runpy frames
    (prog / "pkg" / "bad.py").write_text("import sys\ndef f():\n    raise ValueError(sys.argv[1:])\nf()\n")
    plain, guarded = both(prog, "-m", "pkg.bad", "z")
    assert plain[0] == guarded[0] == 1
    assert guarded[2].splitlines() == without_runpy(plain[2].splitlines())
    assert "ffiguard" not in guarded[2] and "runpy" not in guarded[2]


def test_missing_targets_fail_as_python_does(prog):
    for target in (["nosuch.py"], ["-m", "nosuch"], ["-m", "nosuchpkg.mod"]):
        plain, guarded = both(prog, *target)
        assert guarded == plain, target


def test_uncaught_fault_exits_70_with_the_report(prog):
    plain, guarded = both(prog, "fault.py", CRASHERS_PATH)
    assert plain[0] == -signal.SIGSEGV
    rc, out, err = guarded
    assert rc == 70, err
    assert out == "before\n"
    assert err.startswith("Traceback (most recent call last):\n  File \"%s\"" % (prog / "fault.py"))
    assert "in go\n" in err and "ffiguard/run.py" not in err
    assert "SegmentationFault: SIGSEGV (SEGV_MAPERR" in err
    assert "Native backtrace of ffg_read_null()" in err   # the note, in the traceback
    assert "registers" in err.lower()                       # the full report
    assert err.rstrip().endswith(
        "ffiguard run: uncaught SegmentationFault from a foreign call; exit status 70.")


def test_caught_fault_and_policies(prog):
    (prog / "catch.py").write_text(SIGNATURES_SRC + textwrap.dedent(r'''
        import sys, ffiguard
        lib = setup_signatures(ctypes.CDLL(sys.argv[1]))
        for i in range(2):
            try:
                lib.ffg_read_null()
            except Exception as e:
                print(type(e).__name__)
        print(ffiguard.get_default_policy(), ffiguard.stats()["recovered"])
    '''))
    rc, out, err = run(["-m", "ffiguard", "run", "catch.py", CRASHERS_PATH], prog)
    assert (rc, out) == (0, "SegmentationFault\nSegmentationFault\nraise 2\n"), err
    rc, out, err = run(["-m", "ffiguard", "run", "--on-fault", "quarantine", "catch.py",
                        CRASHERS_PATH], prog)
    assert (rc, out) == (0, "SegmentationFault\nLibraryQuarantined\nquarantine 1\n"), err
    rc, out, err = run(["-m", "ffiguard", "run", "--on-fault=exit", "catch.py", CRASHERS_PATH], prog)
    assert (rc, out) == (70, ""), err
    assert 'on_fault="exit"' in err


def test_signals_option(prog):
    (prog / "abort.py").write_text(SIGNATURES_SRC + textwrap.dedent(r'''
        import sys
        lib = setup_signatures(ctypes.CDLL(sys.argv[1]))
        try:
            getattr(lib, sys.argv[2])()
        except Exception as e:
            print(type(e).__name__)
    '''))
    base = ["-m", "ffiguard", "run", "--signals", "SEGV,BUS", "abort.py", CRASHERS_PATH]
    assert run(base + ["ffg_read_null"], prog)[:2] == (0, "SegmentationFault\n")
    assert run(base + ["ffg_abort"], prog)[0] == -signal.SIGABRT  # not trapped: dies


def test_usage_errors(prog):
    for args in (["--bogus", "show.py"], ["--signals", "SEGV,HUP", "show.py"],
                 ["--on-fault", "ignore", "show.py"], [], ["-m"]):
        rc, out, err = run(["-m", "ffiguard", "run", *args], prog)
        assert rc == 2 and "python -m ffiguard run: error:" in err, (args, err)
    rc, out, err = run(["-m", "ffiguard", "run", "--help"], prog)
    assert rc == 0 and out.startswith("usage: python -m ffiguard run [options] script.py")


def test_subprocesses_option(prog):
    (prog / "parent.py").write_text(textwrap.dedent(r'''
        import os, subprocess, sys
        child = "import ctypes, sys; print('ffiguard' in sys.modules and sys.modules['ffiguard'].installed())"
        print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout.strip())
        print(os.environ.get("FFIGUARD_SIGNALS"))
    '''))
    assert run(["-m", "ffiguard", "run", "parent.py"], prog)[1] == "False\nNone\n"
    rc, out, err = run(["-m", "ffiguard", "run", "--subprocesses", "--signals", "SEGV",
                        "parent.py"], prog)
    assert (rc, out) == (0, "True\nSEGV\n"), err


def test_command_runs_as_under_python(prog):
    code = SHOW.replace('print("file", __file__)\n', "")   # python -c has no __file__
    for target in (["-c", code, "a", "-m", "x"], ["-c" + code]):
        plain, guarded = both(prog, *target)
        assert plain[0] == guarded[0] == 0, guarded
        assert guarded[1] == plain[1]
    plain, guarded = both(prog, "-c", code, "a", "-m", "x")
    assert "argv ['-c', 'a', '-m', 'x']\npath0 \nname __main__ True\n" in guarded[1]
    # errors and tracebacks as python's: File "<string>"
    for code in ("def f():\n    raise ValueError('boom')\nf()\n", "x = = 1\n",
                 "import sys; sys.exit(4)"):
        plain, guarded = both(prog, "-c", code)
        assert guarded == plain, code
    rc, out, err = run(["-m", "ffiguard", "run", "-c", "import sys; print(sys.modules['ffiguard']"
                        ".installed())"], prog)
    assert (rc, out) == (0, "True\n"), err
    rc, out, err = run(["-m", "ffiguard", "run", "-c"], prog)
    assert rc == 2 and "-c needs a command" in err


XDIST_TESTS = SIGNATURES_SRC + r'''
import os
lib = setup_signatures(ctypes.CDLL(%r))


def test_segv():
    lib.ffg_read_null()


def test_worker_guarded():
    import sys
    assert os.environ.get("PYTEST_XDIST_WORKER")
    assert "ffiguard" in sys.modules and sys.modules["ffiguard"].installed()
    # run's --timeout / --interruptible reach the workers too
    assert lib.ffg_add.timeout == 5.0 and lib.ffg_add.interruptible is True


def test_after():
    assert lib.ffg_add(1, 2) == 3
''' % CRASHERS_PATH


def test_xdist_workers_are_guarded(prog):
    pytest.importorskip("xdist")
    (prog / "test_native.py").write_text(XDIST_TESTS)
    rc, out, err = run(["-m", "ffiguard", "run", "--timeout", "5", "--interruptible", "-m",
                        "pytest", "-n", "2", "-p", "no:cacheprovider", "test_native.py"], prog,
                       timeout=120)
    assert rc == 1, out + err
    assert "1 failed, 2 passed" in out, out
    assert "node down" not in out and "crashed worker" not in out, out
    assert "FAULTED test_native.py::test_segv - SIGSEGV (failed)" in out
    assert "ffiguard: 1 test faulted in foreign code (SIGSEGV: 1)" in out
    assert "ffiguard native report" in out
