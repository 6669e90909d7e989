"""ffiguard's startup hook for programs started by other tools (not a module to import).

This directory holds only this file. With it first on PYTHONPATH, every Python process
that inherits the environment imports it at start-up (the `site` module imports
`sitecustomize`), and it:

1. switches guarding on when FFIGUARD is set (not ""/0/no/false/off), with
   FFIGUARD_SIGNALS and FFIGUARD_ON_FAULT: ffiguard.run.activate_from_environment();
   any error is printed as one line and the program runs unguarded;
2. runs the sitecustomize that this one shadows (the next one on sys.path: a distro's,
   a virtualenv's, the user's), as module `sitecustomize`, so nothing is lost.

`python -m ffiguard env` prints the variables. See docs/run-and-pytest.md.
"""


def _ffiguard_startup():
    import os
    import sys

    if os.environ.get("FFIGUARD", "").strip().lower() not in ("", "0", "no", "false", "off"):
        try:
            from ffiguard import run

            run.activate_from_environment()
        except Exception as e:
            sys.stderr.write("ffiguard: FFIGUARD=%s is set, but guarding could not be switched "
                             "on (%s: %s); running unguarded\n"
                             % (os.environ.get("FFIGUARD"), type(e).__name__, e))

    # Chain to the sitecustomize this one shadows: the first on sys.path after our
    # directory. Errors in it propagate, so `site` reports them as it would have.
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest, after = [], False
    for entry in sys.path:
        try:
            ours = os.path.samefile(entry or os.curdir, here)
        except OSError:
            ours = False
        if ours:
            after, rest = True, []
        elif after:
            rest.append(entry)
    if not after:
        return
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_ffiguard_startup()
del _ffiguard_startup
