"""Compiled cffi modules (API mode): which are guarded, and guarding them in place.

A compiled cffi module (``ffibuilder.set_source("_foo", ...)`` -> ``_foo.*.so``) has an
``ffi`` (a ``_cffi_backend.FFI``) and a ``lib`` (a ``_cffi_backend.Lib``) whose
functions are builtins made by cffi. While ffiguard is installed, every such module is
guarded in place (docs/design.md, "Compiled cffi modules"): each of its lib's builtins
is made to call its cffi wrapper through ffiguard's thunk, so ``lib.f(...)`` raises
ForeignFault instead of crashing, while ``lib`` stays the very same object (constants,
globals, ``ffi.addressof(lib, "f")``, ``dir(lib)``, callbacks: all cffi's own).

``unguarded()`` and ``guarded_modules()`` say which modules in sys.modules are guarded.
Nothing here imports cffi: a program that never loaded ``_cffi_backend`` has no
compiled cffi module.
"""
import collections
import importlib.machinery
import sys
import threading

from . import _core

__all__ = ["UnguardedModule", "unguarded", "guarded_modules", "guard_builtin", "guard_module",
           "unguard_modules", "mode"]

UnguardedModule = collections.namedtuple("UnguardedModule", "name path reason")
UnguardedModule.__doc__ = """A compiled cffi module in sys.modules whose calls are not guarded:
name (its __name__), path (its file, or None), reason (a short sentence)."""

_lock = threading.RLock()
_guarded = {}    # module name -> the lib object guarded in place (while installed)
_failed = {}     # module name -> why guarding it failed
_REASON_NOT_INSTALLED = "ffiguard is not installed (install(), run, FFIGUARD=1 or pytest --ffiguard guard it)"


def _compiled_modules():
    """(name, module) of every compiled cffi module in sys.modules."""
    backend = sys.modules.get("_cffi_backend")
    if backend is None:
        return []
    lib_type = getattr(backend, "Lib", None)
    if lib_type is None:
        return []
    found = []
    for name, module in list(sys.modules.items()):
        d = getattr(module, "__dict__", None)
        if type(d) is not dict:
            continue
        lib = d.get("lib")
        if type(lib) is lib_type and _is_backend_ffi(backend, d.get("ffi")) and _own_lib(module, lib):
            found.append((name, module))
    return found


def _own_lib(module, lib):
    """The module made this lib, rather than imported it (``from _foo import ffi, lib``
    in some other module). An extension module holding a cffi lib is the compiled module
    itself. Without a file (a module built into the interpreter), the lib's name says:
    "<name>.lib" after the module name given to ``set_source()``, which is the module's
    own name or, for a module placed inside a package (PyNaCl's
    ``set_source("_sodium", ...)`` imported as ``nacl._sodium``), its last part."""
    try:
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
        lib_name = getattr(lib, "__name__", None)
        mod_name = getattr(module, "__name__", None)
        if not isinstance(lib_name, str) or not isinstance(mod_name, str) \
                or not lib_name.endswith(".lib"):
            return False
        made_as = lib_name[:-len(".lib")]
        return mod_name == made_as or mod_name.endswith("." + made_as)
    except Exception:
        return False


def _is_backend_ffi(backend, ffi):
    # install() replaces _cffi_backend.FFI by a subclass: a compiled module's ffi is of
    # the C type itself, which both are (or derive from)
    cls = type(ffi)
    return any(c.__module__ == "_cffi_backend" and c.__name__ == "FFI" for c in cls.__mro__) \
        or isinstance(ffi, getattr(backend, "FFI", ()))


def _path(module):
    return getattr(module, "__file__", None)


def guarded_modules():
    """Names of the compiled cffi modules in sys.modules whose calls are guarded."""
    with _lock:
        return sorted(name for name, module in _compiled_modules()
                      if _guarded.get(name) is module.__dict__.get("lib"))


