"""Guarded cffi: ffiguard.guard(lib), guard(ffi, lib), guard(function_pointer).

A cffi function is guarded by calling it through a guard stub: the function's address
gets a stub (the same stubs as ctypes', one per target), the stub's address is cast to
the function's own cffi type, and that cdata is wrapped in a GuardedFunction. cffi keeps
doing everything it does (argument conversion and its TypeErrors, errno, callbacks,
structs by value, variadic calls), through libffi, to the stub, which jumps to the
function under the guard.

* ABI mode (``ffi.dlopen``): ``lib.f`` is already a function-pointer cdata.
* API mode (a compiled module, ``from _mod import ffi, lib``): ``lib.f`` is a builtin
  whose C function is cffi's generated wrapper; the guarded library's ``f`` calls that
  wrapper through a guard stub (for_cffi_compiled.guard_builtin, the mechanism
  install() uses in place: docs/design.md, "Compiled cffi modules"), so cffi's own
  conversions, errno and GIL release stay, with no libffi round trip.

Only this module imports cffi's backend, and only ffiguard.guard() on a cffi object (or
install() once the program imports cffi) imports this module.
"""
import sys

import _cffi_backend as _backend

from . import _core
from .for_ctypes import _check_supported, _stub_for, make_policy

__all__ = ["guard_library", "guard_function", "GuardedLibrary", "is_cffi_object"]

_CData = _backend._CDataBase
_Lib = getattr(_backend, "Lib", None)  # out-of-line modules' lib (API mode, ABI out-of-line)
# Read at import: install() later replaces _cffi_backend.FFI by a subclass of this one
# (ffiguard.everything imports this module before it does).
_BackendFFI = getattr(_backend, "FFI", None)
_UINTPTR = _backend.new_primitive_type("uintptr_t")
_BUILTIN = type(len)


def _is_ffi(obj):
    if _BackendFFI is not None and isinstance(obj, _BackendFFI):
        return True
    api = sys.modules.get("cffi.api")
    return api is not None and isinstance(obj, api.FFI)


def _is_inline_library(obj):
    """A library from cffi.FFI().dlopen() (in-line ABI mode): an FFILibrary instance."""
    cls = type(obj)
    return cls.__name__.startswith("FFILibrary") and "__cffi_close__" in cls.__dict__


def is_library(obj):
    return (_Lib is not None and isinstance(obj, _Lib)) or _is_inline_library(obj)


def is_function_pointer(obj):
    return isinstance(obj, _CData) and _backend.typeof(obj).kind == "function"


def is_cffi_object(obj):
    return (isinstance(obj, (_CData, GuardedLibrary)) or is_library(obj) or _is_ffi(obj))


def _symbol_name(address):
    where = _core.dladdr(address)
    if where and where[2] and where[3] == address:
        return where[2]
    return None


def guard_function(fp, name=None, policy=None, shield=True, interruptible=None, timeout=None):
    """A GuardedFunction calling the cffi function pointer `fp` (a cdata of a function
    type) through a guard stub. `name` is used in reports (default: the symbol at the
    address if it is exactly one, else the type and address). `shield` (issue 13):
    False keeps its calls from locking shielded memory. `interruptible` (default:
    set_default_interruptible()'s) and `timeout` (seconds): issue 16, as for ctypes."""
    if isinstance(fp, _core.GuardedFunction):
        return fp
    if not is_function_pointer(fp):
        raise TypeError("guard() takes a cffi function pointer (a cdata of a function type), "
                        "not %r" % (fp,))
    _check_supported()
    address = int(_backend.cast(_UINTPTR, fp))
    if not address:
        raise ValueError("cannot guard a NULL function pointer")
    target = _core.stub_target(address)
    if target is None:  # not a stub yet
        target = address
        stubbed = _backend.cast(_backend.typeof(fp), _stub_for(target))
    else:
        stubbed = fp
    if name is None:  # the symbol, else what it is: "<int(*)(int, int) at 0x7f...>"
        name = _symbol_name(target) or "<%s at %#x>" % (_backend.typeof(fp).cname, target)
    from .interrupt import resolve_interruptible  # interrupt (issue 16): set_default_interruptible()
    return _core.GuardedFunction(stubbed, name, policy, target, bool(shield),  # shield: issue 13
                                 interruptible=resolve_interruptible(interruptible),
                                 timeout=timeout)


