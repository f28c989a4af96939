"""Kernels that read, through the non-coherent data path, memory they also write.

    python tools/analysis/ptx_noncoherent.py FILE.ptx [FILE.ptx ...]

nvcc turns a load through a ``const T* __restrict__`` (or ``__ldg``) into ``ld.global.nc``,
the read-only data cache's path, which the PTX ISA allows only for memory that no thread
writes while the kernel runs. mmattn's cooperative kernels (PSA_p's reduction and apply pass,
PSA_s's value kernels: blocks that wait for each other at ``grid_sync``) and its glue kernels
(a cluster's blocks at ``cluster_sync``) read what other blocks of the same launch wrote: read
through ``ld.global.nc`` such a value may be stale on a GPU, which neither the kernels' CPU
emulation nor a small GPU test need show. So each kernel's global memory accesses are traced,
through the PTX's registers, to the kernel parameters (or fields of a by-value parameter) their
addresses derive from: the pointers a ``cvta.to.global`` takes from ``ld.param``. A pointer that
one kernel both stores through (``st``, ``atom``, ``red``) and reads with ``ld.global.nc`` is
reported, with the number of each. (Two parameters that the host points at the same memory are
the host code's to avoid; this reads one kernel's code.)

Prints one line per finding; exit status 1 if there is any. ``tests/ops/test_build.py`` runs
it over the PTX that the nvcc build keeps (``NVCC_APPEND_FLAGS='--keep --keep-dir DIR'``).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass

_ENTRY = re.compile(r'^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+(\w+)\s*\(', re.M)
_INSTRUCTION = re.compile(r'^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)\s+([^;]*);', re.M)
_REGISTER = re.compile(r'%\w+')
_ADDRESS = re.compile(r'\[\s*(%\w+)\s*(?:\+\s*-?\d+\s*)?\]')
_PARAM = re.compile(r'\[\s*(\w+)\s*(\+\s*\d+)?\s*\]')


@dataclass(frozen=True)
class Finding:
    """A kernel that stores through ``pointer`` and reads it through ``ld.global.nc``."""

    kernel: str    # the entry's (mangled) name
    pointer: str   # the parameter, ``param_<i>`` or ``param_<i>+<offset>`` (a by-value one's field)
    stores: int    # st / atom / red through it
    nc_loads: int  # ld.global.nc through it



def _entries(ptx: str) -> list[tuple[str, str]]:
    starts = list(_ENTRY.finditer(ptx))
    return [(m.group(1), ptx[m.start():starts[i + 1].start() if i + 1 < len(starts)
                             else len(ptx)]) for i, m in enumerate(starts)]


def _operands(text: str) -> list[str]:
    """The comma-separated operands of an instruction, a ``{...}`` vector kept as one."""
    out, depth, current = [], 0, ''
    for ch in text:
        if ch == ',' and depth == 0:
            out.append(current.strip())
            current = ''
            continue
        depth += ch in '{['
        depth -= ch in '}]'
        current += ch
    if current.strip():
        out.append(current.strip())
    return out


def kernel_findings(name: str, body: str) -> list[Finding]:
    """The findings of one ``.entry``'s body (see the module's description)."""
    sources: dict[str, set[str]] = defaultdict(set)  # register -> registers it is computed from
    loaded: dict[str, str] = {}                      # register -> the parameter ld.param read
    cvta: list[str] = []                             # cvta.to.global's source registers
    accesses: list[tuple[str, str]] = []             # ('store' | 'nc', address register)
    for op, args in _INSTRUCTION.findall(body):
        ops = _operands(args)
        if op.startswith('ld.param'):
            param = _PARAM.search(args)
            if param and ops and not ops[0].startswith('{'):
                loaded[ops[0]] = param.group(1) + (param.group(2) or '').replace(' ', '')
            continue
        address = _ADDRESS.search(args)
        if op.startswith(('st.', 'atom.', 'red.')) and '.shared' not in op \
                and '.local' not in op and '.param' not in op and address:
            accesses.append(('store', address.group(1)))
        if op.startswith('ld.global.nc') and address:
            accesses.append(('nc', address.group(1)))
        if op.startswith(('ld.', 'st.', 'atom.', 'red.', 'bar', 'bra', 'ret', 'cp.', 'mma',
                          'wmma', 'fence', 'membar', 'barrier')) or not ops:
            continue   # a loaded value (an atom's result too), or nothing written: no address
            # arithmetic
        if op.startswith('cvta.to.global') and len(ops) > 1:
            cvta.append(ops[1])
        for dst in _REGISTER.findall(ops[0]):
            sources[dst].update(_REGISTER.findall(','.join(ops[1:])))
    pointers = {loaded[r] for r in cvta if r in loaded}

    origins: dict[str, set[str]] = {}

    def origin(register: str) -> set[str]:
        """The pointer parameters ``register``'s value derives from (a search of the register
        graph, which has cycles: PTX registers are reassigned in loops)."""
        if register in origins:
            return origins[register]
        found: set[str] = set()
        stack, seen = [register], {register}
        while stack:
            r = stack.pop()
            if r in loaded and loaded[r] in pointers:
                found.add(loaded[r])
            for s in sources.get(r, ()):
                if s not in seen:
                    seen.add(s)
                    stack.append(s)
        origins[register] = found
        return found

    counts: dict[str, dict[str, int]] = defaultdict(lambda: {'store': 0, 'nc': 0})
    for kind, register in accesses:
        for pointer in origin(register):
            counts[pointer][kind] += 1
    return [Finding(name, pointer[len(name) + 1:] if pointer.startswith(name + '_') else pointer,
                    c['store'], c['nc'])
            for pointer, c in sorted(counts.items()) if c['store'] and c['nc']]


def findings(ptx: str) -> list[Finding]:
    """Every kernel's findings in a PTX file's text."""
    return [f for name, body in _entries(ptx) for f in kernel_findings(name, body)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('ptx', nargs='+', help='PTX files (nvcc -ptx, or kept by --keep)')
    args = parser.parse_args(argv)
    found, kernels = [], 0
    for path in args.ptx:
        with open(path) as f:
            text = f.read()
        kernels += len(_entries(text))
        found += findings(text)
    names = [f.kernel for f in found]
    if names and shutil.which('c++filt'):   # the kernels' C++ names
        names = subprocess.run(['c++filt'], input='\n'.join(names), capture_output=True,
                               text=True).stdout.splitlines()
    for finding, kernel in zip(found, names):
        print(f'{kernel}: {finding.pointer} is stored to {finding.stores} time(s) and read '
              f'through ld.global.nc {finding.nc_loads} time(s)')
    print(f'{len(found)} finding(s) in {kernels} kernel(s) of {len(args.ptx)} file(s)')
    return 1 if found else 0


if __name__ == '__main__':
    sys.exit(main())
