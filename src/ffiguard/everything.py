"""Guard everything: ffiguard.install() / uninstall() / installed().

While installed, every library loaded through ctypes or cffi is guarded:

* ``ctypes.CDLL`` is replaced by a guarding subclass of ffiguard.CDLL (so of the
  original ``ctypes.CDLL``): ``ctypes.CDLL(...)``, ``from ctypes import CDLL`` done
  after install, ``ctypes.LibraryLoader(ctypes.CDLL)`` and classes derived from
  ``ctypes.CDLL`` after install all load guarded libraries. ``isinstance(x,
  ctypes.CDLL)`` and ``issubclass(X, ctypes.CDLL)`` answer as for the original class,
  so libraries loaded before install (and PyDLL) still count as CDLLs.
* ``ctypes.cdll`` (the LibraryLoader object itself, so references taken before install
  too) loads through the guarding class: ``ctypes.cdll.LoadLibrary(...)``,
  ``ctypes.cdll.libfoo``, ``ctypes.cdll["libfoo.so"]``.
* ``ffi.dlopen`` returns ``ffiguard.guard(ffi, lib)``, both for ``cffi.FFI()`` (in-line
  ABI mode) and for the ``ffi`` of an out-of-line ABI module imported after install (the
  generated ``_foo.py`` that makes ``_cffi_backend.FFI(...)``). ``ffi.dlclose``,
  ``ffi.addressof(lib, name)``, ``ffi.typeof(lib.f)`` and ``ffi.cast(T, lib.f)`` accept
  the guarded objects (a cast of ``lib.f`` is a pointer to its stub: called through it,
  the function runs unguarded). cffi is not imported by install(): if the program has
  not imported it yet, a meta-path hook patches it the moment it is imported.
* Compiled cffi modules (API mode), imported before or after install: their ``lib``'s
  functions are guarded in place (for_cffi_compiled.py; docs/design.md, "Compiled cffi
  modules"); ``importlib``'s ExtensionFileLoader.exec_module is wrapped to catch the
  ones imported while installed.

Not guarded, on purpose: ``ctypes.pythonapi`` and ``ctypes.PyDLL`` (Python's own C API,
called with the GIL held: a fault there is in the interpreter, and the handler refuses
to recover while the GIL is held anyway), ``ctypes.CFUNCTYPE`` callbacks (Python code
called from C), and calls through prototypes applied to raw addresses
(``CFUNCTYPE(...)(address)``): ``ffiguard.guard()`` those explicitly.

uninstall() puts back exactly what was there (the same objects). Libraries loaded while
installed stay guarded: they are ffiguard.CDLL instances (or guarded cffi libraries).
Code that took a reference to the original ``ctypes.CDLL`` before install
(``from ctypes import CDLL`` at import time) keeps loading unguarded libraries: install
as early as possible (``python -m ffiguard run``), or use ffiguard.CDLL there.
"""
import ctypes
import sys
import threading

from . import _core
from .for_ctypes import CDLL as _GuardedCDLL, _check_supported, make_policy

__all__ = ["install", "uninstall", "installed"]

_ORIGINAL_CDLL = ctypes.CDLL
_ORIGINAL_LOADER_DLLTYPE = ctypes.cdll._dlltype
_lock = threading.RLock()
_state = None  # while installed: the _Installation


class _Meta(type):
    """Metaclass of the installed ctypes.CDLL: isinstance/issubclass against it answer
    as against the original class (a library loaded before install is still a CDLL)."""

    def __instancecheck__(cls, obj):
        if cls is InstalledCDLL:
            return isinstance(obj, _ORIGINAL_CDLL)
        return type.__instancecheck__(cls, obj)

    def __subclasscheck__(cls, sub):
        if cls is InstalledCDLL:
            return issubclass(sub, _ORIGINAL_CDLL)
        return type.__subclasscheck__(cls, sub)


class InstalledCDLL(_GuardedCDLL, metaclass=_Meta):
    """What ctypes.CDLL is while ffiguard.install() is in effect: an ffiguard.CDLL
    whose on_fault defaults to the one given to install(). Functions of a library
    whose _func_flags_ say PYTHONAPI (a subclass mimicking PyDLL) are left unguarded."""

    def __init__(self, name, *args, **kwargs):
        state = _state
        if "on_fault" not in kwargs:
            kwargs["on_fault"] = state.on_fault if state is not None else None
        if state is not None:  # interrupt (issue 16): install(interruptible=, timeout=)
            kwargs.setdefault("interruptible", state.interruptible)
            kwargs.setdefault("timeout", state.timeout)
        super().__init__(name, *args, **kwargs)

    def __getitem__(self, name_or_ordinal):
        if self._func_flags_ & ctypes._FUNCFLAG_PYTHONAPI:
            return _ORIGINAL_CDLL.__getitem__(self, name_or_ordinal)
        return super().__getitem__(name_or_ordinal)


InstalledCDLL.__name__ = InstalledCDLL.__qualname__ = "CDLL"


