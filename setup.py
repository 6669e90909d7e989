"""Build the two C extensions: the guard core and the deliberate-crash library.

The per-architecture thunk is assembly (.S, run through the C preprocessor by the C
compiler); setuptools does not know that suffix, so build_ext is taught it.
"""
import os
import platform
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ARCH_FILES = {
    "x86_64": "src/ffiguard/_core/arch/x86_64.S",
    "amd64": "src/ffiguard/_core/arch/x86_64.S",
    "aarch64": "src/ffiguard/_core/arch/aarch64.S",
    "arm64": "src/ffiguard/_core/arch/aarch64.S",
}

machine = platform.machine().lower()
core_sources = [
    "src/ffiguard/_core/module.c",
    "src/ffiguard/_core/guarded.c",
    "src/ffiguard/_core/policy.c",
    "src/ffiguard/_core/state.c",
    "src/ffiguard/_core/handler.c",
    "src/ffiguard/_core/unwind.c",
    "src/ffiguard/_core/chain.c",
    "src/ffiguard/_core/stubs.c",
    "src/ffiguard/_core/shield.c",
    "src/ffiguard/_core/got.c",
    "src/ffiguard/_core/shield_heap.c",
    "src/ffiguard/_core/interrupt.c",
]
core_macros = []
if sys.platform.startswith("linux") and machine in ARCH_FILES:
    core_sources.append(ARCH_FILES[machine])
else:
    # Builds and imports, but reports itself unsupported: ffiguard raises a clear
    # UnsupportedPlatform error instead of failing to install.
    core_macros.append(("FFG_NO_ARCH", "1"))

WARN = ["-Wall", "-Wextra", "-Werror=implicit-function-declaration"]

# AArch64: BTI landing pads and PAC return-address signing in our own C too (hints: NOPs
# on CPUs without them). The linker marks the extension BTI/PAC only when every object
# is; the thunk's assembly carries the note, so with this the whole core is marked and
# a BTI-capable kernel enforces the landing pads (which the tests then exercise).
ARCH_FLAGS = ["-mbranch-protection=standard"] if machine in ("aarch64", "arm64") else []

# tools/sanitize sets FFIGUARD_SANITIZE=address,undefined: our own C (the core and the
# isolate transport) is built with those sanitizers; the crasher library is not, so
# its deliberate faults stay where the tests expect them.
# The guarded call path is a few ns; where the linker happens to place the hot C
# function decided half of it (on 3.13: +10 ns with one layout, +5 ns with another, by
# python -m ffiguard.bench). Aligning every function of the core to a cache line makes
# the cost independent of the layout.
ALIGN = ["-falign-functions=64"]

SANITIZE = os.environ.get("FFIGUARD_SANITIZE", "")
OURS = ["-fsanitize=" + SANITIZE, "-fno-omit-frame-pointer", "-g"] if SANITIZE else []
OURS_LINK = ["-fsanitize=" + SANITIZE] if SANITIZE else []


# The tests' register probes: machine code of each architecture (none elsewhere).
CRASHERS_ARCH = {"x86_64": ["src/ffiguard/_crashers/arch/probe_x86_64.S"],
                 "amd64": ["src/ffiguard/_crashers/arch/probe_x86_64.S"],
                 "aarch64": ["src/ffiguard/_crashers/arch/probe_aarch64.S"],
                 "arm64": ["src/ffiguard/_crashers/arch/probe_aarch64.S"]}.get(machine, []) \
    if sys.platform.startswith("linux") else []
# The extras (pyproject.toml declares them dynamic). pyelftools is in the test extra so
# that every symbolizer backend is tested; cffi for the cffi guard tests; pytest-xdist
# (pure Python, with execnet) for the pytest plugin's test under `-n 2`; greenlet for
# guarded calls finishing out of order (C stacks switched). cffi refuses
# free-threaded CPython 3.13 (it supports free-threading from 3.14 on), and no PEP 508
# environment marker tells a free-threaded interpreter apart, so the extra is computed
# here, on the interpreter being installed for: there the cffi tests skip, saying why.
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
CFFI_FREE_THREADED_SINCE = (3, 14)
CFFI_SUPPORTED = not FREE_THREADED or sys.version_info >= CFFI_FREE_THREADED_SINCE
SYMBOLS = ["pyelftools>=0.29"]  # optional: file:line in reports without llvm-symbolizer/addr2line
# greenlet builds for free-threaded CPython only from 3.14 on (its tests skip, saying so).
GREENLET_SUPPORTED = not FREE_THREADED or sys.version_info >= (3, 14)
TEST = ["pytest>=7", "pytest-xdist>=3"] + SYMBOLS + (["cffi>=1.15"] if CFFI_SUPPORTED else []) + \
    (["greenlet>=3.1"] if GREENLET_SUPPORTED else [])


class BuildExt(build_ext):
    def build_extensions(self):
        self.compiler.src_extensions.append(".S")
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "ffiguard._core",
            sources=core_sources,
            define_macros=core_macros,
            # Headers: rebuilt when they change, and shipped in an sdist.
            depends=["src/ffiguard/_core/state.h", "src/ffiguard/_core/core.h", "src/ffiguard/_core/cffi_api.inc", "src/ffiguard/_core/pyhost.h",
                     "src/ffiguard/_core/shield.h", "src/ffiguard/_core/arch/x86_64.h",
                     "src/ffiguard/_core/arch/aarch64.h", "src/ffiguard/_core/arch/none.h"],
            extra_compile_args=WARN + ["-fno-strict-aliasing"] + ALIGN + ARCH_FLAGS + OURS,
            libraries=["dl", "rt"],  # rt: timer_create on glibc < 2.34
            # Bind every symbol at load time: no lazy binding inside the signal handler.
            extra_link_args=["-Wl,-z,now"] + OURS_LINK,
        ),
        # isolate mode's C: the shared-memory transport (futex wait, bounded spinning,
        # fixed-address mappings) and the fast path for number-only calls, both sides.
        Extension(
            "ffiguard._isolate",
            sources=[
                "src/ffiguard/_isolate/module.c",
                "src/ffiguard/_isolate/transport.c",
                "src/ffiguard/_isolate/fast_wire.c",
                "src/ffiguard/_isolate/host_fast.c",
                "src/ffiguard/_isolate/helper_loop.c",
            ],
            depends=["src/ffiguard/_isolate/isolate.h"],
            extra_compile_args=WARN + ["-O2"] + ARCH_FLAGS + OURS,
            extra_link_args=OURS_LINK,
        ),
        # Deliberate faults of every kind, for `python -m ffiguard demo` and the tests.
        # -g so reports can name source lines; -O1 keeps each crash where the source says.
        Extension(
            "ffiguard._crashers",
            sources=["src/ffiguard/_crashers/crashers.c"] + CRASHERS_ARCH,
            # BTI-marked on AArch64 like the core: guarded calls enter it with BLR x16,
            # unguarded ones with BR x16, and the landing pads must accept both.
            extra_compile_args=WARN + ["-g", "-O1", "-UNDEBUG", "-fno-omit-frame-pointer"] + ARCH_FLAGS,
        ),
    ],
    extras_require={"test": TEST, "symbols": SYMBOLS},
    cmdclass={"build_ext": BuildExt},
)
