"""The C++ kernels' machine code, read with objdump: which ISA versions of a kernel's OpenMP-outlined body
(where its vector loops are) a binary holds, and the instructions in each.

The x86-64 checks (tests/test_extension.py, test_optim_fused.py, test_cross_entropy.py) read the built
``curvkern._C`` with the host's objdump; the aarch64 checks (tests/test_portability.py) read cross-compiled
objects with the cross toolchain's.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess

import pytest


def host_objdump() -> str:
    """The host's objdump; skips the calling test when it is not installed."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not installed")
    return objdump


def symbol_table(path: str, objdump: str) -> str:
    """``objdump -t``: every symbol of the binary at ``path``, one a line."""
    return subprocess.run([objdump, "-t", path], check=True, capture_output=True, text=True).stdout


def function_bodies(path: str, objdump: str) -> dict[str, str]:
    """``objdump -d`` of the binary at ``path``, split per function: {symbol: its disassembly}."""
    text = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", path], check=True, capture_output=True, text=True
    ).stdout
    bodies = {}
    for block in text.split("\n\n"):
        match = re.match(r"[0-9a-f]+ <(\S+)>:", block.strip())
        if match:
            bodies[match.group(1)] = block
    return bodies


def extension_path() -> str:
    import curvkern._C as extension

    return extension.__file__


@functools.cache
def extension_symbols() -> str:
    """The built curvkern._C's symbol table (skips without objdump)."""
    return symbol_table(extension_path(), host_objdump())


@functools.cache
def extension_bodies() -> dict[str, str]:
    """The built curvkern._C's functions, disassembled (skips without objdump)."""
    return function_bodies(extension_path(), host_objdump())


def omp_fn(kernel: str, isa: str) -> str:
    """A regular expression for the OpenMP-outlined body of ``kernel``'s ``isa`` version (csrc/cpu_dispatch.h
    names them ``<kernel>_<isa>``; GCC appends ``._omp_fn.<n>``)."""
    return rf"{kernel}_{isa}\S*_omp_fn\.\d+"


def has_omp_body(symbols: str, kernel: str, isa: str) -> bool:
    """Whether the symbol table ``symbols`` holds ``kernel``'s ``isa`` version of an OpenMP body."""
    return re.search(omp_fn(kernel, isa) + r"\b", symbols) is not None


def omp_body(bodies: dict[str, str], kernel: str, isa: str = "default") -> str:
    """The disassembly of ``kernel``'s ``isa`` OpenMP body; fails unless exactly one function matches."""
    (name,) = [name for name in bodies if re.search(omp_fn(kernel, isa) + "$", name)]
    return bodies[name]


def count(pattern: str, code: str) -> int:
    return len(re.findall(pattern, code))