def _find_ffi(lib):
    """The ffi of an API-mode lib, from its module (``_mod.lib`` -> ``_mod.ffi``)."""
    module = sys.modules.get(getattr(lib, "__name__", "").rpartition(".")[0])
    ffi = getattr(module, "ffi", None)
    return ffi if ffi is not None and _is_ffi(ffi) else None


def _library_name(lib):
    """For messages ("... is quarantined"): the path given to dlopen, or the module."""
    if _is_inline_library(lib):
        name = type(lib).__name__
        if name.startswith("FFILibrary_"):
            return name[len("FFILibrary_"):]
        return "cffi library (dlopen(None))"
    return getattr(lib, "__name__", None) or "cffi library"


class GuardedLibrary:
    """A cffi library whose functions are guarded: a fault inside one raises
    ffiguard.ForeignFault instead of killing the process.

    Functions are looked up in the library, guarded once and cached; everything else
    (integer constants, enum values, global variables read and written, ``dir()``)
    is the library's own. ``__wrapped__`` is the library itself (for ffi.dlclose of an
    out-of-line library: ``ffi.dlclose(lib.__wrapped__)``; ``ffi.dlclose(lib)`` works
    for ``cffi.FFI().dlopen`` libraries)."""

    def __init__(self, ffi, lib, policy, shield=True, interruptible=None, timeout=None):
        from .interrupt import resolve_interruptible
        d = self.__dict__
        d["__wrapped__"] = lib
        d["_ffiguard_ffi"] = ffi
        d["_ffiguard_policy"] = policy
        d["_ffiguard_shield"] = bool(shield)  # shield (issue 13): False: calls never lock
        # interrupt (issue 16): Ctrl-C / timeout for its functions (each can change its own)
        d["_ffiguard_interruptible"] = resolve_interruptible(interruptible)
        _core.GuardedFunction(len, timeout=timeout)  # a bad timeout is refused here
        d["_ffiguard_timeout"] = timeout
        # ABI mode: functions are cdata already; API mode: builtins, called by address.
        d["_ffiguard_inline"] = _is_inline_library(lib)

    def _ffiguard_function(self, name, value):
        """The function pointer to guard for attribute `name` whose value is `value`, or
        None when it is not a function (a constant, a variable: even one holding a
        function pointer, whose value can change)."""
        d = self.__dict__
        lib, ffi = d["__wrapped__"], d["_ffiguard_ffi"]
        if isinstance(value, _BUILTIN):  # API mode
            if ffi is None:
                ffi = _find_ffi(lib)
                if ffi is None:
                    raise TypeError("guarding %s of a compiled (API-mode) cffi module needs its "
                                    "ffi: use ffiguard.guard(ffi, lib)" % name)
            pointer = ffi.addressof(lib, name)
            return pointer if is_function_pointer(pointer) else None
        if not is_function_pointer(value):
            return None
        if d["_ffiguard_inline"]:
            # functions are cached in the library's __dict__, variables are properties
            return value if name not in type(lib).__dict__ else None
        if ffi is None:
            ffi = _find_ffi(lib)
        if ffi is not None:
            try:
                pointer = ffi.addressof(lib, name)
            except Exception:
                return None
            return value if is_function_pointer(pointer) else None
        return value  # out-of-line ABI without its ffi: taken to be a function

    def __getattr__(self, name):
        lib = self.__dict__["__wrapped__"]
        value = getattr(lib, name)
        if name.startswith("__") and name.endswith("__"):
            return value
        if isinstance(value, _BUILTIN) and _core.cffi_target(value) is not None:
            # API mode: the builtin's own C function (cffi's wrapper) called guarded
            from .for_cffi_compiled import guard_builtin
            d = self.__dict__
            guarded = guard_builtin(value, name, d["_ffiguard_policy"], d["_ffiguard_shield"],
                                    d["_ffiguard_interruptible"], d["_ffiguard_timeout"])
            return self.__dict__.setdefault(name, guarded)
        fp = self._ffiguard_function(name, value)
        if fp is None:
            return value
        d = self.__dict__
        guarded = guard_function(fp, name, d["_ffiguard_policy"], d["_ffiguard_shield"],
                                 d["_ffiguard_interruptible"], d["_ffiguard_timeout"])
        # setdefault is atomic: threads racing to guard `name` all get the first one
        return self.__dict__.setdefault(name, guarded)

    def __setattr__(self, name, value):
        setattr(self.__dict__["__wrapped__"], name, value)

    def __delattr__(self, name):
        delattr(self.__dict__["__wrapped__"], name)

    def __dir__(self):
        return dir(self.__dict__["__wrapped__"])

    def __addressof__(self, name, *fields):
        """cffi.FFI.addressof(guarded, name) looks for this on in-line libraries."""
        lib = self.__dict__["__wrapped__"]
        return self._ffiguard_addressof(lambda *a: type(lib).__addressof__(lib, *a),
                                        name, *fields)

    def _ffiguard_addressof(self, addressof, name, *fields):
        """ffi.addressof(guarded, name): of a function, the pointer its guarded function
        calls (the stub's address, as ctypes.cast(f, c_void_p) gives for ctypes), so
        that it compares equal to lib.f; anything else: `addressof` of the library."""
        if not fields and isinstance(name, str):
            value = getattr(self, name, None)
            if isinstance(value, _core.GuardedFunction) and not isinstance(value.__wrapped__, _BUILTIN):
                return value.__wrapped__
        return addressof(name, *fields)

    def __cffi_close__(self):
        lib = self.__dict__["__wrapped__"]
        type(lib).__cffi_close__(lib)
        for name in [n for n, v in self.__dict__.items() if isinstance(v, _core.GuardedFunction)]:
            del self.__dict__[name]

    def __repr__(self):
        return "<ffiguard.GuardedLibrary of %r>" % (self.__dict__["__wrapped__"],)