def unguarded():
    """Every compiled cffi module in sys.modules whose calls are not guarded, as
    UnguardedModule(name, path, reason)."""
    from . import everything
    with _lock:
        result = []
        for name, module in _compiled_modules():
            if _guarded.get(name) is module.__dict__.get("lib"):
                continue
            if name in _failed:
                reason = _failed[name]
            elif not everything.installed():
                reason = _REASON_NOT_INSTALLED
            else:  # installed, but its import did not go through importlib's ExtensionFileLoader
                reason = "imported in a way ffiguard did not see (not by importlib's ExtensionFileLoader)"
            result.append(UnguardedModule(name, _path(module), reason))
        return sorted(result)


# ---- the mechanism ------------------------------------------------------------------

_BUILTIN = type(len)
_made = {}  # (builtin, policy, shield, interruptible, timeout) -> its GuardedFunction (kept: see cffi_api.inc)
_policies = {}  # (module name, on_fault) -> the module's policy
_policy_in_use = {}  # module name -> the policy of its installation now
_options_in_use = {}  # module name -> (interruptible, timeout) of its installation now


def _functions(lib):
    """(name, builtin) of every function of a compiled module's lib. cffi builds them
    lazily, on first access: this builds them all."""
    found = []
    for name in dir(lib):
        if name.startswith("__") and name.endswith("__"):
            continue
        try:
            value = getattr(lib, name)
        except Exception:  # a declared name cffi cannot resolve: not ours to judge
            continue
        if type(value) is _BUILTIN and getattr(value, "__self__", None) is lib \
                and _core.cffi_target(value) is not None:
            found.append((name, value))
    return found


_got_tables = {}  # load bias of an object -> its got_slots() table, kept current
_modes = {}  # builtin -> "got" or "wrapper": how its calls are guarded


def _got_target(wrapper, name):
    """GOT mode for the function `name` whose cffi wrapper is at `wrapper`: if the
    module reaches `name` through GOT slots that hold exactly that exported function,
    point them all at its guard stub and return its address; else None (the module
    calls it directly: whole-wrapper mode). Slots are left pointing at the stub for
    good (an unarmed stub jumps straight on)."""
    from .for_ctypes import _stub_for
    where = _core.dladdr(wrapper)
    if not where:
        return None
    table = _got_tables.get(where[1])
    if table is None:
        table = _got_tables[where[1]] = _core.got_slots(wrapper)
    entries = table.get(name)
    if not entries:
        return None
    functions = {_core.stub_target(value) or value for _, value in entries}
    if len(functions) != 1:
        return None
    real = functions.pop()
    found = _core.dladdr(real)
    # an exported function exactly (not a lazy-binding PLT entry, not an IFUNC's choice)
    if not found or found[2] != name or found[3] != real:
        return None
    stub = _stub_for(real)
    for i, (slot, value) in enumerate(entries):
        if value != stub:
            if not _core.got_write(slot, value, stub):
                return None  # changed under us: leave this function to whole-wrapper mode
            entries[i] = (slot, stub)
    return real


def guard_builtin(builtin, name, policy, shield=True, interruptible=False, timeout=None):
    """A GuardedFunction calling the compiled cffi function `builtin` (lib.f) guarded.
    GOT mode where the module calls the C function `name` through GOT slots: the
    wrapper is called directly and the function, through its stub in the slots, is
    armed; whole-wrapper mode otherwise: cffi's wrapper is called through its own stub
    (docs/design.md, "Compiled cffi modules"). shield=False: its calls never lock
    memory shielded with ffiguard.shield() or shield_interpreter(). interruptible,
    timeout: issue 16 (Ctrl-C, seconds per call). Made once per builtin, policy and
    these options."""
    from .for_ctypes import _stub_for
    shield, interruptible = bool(shield), bool(interruptible)
    key = (builtin, policy, shield, interruptible, timeout)
    gf = _made.get(key)
    if gf is None:
        with _lock:
            gf = _made.get(key)
            if gf is None:
                wrapper = _core.cffi_target(builtin)
                if wrapper is None:
                    raise TypeError("%r is not a compiled cffi module's function" % (builtin,))
                real = _got_target(wrapper, name)
                if real is not None:
                    gf = _core.cffi_guard(builtin, name, policy, wrapper, real, shield)
                    _modes[builtin] = "got"
                else:
                    gf = _core.cffi_guard(builtin, name, policy, _stub_for(wrapper), None, shield)
                    _modes[builtin] = "wrapper"
                gf.interruptible, gf.timeout = interruptible, timeout  # issue 16
                _made[key] = gf
    return gf


