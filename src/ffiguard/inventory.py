"""What ffiguard guards in this process, and what was imported unguarded: the pytest
plugin's header and end-of-session lines (and anyone who wants to know).

Read when asked, never on a call path:

* guarded libraries and functions: the GuardedFunction objects alive now (a library's
  functions are made when first looked up, so these are the functions the program has
  used) grouped by their library, plus the guarded library objects (ffiguard.CDLL, a
  guarded cffi library) that have none yet. Found by walking the garbage collector's
  objects: a few milliseconds, once per question.
* compiled cffi (API-mode) modules: ``ffiguard.guarded_modules()`` names those ffiguard
  guards, ``ffiguard.unguarded()`` lists the ones imported unguarded, with why.
"""
import collections
import gc
import os
import sys

__all__ = ["Inventory", "take", "unguarded", "short_list", "as_dict", "merge", "lines"]

SHORT_NAMES = 4  # names shown before "and N more"

Inventory = collections.namedtuple("Inventory", "libraries functions modules unguarded")
Inventory.__doc__ = """libraries: {library name: sorted function names guarded in it};
functions: how many guarded functions; modules: names of the compiled cffi modules
guarded; unguarded: [(name, path, reason)] of modules imported unguarded."""


def _guarded_objects():
    import ffiguard
    from . import for_ctypes

    cffi_library = None
    if "_cffi_backend" in sys.modules:
        from .for_cffi import GuardedLibrary as cffi_library
    functions, libraries = [], []
    for obj in gc.get_objects():
        if isinstance(obj, ffiguard.GuardedFunction):
            functions.append(obj)
        elif isinstance(obj, for_ctypes.CDLL) or (
                cffi_library is not None and isinstance(obj, cffi_library)):
            libraries.append(obj)
    return functions, libraries


def _library_name(obj):
    """A guarded library's name as its reports give it (its policy's name)."""
    policy = getattr(obj, "_ffiguard_policy", None)
    name = getattr(policy, "name", None) or getattr(obj, "_name", None)
    return _short(name) if name else type(obj).__name__


def _short(name):
    return os.path.basename(name) if isinstance(name, str) and os.sep in name else str(name)


def take():
    """An Inventory of this process, now."""
    import ffiguard

    functions, libraries = _guarded_objects()
    by_library = {}
    for f in functions:
        policy = getattr(f, "__policy__", None)
        name = _short(getattr(policy, "name", None) or "(no library)")
        by_library.setdefault(name, set()).add(getattr(f, "__name__", "?"))
    for lib in libraries:
        by_library.setdefault(_library_name(lib), set())
    modules = sorted(ffiguard.guarded_modules())
    return Inventory({k: sorted(v) for k, v in sorted(by_library.items())},
                     sum(len(v) for v in by_library.values()), modules,
                     [tuple(u) for u in unguarded()])


def unguarded():
    """[(name, path, reason)] of the compiled cffi modules imported unguarded
    (ffiguard.unguarded())."""
    import ffiguard

    return sorted((u.name, u.path, u.reason) for u in ffiguard.unguarded())


def short_list(names, limit=SHORT_NAMES):
    """'a, b, c, d and 3 more'."""
    names = list(names)
    if len(names) <= limit:
        return ", ".join(names)
    return "%s and %d more" % (", ".join(names[:limit]), len(names) - limit)


def as_dict(inv):
    """A JSON-able form (what an xdist worker sends its controller)."""
    return {"libraries": inv.libraries, "functions": inv.functions,
            "modules": inv.modules, "unguarded": [list(u) for u in inv.unguarded]}


def merge(dicts):
    """One Inventory out of several as_dict() forms (the workers of a session)."""
    libraries, modules, unguarded_ = {}, set(), {}
    for d in dicts:
        for lib, funcs in d.get("libraries", {}).items():
            libraries.setdefault(lib, set()).update(funcs)
        modules.update(d.get("modules", ()))
        for u in d.get("unguarded", ()):
            unguarded_.setdefault(u[0], tuple(u))
    return Inventory({k: sorted(v) for k, v in sorted(libraries.items())},
                     sum(len(v) for v in libraries.values()), sorted(modules),
                     [unguarded_[k] for k in sorted(unguarded_)])


def lines(inv):
    """The plugin's lines about an Inventory: what was guarded, what was not."""
    out = []
    libs = inv.libraries
    if libs:
        shown = ["%s (%s)" % (lib, short_list(funcs, 3)) if funcs else lib
                 for lib, funcs in libs.items()]
        out.append("guarded: %d librar%s, %d function%s: %s" % (
            len(libs), "y" if len(libs) == 1 else "ies", inv.functions,
            "" if inv.functions == 1 else "s", short_list(shown)))
    else:
        out.append("guarded: no library loaded through ctypes/cffi yet")
    if inv.modules:
        out.append("guarded compiled cffi modules: %s" % short_list(inv.modules))
    if inv.unguarded:
        by_reason = {}
        for name, _path, reason in inv.unguarded:
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            out.append("NOT guarded: %d module%s imported unguarded: %s (%s)" % (
                len(names), "" if len(names) == 1 else "s", short_list(names), reason))
    return out