def guard(obj, lib=None, *, on_fault=None, name=None, shield=None, interruptible=None,
          timeout=None):
    """ffiguard.guard() for cffi objects: guard(lib), guard(ffi, lib), guard(function).
    shield=False (issue 13): the library's (or function's) calls never lock memory
    shielded with ffiguard.shield() or shield_interpreter(). interruptible=True: Ctrl-C
    stops its calls on the main thread; timeout=SECONDS: a call running longer is
    stopped (issue 16). Any of these given for a library already guarded (e.g. by
    install()) and different from its own: a new GuardedLibrary of the same library."""
    options = dict(shield=shield, interruptible=interruptible, timeout=timeout)
    if _is_ffi(obj):
        if lib is None:
            raise TypeError("guard(ffi, lib): the library is missing")
        return guard_library(obj, lib, on_fault=on_fault, **options)
    if lib is not None:
        raise TypeError("guard(ffi, lib) takes a cffi FFI first, not %s" % type(obj).__name__)
    if isinstance(obj, GuardedLibrary) or is_library(obj):
        return guard_library(None, obj, on_fault=on_fault, **options)
    if is_function_pointer(obj):
        policy = make_policy(name, on_fault) if on_fault is not None else None
        return guard_function(obj, name, policy, True if shield is None else shield,
                              interruptible, timeout)
    if isinstance(obj, _CData):
        raise TypeError("guard() takes a cffi function pointer, not <cdata '%s'>"
                        % _backend.typeof(obj).cname)
    raise TypeError("not a cffi object: %s" % type(obj).__name__)


def guard_library(ffi, lib, on_fault=None, policy=None, shield=None, interruptible=None,
                  timeout=None):
    """`lib` (from ffi.dlopen(), or a compiled module's lib) as a GuardedLibrary.
    on_fault: "raise", "quarantine", "exit", or None (the global default). shield
    (issue 13; default True): False keeps its calls from locking shielded memory.
    interruptible (default: set_default_interruptible()'s), timeout (seconds, default
    none): issue 16."""
    if isinstance(lib, GuardedLibrary):
        d = lib.__dict__
        same = ((shield is None or bool(shield) == d["_ffiguard_shield"]) and
                (interruptible is None or bool(interruptible) == d["_ffiguard_interruptible"]) and
                (timeout is None or timeout == d["_ffiguard_timeout"]))
        if same:
            return lib
        return GuardedLibrary(
            ffi if ffi is not None else d["_ffiguard_ffi"], d["__wrapped__"], d["_ffiguard_policy"],
            d["_ffiguard_shield"] if shield is None else shield,
            d["_ffiguard_interruptible"] if interruptible is None else interruptible,
            d["_ffiguard_timeout"] if timeout is None else timeout)
    if not is_library(lib):
        raise TypeError("guard(ffi, lib) takes a cffi library (from ffi.dlopen() or a compiled "
                        "module's lib), not %s" % type(lib).__name__)
    if ffi is not None and not _is_ffi(ffi):
        raise TypeError("guard(ffi, lib): ffi must be a cffi FFI, not %s" % type(ffi).__name__)
    _check_supported()
    if policy is None:
        policy = make_policy(_library_name(lib), on_fault)
    return GuardedLibrary(ffi, lib, policy, True if shield is None else shield, interruptible,
                          timeout)