# ---- cffi ---------------------------------------------------------------------------
#
# Two FFI classes make libraries: cffi.api.FFI (in-line ABI mode, ``cffi.FFI()``; a Python
# class, patched in place) and _cffi_backend.FFI (what the modules generated for
# out-of-line ABI mode build: ``ffi = _cffi_backend.FFI(...)``; a C type, so the module
# attribute is replaced by a Python subclass while installed). Besides dlopen, the few
# FFI methods that take a library or a function and reject the wrappers unwrap them:
# addressof(lib, name), typeof(lib.f), cast(T, lib.f), dlclose(lib).


def _unwrap(obj):
    from . import for_cffi
    if isinstance(obj, (_core.GuardedFunction, for_cffi.GuardedLibrary)):
        return obj.__wrapped__
    return obj


def _guarding_methods(original):
    """FFI methods (from `original`, a {name: function} of the class's own) that guard
    what dlopen returns and accept guarded objects where cffi wants its own."""
    from . import for_cffi
    GuardedFunction = _core.GuardedFunction
    dlopen, dlclose = original["dlopen"], original["dlclose"]
    addressof, typeof, cast = original["addressof"], original["typeof"], original["cast"]

    def guarded_dlopen(self, name, flags=0):
        lib = dlopen(self, name, flags)
        state = _state
        if state is None:  # an ffi made while installed, used after uninstall()
            return lib
        guarded = for_cffi.guard_library(self, lib, on_fault=state.on_fault,  # issue 16:
                                         interruptible=state.interruptible, timeout=state.timeout)
        keep = getattr(self, "_libraries", None)
        if type(keep) is list:  # cffi.FFI keeps its libraries alive: the wrapper too
            keep.append(guarded)
        return guarded

    def guarded_dlclose(self, lib):
        return dlclose(self, _unwrap(lib))

    def guarded_addressof(self, cdata, *fields):
        if isinstance(cdata, for_cffi.GuardedLibrary) and fields:
            lib = cdata.__wrapped__
            return cdata._ffiguard_addressof(lambda *a: addressof(self, lib, *a), *fields)
        return addressof(self, _unwrap(cdata), *fields)

    def guarded_typeof(self, cdecl):
        if type(cdecl) is GuardedFunction:
            cdecl = cdecl.__wrapped__
        return typeof(self, cdecl)

    def guarded_cast(self, cdecl, source):
        if type(source) is GuardedFunction:  # the stub: called through it, unguarded
            source = source.__wrapped__
        return cast(self, cdecl, source)

    methods = {"dlopen": guarded_dlopen, "dlclose": guarded_dlclose,
               "addressof": guarded_addressof, "typeof": guarded_typeof, "cast": guarded_cast}
    for name, method in methods.items():
        method.__name__ = name
        method.__doc__ = getattr(original[name], "__doc__", None)
        method.__wrapped__ = original[name]
    return methods


_FFI_METHODS = ("dlopen", "dlclose", "addressof", "typeof", "cast")


def _patch_cffi(cffi_api):
    """Patch cffi.api.FFI in place; returns (what, how to undo)."""
    FFI = cffi_api.FFI
    original = {name: FFI.__dict__[name] for name in _FFI_METHODS}
    for name, method in _guarding_methods(original).items():
        setattr(FFI, name, method)

    def undo():
        for name, value in original.items():
            setattr(FFI, name, value)
    return undo


def _patch_backend(backend):
    """Replace _cffi_backend.FFI by a guarding subclass for the out-of-line modules
    imported from now on; returns how to undo."""
    BackendFFI = backend.FFI
    original = {name: getattr(BackendFFI, name) for name in _FFI_METHODS}
    GuardingFFI = type("FFI", (BackendFFI,), dict(
        _guarding_methods(original),
        __module__=BackendFFI.__module__,
        __doc__=BackendFFI.__doc__))
    backend.FFI = GuardingFFI

    def undo():
        if backend.FFI is GuardingFFI:
            backend.FFI = BackendFFI
    return undo


_CFFI_MODULES = {"cffi.api": _patch_cffi, "_cffi_backend": _patch_backend}


# ---- compiled cffi modules (API mode): for_cffi_compiled.py ----------------------------
#
# Every extension module is created by importlib's ExtensionFileLoader; while installed,
# its exec_module is wrapped so that a compiled cffi module is guarded in place the
# moment it has been imported (before the importer sees it). Modules imported earlier
# are guarded by install() itself.


def _patch_extension_loader(installation):
    from importlib.machinery import ExtensionFileLoader
    from . import for_cffi_compiled
    original = ExtensionFileLoader.__dict__["exec_module"]

    def exec_module(self, module):
        original(self, module)
        if "_cffi_backend" in sys.modules and _state is installation:
            for_cffi_compiled.after_import(module, installation.on_fault,
                                           installation.interruptible, installation.timeout)

    exec_module.__wrapped__ = original
    exec_module.__doc__ = original.__doc__
    ExtensionFileLoader.exec_module = exec_module
    for_cffi_compiled.guard_loaded(installation.on_fault, installation.interruptible,
                                   installation.timeout)

    def undo():
        if ExtensionFileLoader.__dict__.get("exec_module") is exec_module:
            ExtensionFileLoader.exec_module = original
        for_cffi_compiled.unguard_modules()
    return undo


