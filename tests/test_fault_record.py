"""The record -> exception step of the fault path (GuardedFunction, in C)."""
import ctypes
import os
import shutil

import pytest

import ffiguard
from ffiguard import faults
from conftest import CRASHERS_PATH


def test_exception_made_in_c_is_from_records(crashers):
    """The exception made in C is the one faults.from_record makes from the same record:
    same class, raw record, fields and call (for each class the signal picks)."""
    cases = [(crashers.ffg_read_null, (), ffiguard.SegmentationFault),
             (crashers.ffg_recurse, (0,), ffiguard.ForeignStackOverflow),
             (crashers.ffg_abort, (), ffiguard.ForeignAbort),
             (crashers.ffg_illegal_instruction, (), ffiguard.IllegalInstruction)]
    for fn, args, cls in cases:
        with pytest.raises(cls) as info:
            fn(*args)
        e = info.value
        assert type(e) is cls
        again = faults.from_record(e._raw, e.function, e._call[0], e._call[1], fn.__policy__)
        assert type(again) is type(e)
        assert (again._raw, again._values, again._call) == (e._raw, e._values, e._call)
        assert e._call == (args, None) and e._values == {"function": fn.__name__}
        assert str(again) == str(e) and e.args == again.args and e.frames == again.frames


def test_library_path_that_is_not_utf8(tmp_path, run_python):
    """A library whose path is not valid UTF-8: the fault is still a ForeignFault naming
    that path (decoded as os.fsdecode does), not a UnicodeDecodeError from the record,
    and its report can be read (/proc/self/maps holds that name). In a subprocess: the
    library stays loaded for good."""
    rc, out, err = run_python("""
        import shutil
        import ffiguard
        path = os.path.join(os.fsencode(%r), b"lib\\xffcrashers.so")
        shutil.copy(CRASHERS_PATH, path)
        lib = ffiguard.CDLL(os.fsdecode(path))
        # ffg_read_at itself (its copy here): ffg_read_null calls it through the PLT
        lib.ffg_read_at.argtypes, lib.ffg_read_at.restype = [ctypes.c_size_t], ctypes.c_int
        for _ in range(2):  # the second time the names come from the cache
            try:
                lib.ffg_read_at(0)
            except ffiguard.SegmentationFault as e:
                assert e.library == os.fsdecode(path) and e.symbol == "ffg_read_at", e.library
                assert "lib\\udcffcrashers.so+0x" in str(e), str(e)
                assert "lib\\udcffcrashers.so" in e.report()
                print("ok")
    """ % str(tmp_path))
    assert (rc, out, err) == (0, "ok\nok\n", "")
