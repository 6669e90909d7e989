"""ffiguard.CDLL's mode argument: ctypes' int dlopen flags, or ffiguard's mode by name."""
import ctypes

import pytest

import ffiguard
from ffiguard.isolate import IsolatedCDLL


def test_default_and_trap_mode_are_guarded_in_process():
    for lib in (ffiguard.CDLL(ffiguard.crashers_path()),
                ffiguard.CDLL(ffiguard.crashers_path(), "trap"),
                ffiguard.CDLL(ffiguard.crashers_path(), mode="trap")):
        assert type(lib) is ffiguard.CDLL
        with pytest.raises(ffiguard.SegmentationFault):
            lib.ffg_read_null()


def test_int_mode_is_still_ctypes_dlopen_flags():
    lib = ffiguard.CDLL(ffiguard.crashers_path(), ctypes.RTLD_GLOBAL)
    assert type(lib) is ffiguard.CDLL
    lib.ffg_add.argtypes = [ctypes.c_int, ctypes.c_int]
    assert lib.ffg_add(40, 2) == 42


def test_isolate_mode_returns_an_isolated_library_with_its_options():
    lib = ffiguard.CDLL(ffiguard.crashers_path(), mode="isolate", timeout=5.0)
    try:
        assert type(lib) is IsolatedCDLL
        lib.ffg_add.argtypes = [ctypes.c_int, ctypes.c_int]
        assert lib.ffg_add(40, 2) == 42
        with pytest.raises(ffiguard.SegmentationFault) as info:
            lib.ffg_read_null()
        assert info.value.code_name == "SEGV_MAPERR" and info.value.address == 0
        assert lib.ffg_add(1, 2) == 3  # a fresh helper took over
    finally:
        ffiguard.isolate.stop_helper(lib)


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match=r"mode must be one of trap, isolate .* not 'shield'"):
        ffiguard.CDLL(ffiguard.crashers_path(), "shield")


def test_isolate_mode_rejects_positional_ctypes_arguments():
    with pytest.raises(TypeError, match="keyword options only"):
        ffiguard.CDLL(ffiguard.crashers_path(), "isolate", None)


def test_isolate_names_are_exported_lazily():
    import subprocess
    import sys
    code = ("import sys, ffiguard; assert 'ffiguard.isolate' not in sys.modules; "
            "assert ffiguard.ForeignTimeout is __import__('ffiguard.isolate').isolate.ForeignTimeout; "
            "assert issubclass(ffiguard.ForeignTimeout, ffiguard.ForeignFault); "
            "b = ffiguard.foreign_buffer(16); assert len(b) == 16; "
            "assert {'foreign_buffer', 'IsolatedCDLL'} <= set(ffiguard.__all__); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout == "ok\n", out.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ffiguard.nope
