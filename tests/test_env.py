"""FFIGUARD=1 with ffiguard's startup directory on PYTHONPATH (`python -m ffiguard env`):
programs started by other tools guard everything from start-up, their Python
subprocesses too, and the sitecustomize it shadows still runs."""
import os
import subprocess
import sys
import textwrap

from conftest import CRASHERS_PATH, SIGNATURES_SRC, _clean_env

from ffiguard import run as ffg_run

CHILD = SIGNATURES_SRC + textwrap.dedent(r'''
    import subprocess, sys
    lib = setup_signatures(ctypes.CDLL(%r))   # plain ctypes
    try:
        lib.ffg_read_null()
    except Exception as e:
        print(len(sys.argv), type(e).__name__, flush=True)
    if len(sys.argv) == 1:                     # and once more in a subprocess
        subprocess.run([sys.executable, __file__, "child"], check=True)
''' % CRASHERS_PATH)


def env(**extra):
    e = _clean_env()
    for name in ("PYTHONPATH", "FFIGUARD", "FFIGUARD_SIGNALS", "FFIGUARD_ON_FAULT"):
        e.pop(name, None)
    e.update(extra)
    return e


def py(args, environ, cwd, shell=False):
    proc = subprocess.run(args if shell else [sys.executable, *args], env=environ, cwd=str(cwd),
                          capture_output=True, text=True, timeout=60, shell=shell)
    return proc.returncode, proc.stdout, proc.stderr


def test_env_command_and_subprocesses(tmp_path):
    rc, out, err = py(["-m", "ffiguard", "env", "--signals", "SEGV,ABRT", "--on-fault",
                       "quarantine"], env(PYTHONPATH="/x y"), tmp_path)
    assert rc == 0, err
    assert out.splitlines() == [
        "export FFIGUARD=1", "export FFIGUARD_SIGNALS=SEGV,ABRT",
        "export FFIGUARD_ON_FAULT=quarantine",
        "export PYTHONPATH='%s:/x y'" % ffg_run.startup_dir()]
    (tmp_path / "child.py").write_text(CHILD)
    script = 'eval "$(%s -m ffiguard env)" && exec %s child.py' % (sys.executable, sys.executable)
    rc, out, err = py(script, env(), tmp_path, shell=True)
    assert (rc, out) == (0, "1 SegmentationFault\n2 SegmentationFault\n"), err
    rc, out, err = py(["child.py"], env(), tmp_path)    # and without: the fault kills it
    assert rc < 0 and out == ""


def test_chains_to_the_sitecustomize_it_shadows(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "sitecustomize.py").write_text("import sys\nsys.user_sitecustomize = __name__\n")
    code = textwrap.dedent('''
        import ctypes, sys
        print(sys.user_sitecustomize, sys.modules["sitecustomize"].__file__)
        print("ffiguard" in sys.modules and sys.modules["ffiguard"].installed())
        if "ffiguard" in sys.modules:
            import ffiguard
            print(ffiguard.signals.TRAPPED, ffiguard.get_default_policy())
    ''')
    path = os.pathsep.join([ffg_run.startup_dir(), str(user)])
    rc, out, err = py(["-c", code], env(PYTHONPATH=path, FFIGUARD="1", FFIGUARD_SIGNALS="BUS",
                                        FFIGUARD_ON_FAULT="exit"), tmp_path)
    assert rc == 0, err
    assert out.splitlines() == ["sitecustomize %s" % (user / "sitecustomize.py"), "True",
                                "(<Signals.SIGBUS: 7>,) exit"]
    rc, out, err = py(["-c", code], env(PYTHONPATH=path, FFIGUARD="0"), tmp_path)
    assert (rc, err) == (0, "")
    assert out.splitlines() == ["sitecustomize %s" % (user / "sitecustomize.py"), "False"]
    # a bad setting: one line on stderr, and the program runs unguarded
    rc, out, err = py(["-c", code], env(PYTHONPATH=path, FFIGUARD="1", FFIGUARD_ON_FAULT="bogus"),
                      tmp_path)
    assert rc == 0 and out.splitlines()[0].startswith("sitecustomize ")
    assert err.startswith("ffiguard: FFIGUARD=1 is set, but guarding could not be switched on "
                          "(ValueError: on_fault must be one of")


def test_uncaught_fault_prints_the_report(tmp_path):
    code = SIGNATURES_SRC + "setup_signatures(ctypes.CDLL(%r)).ffg_read_null()\n" % CRASHERS_PATH
    rc, out, err = py(["-c", code], env(**ffg_run.environment(base={})), tmp_path)
    assert rc == 1
    assert err.startswith("Traceback (most recent call last):")
    assert "SegmentationFault: SIGSEGV" in err and "Registers at the fault" in err
    assert err.rstrip().endswith("ffiguard: uncaught SegmentationFault from a foreign call "
                                 "(FFIGUARD=1).")
