"""python -m ffiguard.bench: the fault round trip beside its baselines (issue 12)."""
import ctypes
import importlib.util
import signal

import pytest

import ffiguard
from ffiguard import bench


# glibc's struct sigaction on 64-bit Linux: handler, sa_mask (128 bytes, of which the
# kernel's 8 are meaningful: glibc leaves the rest as it was), sa_flags.
_HANDLER, _MASK, _FLAGS = slice(0, 8), slice(8, 16), slice(136, 140)
SA_RESTORER = 0x04000000  # glibc adds it to every action it sets: no difference in behaviour


def _raw_actions():
    state = bench._RawSignalState()
    out = {}
    for s in range(1, signal.NSIG):
        raw = state.action(s)
        flags = int.from_bytes(raw.raw[_FLAGS], "little") & ~SA_RESTORER if raw else None
        out[s] = raw and (raw.raw[_HANDLER], raw.raw[_MASK], flags)
    return out


def test_fault_row_beside_the_baselines(crashers):
    """The bare sigsetjmp/siglongjmp baseline is always measured in the same rounds as
    ffiguard's fault row, its ratio is in the table and in the goals; cysignals' row
    too when it can be built (else the reason is printed). Each baseline's handler is in
    place only around its own loop: afterwards every signal's action is as before and
    guarded faults are recovered by ffiguard as usual."""
    before = _raw_actions()
    result = bench.run(rounds=1, n_calls=10, n_faults=3, isolate=False)
    faults = {r["name"]: r for r in result["faults"]}
    base = faults[bench.BASELINE_NAME]
    ours = next(r for r in result["faults"] if r["goal"])
    assert base["baseline"] and not ours["baseline"]
    assert base["ffiguard_ratio"] == pytest.approx(
        ours["round_trip_us"]["median"] / base["round_trip_us"]["median"])
    have_cysignals = all(importlib.util.find_spec(m) for m in ("cysignals", "Cython"))
    if have_cysignals:
        assert "ffiguard_ratio" in faults[bench.CYSIGNALS_NAME]
        assert any(g["what"] == "fault -> exception / cysignals <= 1.00" for g in result["goals"])
    else:
        assert bench.CYSIGNALS_NAME not in faults
        assert any(s.startswith("cysignals row:") for s in result["skipped"])
        assert any(g["what"].startswith("fault -> exception / the bare") for g in result["goals"])
    table = bench.format_table(result)
    assert bench.BASELINE_NAME in table and "%.2f" % base["ffiguard_ratio"] in table
    after = _raw_actions()
    # the timeout/interruptible rows (issue 16) leave ffiguard's own handler on SIGINT and
    # on its interrupt signal (docs/design.md, "Stopping a hung call"): nothing else moves
    for s in (signal.SIGINT, ffiguard.interrupt.signal_number()):
        before.pop(s), after.pop(s)
    assert after == before
    with pytest.raises(ffiguard.SegmentationFault):
        crashers.ffg_read_null()


def test_bare_baseline_raises_and_restores():
    from ffiguard import _crashers

    before = _raw_actions()[signal.SIGSEGV]
    _crashers.baseline_install()
    try:
        for _ in range(3):
            with pytest.raises(_crashers.BaselineFault, match="Segmentation fault"):
                _crashers.baseline_read_null()
    finally:
        _crashers.baseline_restore()
    assert _raw_actions()[signal.SIGSEGV] == before
