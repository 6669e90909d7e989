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
import sys
import threading

__all__ = ["UnguardedModule", "unguarded", "guarded_modules"]

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
        if type(lib) is lib_type and _is_backend_ffi(backend, d.get("ffi")):
            found.append((name, module))
    return found


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
            else:
                reason = "not guarded"
            result.append(UnguardedModule(name, _path(module), reason))
        return sorted(result)