class _PatchingLoader:
    """A module's own loader, patching the module once it has run; everything else
    (get_source for tracebacks, get_data, ...) is the original loader's."""

    def __init__(self, loader, hook):
        self._loader = loader
        self._hook = hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._hook.loaded(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _CffiImportHook:
    """Patches cffi.api.FFI and _cffi_backend.FFI once the program imports them; never
    imports them itself."""

    def __init__(self, installation):
        self.installation = installation
        self.busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _CFFI_MODULES or self.busy:
            return None
        self.busy = True
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self:
                    continue
                find = getattr(finder, "find_spec", None)
                spec = find(fullname, path, target) if find else None
                if spec is not None:
                    break
        finally:
            self.busy = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader, self)
        return spec

    def loaded(self, module):
        with _lock:
            if _state is self.installation:
                self.installation.patch(module)


# ---- install / uninstall ------------------------------------------------------------


class _Installation:
    def __init__(self, on_fault):
        self.on_fault = on_fault
        self.interruptible = None  # interrupt (issue 16): for the ctypes libraries loaded
        self.timeout = None
        self.undo = {}  # module name -> how to undo its patch
        self.hook = None
        self.undo_compiled = lambda: None  # compiled cffi modules: see install()

    def patch(self, module):
        name = module.__name__
        if name not in self.undo and hasattr(module, "FFI"):
            self.undo[name] = _CFFI_MODULES[name](module)

    def unpatch(self):
        for undo in self.undo.values():
            undo()
        self.undo.clear()


class Installed:
    """What install() returns: a context manager. Leaving the ``with`` block uninstalls
    if (and only if) this install() call is the one that installed."""

    def __init__(self, installation, owner):
        self._installation = installation
        self._owner = owner

    @property
    def on_fault(self):
        return self._installation.on_fault

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._owner:
            with _lock:
                if _state is self._installation:
                    uninstall()
        return False

    def __repr__(self):
        return "<ffiguard.install(on_fault=%r)%s>" % (
            self._installation.on_fault, "" if _state is self._installation else " (uninstalled)")


def install(on_fault=None, interruptible=None, timeout=None):
    """Guard every library loaded from now on through ctypes.CDLL, ctypes.cdll,
    ctypes.LibraryLoader(ctypes.CDLL) or cffi.FFI.dlopen.

    on_fault ("raise", "quarantine", "exit", or None for the global default) is the
    policy of each library loaded while installed (each library gets its own policy).
    interruptible (Ctrl-C stops a call on the main thread; None: the default of
    set_default_interruptible()) and timeout (seconds per call, None: none) apply to the
    libraries loaded while installed (ctypes and cffi's ffi.dlopen) and to the compiled
    cffi modules it guards.
    Returns a context manager: ``with ffiguard.install(): ...`` uninstalls at the end.
    Installing again while installed changes nothing (a ``with`` block around such a
    call leaves it installed); asking for another on_fault then is a ValueError.
    """
    global _state
    if on_fault is not None:
        make_policy(None, on_fault)  # validates
    _core.GuardedFunction(len, timeout=timeout)  # validates the timeout (interrupt, issue 16)
    _check_supported()
    with _lock:
        if _state is not None:
            if on_fault is not None and on_fault != _state.on_fault:
                raise ValueError("ffiguard is already installed with on_fault=%r; uninstall() "
                                 "first to install with on_fault=%r" % (_state.on_fault, on_fault))
            return Installed(_state, owner=False)
        installation = _Installation(on_fault)
        installation.interruptible, installation.timeout = interruptible, timeout
        ctypes.CDLL = InstalledCDLL
        ctypes.cdll._dlltype = InstalledCDLL
        for name in _CFFI_MODULES:
            module = sys.modules.get(name)
            if module is not None:
                installation.patch(module)
        if len(installation.undo) < len(_CFFI_MODULES):
            installation.hook = _CffiImportHook(installation)
            sys.meta_path.insert(0, installation.hook)
        _state = installation
        installation.undo_compiled = _patch_extension_loader(installation)
        return Installed(installation, owner=True)


def uninstall():
    """Put back ctypes.CDLL, ctypes.cdll's library type, cffi.FFI's methods and
    _cffi_backend.FFI as they were before install(). Libraries loaded meanwhile stay guarded. Returns True
    if ffiguard was installed."""
    global _state
    with _lock:
        installation = _state
        if installation is None:
            return False
        ctypes.CDLL = _ORIGINAL_CDLL
        ctypes.cdll._dlltype = _ORIGINAL_LOADER_DLLTYPE
        if installation.hook is not None:
            try:
                sys.meta_path.remove(installation.hook)
            except ValueError:
                pass
        installation.unpatch()
        _state = None
        installation.undo_compiled()
        return True


def installed():
    """True while install() is in effect."""
    return _state is not None