def mode(builtin):
    """How calls of a guarded compiled cffi function are guarded: "got", "wrapper", or
    None (never guarded)."""
    return _modes.get(builtin)


def _is_compiled(module):
    backend = sys.modules.get("_cffi_backend")
    d = getattr(module, "__dict__", None)
    if backend is None or type(d) is not dict:
        return False
    lib_type = getattr(backend, "Lib", None)
    return lib_type is not None and type(d.get("lib")) is lib_type and \
        _is_backend_ffi(backend, d.get("ffi")) and _own_lib(module, d["lib"])


def guard_module(module, on_fault=None, interruptible=None, timeout=None):
    """Guard a compiled cffi module in place: every function of its lib. Returns True if
    the module is (now) guarded; False if it is not a compiled cffi module. A failure
    is recorded for unguarded() and raised. interruptible (None: the default of
    set_default_interruptible()) and timeout: issue 16, for every function."""
    from .for_ctypes import make_policy
    if not _is_compiled(module):
        return False
    name = module.__name__
    lib = module.__dict__["lib"]
    with _lock:
        from .interrupt import resolve_interruptible
        options = (resolve_interruptible(interruptible), timeout)
        if _guarded.get(name) is lib and _options_in_use.get(name) == options:
            return True
        try:
            policy = _policies.get((name, on_fault))
            if policy is None:  # one per module and on_fault: install() again reuses it
                policy = _policies[(name, on_fault)] = make_policy(name, on_fault)
            guarded = [guard_builtin(builtin, fname, policy, True, *options)
                       for fname, builtin in _functions(lib)]
            for gf in guarded:
                _core.cffi_patch(gf, True)
        except BaseException as e:
            _failed[name] = "guarding it failed: %s" % (e,)
            raise
        _failed.pop(name, None)
        _guarded[name] = lib
        _policy_in_use[name] = policy
        _options_in_use[name] = options
        return True


def policy_of(obj):
    """The policy of a compiled module guarded in place, given its lib or one of its
    functions; None otherwise (ffiguard.release(lib) uses it)."""
    if type(obj) is _BUILTIN:
        gf = _core.cffi_patched(obj)
        return gf.__policy__ if gf is not None else None
    with _lock:
        for name, lib in _guarded.items():
            if lib is obj:
                return _policy_in_use.get(name)
    return None


def unguard_modules():
    """Put every module guarded in place back as cffi made it."""
    with _lock:
        for lib in _guarded.values():
            for _, builtin in _functions(lib):
                gf = _core.cffi_patched(builtin)
                if gf is not None:
                    _core.cffi_patch(gf, False)
        _guarded.clear()
        _failed.clear()
        _policy_in_use.clear()
        _options_in_use.clear()


def guard_loaded(on_fault=None, interruptible=None, timeout=None):
    """Guard every compiled cffi module already in sys.modules (install() does)."""
    for _, module in _compiled_modules():
        try:
            guard_module(module, on_fault, interruptible, timeout)
        except Exception:
            pass  # recorded in _failed: unguarded() says why


def after_import(module, on_fault=None, interruptible=None, timeout=None):
    """An extension module was just imported while installed: guard it if it is a
    compiled cffi module. Never breaks the import (a failure is listed by unguarded())."""
    try:
        guard_module(module, on_fault, interruptible, timeout)
    except Exception:
        pass
