"""mmattn's compiled kernels: the op schemas, and loading the extension that implements them.

The schemas of the compiled ops are defined here, in Python, at import time (so their fake and
autograd registrations in :mod:`mmattn.ops.psa` / :mod:`mmattn.ops.outlook` never depend on a
build); the C++/CUDA sources under ``mmattn/ops/csrc`` only register implementations
(``TORCH_LIBRARY_IMPL(mmattn, CPU|CUDA, m)``). Calling an op whose implementation is not loaded
is never done by mmattn: the dispatch predicates (:mod:`mmattn.ops.dispatch`) ask
:func:`has_kernel` first.

Where the implementations come from, first match wins (``import mmattn`` never compiles):

1. ``mmattn._C``, built by ``setup.py`` when torch sees a GPU or ``MMATTN_WITH_CUDA=1`` is set
   (``MMATTN_WITH_CUDA=1 pip install -v --no-build-isolation -e .``; this compiles with nvcc
   on a machine without a GPU too; ``MMATTN_WITH_CUDA=0`` skips the build);
2. a just-in-time build with :func:`torch.utils.cpp_extension.load`, only when asked for:
   ``MMATTN_JIT=1`` in the environment (compiled on first use, cached under
   ``TORCH_EXTENSIONS_DIR``), or ``python -m mmattn.ops.build`` ahead of time. The JIT build
   includes the CUDA sources when nvcc is found and torch sees a GPU (or ``MMATTN_WITH_CUDA=1``),
   else the CPU kernels alone.

Between the two, ``MMATTN_KERNELS_LIB=DIR/mmattn_kernels.so``: a library that
``python -m mmattn.ops.build --output DIR`` wrote on another machine (one with nvcc, for one
without, or a build shared by a cluster's nodes), loaded only where it was built for this torch
(version and commit), these sources and this GPU (its build description, ``mmattn_kernels.json``
beside it, says for what), else refused with what differs. Where it is set, the JIT build of its
kind (CUDA or CPU only) loads it instead of compiling.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import threading
import warnings
from typing import Optional

import torch

__all__ = ['BUILD_HINT', 'JIT_ENV', 'LIBRARY_ENV', 'SCHEMAS', 'arch_list_covers', 'build_info',
           'build_jit', 'compile_flags', 'cuda_toolkit', 'default_cuda_arch_list',
           'export_library', 'has_kernel', 'link_flags', 'load_error', 'load_extension',
           'load_library', 'loaded_from', 'probe_error_numbers', 'reset_state', 'sources',
           'sources_digest', 'want_cuda']

JIT_ENV = 'MMATTN_JIT'
LIBRARY_ENV = 'MMATTN_KERNELS_LIB'
#: an exported library's file name (``.so``) and its build description's (``.json``)
LIBRARY_NAME = 'mmattn_kernels'
CSRC = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc')
BUILD_HINT = ('build the kernels with `MMATTN_WITH_CUDA=1 pip install -v --no-build-isolation '
              '-e .` (needs nvcc; no GPU needed to compile), or set MMATTN_JIT=1 to compile them '
              'on first use (`python -m mmattn.ops.build` does it ahead of time)')

#: op name -> schema; the compiled sources implement these for CPU and/or CUDA
SCHEMAS: dict[str, str] = {
    # outlook attention, Eq. 4-5 of arXiv 2106.13112, fused (no unfold, no fold)
    # (with ones_column, y has 8 more channels, (1, 0, ..., 0) at every pixel: a product of a
    # gradient with it gives a bias's gradient beside the weight's, in the same product)
    'outlook_fwd': 'outlook_fwd(Tensor v, Tensor attn, int kernel_size, int padding, '
                   'int stride, bool ones_column=False) -> Tensor',
    # (with softmax_scale, the gradient of the logits L of attn = softmax(scale L) in place of
    # attn's: the block's backward, whose softmax's backward it takes over)
    'outlook_bwd': 'outlook_bwd(Tensor grad_out, Tensor v, Tensor attn, int kernel_size, '
                   'int padding, int stride, float? softmax_scale=None) -> (Tensor, Tensor)',
    # the s x s average pooling (ceil mode) of a channels-last map that the block's weights
    # start from (CUDA: a kernel of its own; CPU: ATen's avg_pool2d)
    'outlook_pool': 'outlook_pool(Tensor x, int stride) -> Tensor',
    # grad plus that pooling's backward of pooled (the block's input gradient, in one pass)
    'outlook_unpool_add': 'outlook_unpool_add(Tensor grad, Tensor pooled, int stride) -> Tensor',
    # the block's weights softmax(scale L) over each group of K^2 logits (Eq. 3), in one pass
    'outlook_softmax': 'outlook_softmax(Tensor logits, int kernel_size, float scale) -> Tensor',
    # the four passes over x of the folded paper-form PSA (see mmattn.ops.psa)
    'psa_fwd_reduce': 'psa_fwd_reduce(Tensor x, Tensor wq, int splits) '
                      '-> (Tensor, Tensor, Tensor, Tensor, Tensor)',
    'psa_fwd_apply': 'psa_fwd_apply(Tensor x, Tensor a, Tensor u, Tensor bias, '
                     'bool sequential) -> (Tensor, Tensor)',
    'psa_bwd_reduce': 'psa_bwd_reduce(Tensor grad, Tensor x, Tensor a, Tensor s_mask, '
                      'int splits, bool sequential) -> (Tensor, Tensor, Tensor, Tensor)',
    'psa_bwd_apply': 'psa_bwd_apply(Tensor grad, Tensor x, Tensor a, Tensor s_mask, '
                     'Tensor logits, Tensor lnorm, Tensor d_t, Tensor u, Tensor dm, Tensor dsv, '
                     'Tensor wq, Tensor beta, int splits, bool sequential) -> (Tensor, Tensor)',
    # a whole PSA block (the four forms of mmattn.layers.PolarizedSelfAttention) in one call
    # per direction, on the CPU (psa_cpu.cpp); form: 0/1 paper parallel/sequential, 2/3 the
    # release's PSA_p/PSA_s
    'psa_block_fwd': 'psa_block_fwd(Tensor x, Tensor[] weights, int form, float eps) -> Tensor',
    'psa_block_bwd': 'psa_block_bwd(Tensor grad, Tensor x, Tensor[] weights, int form, '
                     'float eps) -> (Tensor, Tensor[])',
    # the same on CUDA (psa_cuda.cu): the forward also returns the small tensors its backward
    # takes (their shapes: mmattn.ops.psa_block.state_shapes)
    'psa_block_cuda_fwd': 'psa_block_cuda_fwd(Tensor x, Tensor[] weights, int form, float eps) '
                          '-> (Tensor, Tensor[])',
    'psa_block_cuda_bwd': 'psa_block_cuda_bwd(Tensor grad, Tensor x, Tensor[] state, '
                          'Tensor[] weights, int form, float eps) -> (Tensor, Tensor[])',
    # a linear layer and a LayerNorm over the last dimension whose parameters' gradients are
    # sums over the gradient's rows on mmattn's kernels (param_grads.cpp, column_sums.cuh)
    'linear': 'linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor',
    'layer_norm': 'layer_norm(Tensor x, Tensor weight, Tensor? bias, float eps) -> Tensor',
    # their parameters' gradients: sum_rows grad; (sum_rows grad xhat, sum_rows grad), xhat =
    # (x - mean) rstd per row
    'bias_grad': 'bias_grad(Tensor grad) -> Tensor',
    'layer_norm_param_grads': 'layer_norm_param_grads(Tensor grad, Tensor x, Tensor mean, '
                              'Tensor rstd) -> (Tensor, Tensor)',
    # the C-sized work between the passes, a team of blocks per image (psa_glue.cuh): from the
    # splits' partial sums, nothing per pixel
    'psa_fwd_glue': 'psa_fwd_glue(Tensor pmax, Tensor psum, Tensor ps, Tensor pm, int pixels, '
                    'Tensor[] weights, float eps, bool sequential) -> (Tensor, Tensor, Tensor)',
    'psa_bwd_glue': 'psa_bwd_glue(Tensor part_dt, Tensor part_da, Tensor part_dueff, '
                    'Tensor stats, int pixels, Tensor[] weights, float eps, bool sequential) '
                    '-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)',
}

_LIB = torch.library.Library('mmattn', 'FRAGMENT')  # noqa: TOR901 (kept alive: owns the defs)
for _schema in SCHEMAS.values():
    _LIB.define(_schema)

_lock = threading.Lock()
_state: dict[str, Optional[str]] = {'loaded_from': None, 'error': None}
#: the library file each kind of JIT build (with_cuda False / True) compiled in this process
_jit_libraries: dict[bool, str] = {}


def sources(with_cuda: bool) -> list[str]:
    """The extension's source files: the CPU kernels and bindings, plus the ``.cu`` files
    (``cuda_ops.cpp``, their registration, compiles empty without ``-DWITH_CUDA``)."""
    names = sorted(os.listdir(CSRC))
    keep = [n for n in names if n.endswith('.cpp') or (with_cuda and n.endswith('.cu'))]
    return [osp.join(CSRC, n) for n in keep]


#: GPU architectures compiled when ``TORCH_CUDA_ARCH_LIST`` is unset and no GPU is visible:
#: Ampere (sm_80 code also runs on sm_86/sm_89) and Hopper (H100/H200), plus PTX for newer ones
DEFAULT_CUDA_ARCH_LIST = '8.0;9.0+PTX'


def default_cuda_arch_list() -> None:
    """Set ``TORCH_CUDA_ARCH_LIST`` for a build on a machine without a GPU (where torch would
    otherwise compile for every architecture it knows); a GPU's own architecture or the user's
    setting wins."""
    if not os.environ.get('TORCH_CUDA_ARCH_LIST') and not torch.cuda.is_available():
        os.environ['TORCH_CUDA_ARCH_LIST'] = DEFAULT_CUDA_ARCH_LIST


def compile_flags(with_cuda: bool) -> dict[str, list[str]]:
    """Compiler flags of the extension, shared by ``setup.py`` and the JIT build."""
    cxx = ['-O3'] + (['-DWITH_CUDA'] if with_cuda else [])
    # ptxas warns when a kernel spills registers or uses local memory: in these memory-bound
    # kernels that is a performance bug (tests/ops/test_build.py fails on the warning).
    # --threads=0: the architectures (sm_80, sm_90, ...) compiled in parallel, one per core
    # (psa_cuda.cu, the float32 unit, for sm_80 and sm_90: 54 s instead of 74 on 2 cores)
    return {'cxx': cxx, 'nvcc': ['-O3', '--use_fast_math', '-DWITH_CUDA', '-lineinfo',
                                 '-Xptxas=-warn-spills,-warn-lmem-usage', '--threads=0']}


def link_flags() -> list[str]:
    """Linker inputs of the extension, shared by ``setup.py`` and the JIT build: the C++ runtime
    torch runs on (the ``libstdc++.so.6`` this process has loaded, Linux), so that the extension
    shares it with torch.

    A compiler that links libstdc++ statically (the lent GPU machines' ``$CXX``,
    ``/opt/gcc/bin/g++``, 2026-11-27: the libraries it built needed no ``libstdc++.so``) puts a
    second copy of the C++ library's streams and locales into the extension, beside torch's;
    then every error message that formats a number (``TORCH_CHECK(..., x.sizes())``) crashed the
    process there (SIGSEGV in ``std::ostream::_M_insert<long>``) and loses its numbers with
    Debian's g++ 12 and ``-static-libstdc++``. Given the shared library itself, the linker takes
    the C++ runtime from it and nothing from a static archive; ``--no-as-needed`` around it
    keeps it where the flags come before the objects (``LDFLAGS`` in a setuptools build), which
    ``--as-needed`` would otherwise drop, the objects' references not seen yet."""
    if not sys.platform.startswith('linux'):
        return []
    try:
        with open('/proc/self/maps') as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) == 6 else ''
                if osp.basename(path).startswith('libstdc++.so'):
                    return ['-Wl,--push-state,--no-as-needed', path, '-Wl,--pop-state']
    except OSError:
        pass
    return []


def cuda_toolkit() -> Optional[str]:
    """The CUDA toolkit to build with, or None: torch's ``CUDA_HOME`` when it holds ``bin/nvcc``
    and the runtime to link (``lib64/`` or ``lib/libcudart.so``), else the first of
    ``$CUDA_HOME``, ``$CUDA_PATH``, ``/usr/local/cuda`` that does. torch's choice is updated to
    it: torch guesses the toolkit from the ``nvcc`` on PATH, and a wrapper script there (such as
    ``/usr/local/bin/nvcc``) makes it guess ``/usr/local``, where the link step fails."""
    import torch.utils.cpp_extension as cpp_extension

    def complete(root: Optional[str]) -> bool:
        return bool(root) and osp.isfile(osp.join(root, 'bin', 'nvcc')) and any(
            osp.exists(osp.join(root, lib, 'libcudart.so')) for lib in ('lib64', 'lib'))

    for root in (cpp_extension.CUDA_HOME, os.environ.get('CUDA_HOME'),
                 os.environ.get('CUDA_PATH'), '/usr/local/cuda'):
        if complete(root):
            cpp_extension.CUDA_HOME = root
            return root
    return None


def want_cuda() -> bool:
    """Whether a build includes the CUDA sources: ``MMATTN_WITH_CUDA=1`` (compiles without a
    GPU), ``=0`` never, unset when torch sees a GPU; always needs a CUDA toolkit (nvcc)."""
    flag = os.environ.get('MMATTN_WITH_CUDA', '').strip()
    if flag == '0':
        return False
    return (flag == '1' or torch.cuda.is_available()) and cuda_toolkit() is not None


def build_jit(verbose: bool = False, with_cuda: Optional[bool] = None) -> str:
    """Compile and load the extension with :func:`torch.utils.cpp_extension.load` (cached:
    a second call with unchanged sources only loads it). Returns a description of the build.
    Where ``MMATTN_KERNELS_LIB`` names a library of the same kind (with the CUDA kernels or
    without), that library is loaded instead (:func:`load_library`: it raises where the library
    was built for another torch, other sources or another GPU)."""
    from torch.utils.cpp_extension import load
    with_cuda = want_cuda() if with_cuda is None else with_cuda
    library = os.environ.get(LIBRARY_ENV, '').strip()
    if library and _read_build_info(library).get('with_cuda') == with_cuda:
        return load_library(library)
    if with_cuda:
        if cuda_toolkit() is None:
            raise RuntimeError('the CUDA kernels need a CUDA toolkit (nvcc and libcudart); '
                               'none found in CUDA_HOME, CUDA_PATH or /usr/local/cuda')
        default_cuda_arch_list()
    _jit_libraries[with_cuda] = load(
        name='mmattn_jit_cuda' if with_cuda else 'mmattn_jit_cpu', sources=sources(with_cuda),
        extra_cflags=compile_flags(with_cuda)['cxx'],
        extra_cuda_cflags=compile_flags(with_cuda)['nvcc'] if with_cuda else None,
        extra_ldflags=link_flags(), is_python_module=False, verbose=verbose)
    built = 'JIT (CPU + CUDA kernels)' if with_cuda else 'JIT (CPU kernels only)'
    _state.update(loaded_from=built, error=None)
    return built


def sources_digest() -> str:
    """SHA-256 of what the kernels are compiled from: every file under ``csrc`` (its name and
    bytes) and the compiler flags (:func:`compile_flags`)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(CSRC)):
        with open(osp.join(CSRC, name), 'rb') as source:
            digest.update(f'{name}\0{osp.getsize(source.name)}\0'.encode() + source.read())
    for with_cuda in (False, True):
        digest.update(json.dumps(compile_flags(with_cuda), sort_keys=True).encode())
    return digest.hexdigest()


# an op given arguments it must refuse, the first line of its error printed
_ERROR_PROBE = """
try:
    torch.ops.mmattn.outlook_unpool_add(torch.randn(2, 7, 9, 3), torch.randn(2, 3, 5, 3), 2)
except RuntimeError as e:
    print(str(e).splitlines()[0])
"""
#: what that error must say: the expected and the actual shape, with their numbers
ERROR_PROBE_EXPECTS = ('(2, 4, 5, 3)', '[2, 3, 5, 3]')


def probe_error_numbers(load: str) -> Optional[str]:
    """Run in a child process ``load`` (Python that loads the kernels; ``torch`` is imported),
    then an op call the kernels must refuse. None where the error's message names the expected
    and the actual shape with their numbers, else what came out (exit status, message, the end
    of stderr): a build with a C++ runtime of its own beside torch's (:func:`link_flags`) crashed
    there or lost the numbers."""
    run = subprocess.run([sys.executable, '-c', 'import torch\n' + load + _ERROR_PROBE],
                         capture_output=True, text=True, timeout=600)
    message = run.stdout.strip()
    if run.returncode == 0 and all(part in message for part in ERROR_PROBE_EXPECTS):
        return None
    return (f'exit status {run.returncode}, message {message!r}, expected one naming the shapes '
            f'{ERROR_PROBE_EXPECTS[0]} and {ERROR_PROBE_EXPECTS[1]}; stderr: '
            f'{run.stderr.strip()[-1500:]!r}')


def _cuda_arch_list() -> str:
    """The GPU architectures a CUDA build compiles for: ``TORCH_CUDA_ARCH_LIST``, else (as
    torch does) those of the visible GPUs."""
    listed = os.environ.get('TORCH_CUDA_ARCH_LIST', '').strip()
    if listed or not torch.cuda.is_available():
        return listed
    return ';'.join(sorted({'{}.{}'.format(*torch.cuda.get_device_capability(i))
                            for i in range(torch.cuda.device_count())}))


def build_info(with_cuda: bool) -> dict[str, object]:
    """What a build made in this process is for: torch's version, commit and CUDA, the sources
    (:func:`sources_digest`), the kind of build and, with the CUDA kernels, the architectures."""
    return {'torch': torch.__version__, 'torch_git': torch.version.git_version,
            'torch_cuda': torch.version.cuda, 'sources': sources_digest(),
            'with_cuda': with_cuda, 'cuda_arch_list': _cuda_arch_list() if with_cuda else ''}


def arch_list_covers(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether code built for ``arch_list`` (``TORCH_CUDA_ARCH_LIST``'s form, ``'8.0;9.0+PTX'``)
    runs on a GPU of compute ``capability``: machine code of the same major version and a minor
    version no higher (``8.0`` runs on 8.6; ``9.0a`` on 9.0 alone), or PTX of a version no higher
    (compiled by the driver)."""
    for entry in arch_list.replace(' ', ';').split(';'):
        number, _, suffix = entry.strip().partition('+')
        specific = number.endswith('a')
        try:
            major, minor = (int(part) for part in number.rstrip('a').split('.'))
        except ValueError:   # a name (``Hopper``) or a typo: nothing known to be covered
            continue
        if (major, minor) == capability or (
                not specific and major == capability[0] and minor <= capability[1]) or (
                suffix == 'PTX' and (major, minor) <= capability):
            return True
    return False


def _read_build_info(library: str) -> dict[str, object]:
    """The build description beside an exported library (``mmattn_kernels.json`` for
    ``mmattn_kernels.so``); raises RuntimeError naming the file where there is none."""
    described = osp.splitext(library)[0] + '.json'
    try:
        with open(described) as description:
            info = json.load(description)
        if isinstance(info, dict):
            return info
        problem = f'not a JSON object: {info!r}'[:200]
    except (OSError, ValueError) as exc:
        problem = str(exc)
    raise RuntimeError(f'{LIBRARY_ENV}={library}: its build description {described} cannot be '
                       f'read ({problem}); write both with `python -m mmattn.ops.build --output '
                       f'DIR`')


def load_library(library: str) -> str:
    """Load kernels that :func:`export_library` wrote (``MMATTN_KERNELS_LIB``): only where its
    build description matches this process (torch's version and commit, the sources, and for
    the CUDA kernels every visible GPU's architecture), else RuntimeError naming what differs,
    the library's value and this process's. Returns a description of what was loaded."""
    built = _read_build_info(library)
    here = build_info(bool(built.get('with_cuda')))
    names = {'torch': 'torch', 'torch_git': "torch's commit", 'sources': 'the kernel sources'}
    for key, name in names.items():
        if built.get(key) != here[key]:
            raise RuntimeError(
                f'{LIBRARY_ENV}={library} was built for {name} {built.get(key)!r}, this '
                f'process has {here[key]!r}: export it again for this torch and this tree '
                f'(`python -m mmattn.ops.build --output DIR`), or unset {LIBRARY_ENV}')
    if built.get('with_cuda') and torch.cuda.is_available():
        arch_list = str(built.get('cuda_arch_list', ''))
        for index in range(torch.cuda.device_count()):
            capability = torch.cuda.get_device_capability(index)
            if not arch_list_covers(arch_list, capability):
                raise RuntimeError(
                    f'{LIBRARY_ENV}={library} was compiled for the GPU architectures '
                    f'{arch_list!r}, which do not include cuda:{index} '
                    f"({torch.cuda.get_device_name(index)}, compute capability "
                    f"{'.'.join(map(str, capability))}): export it with "
                    f'TORCH_CUDA_ARCH_LIST set to include it')
    try:
        torch.ops.load_library(library)
    except OSError as exc:
        raise RuntimeError(f'{LIBRARY_ENV}={library} does not load: {exc}') from exc
    kind = 'CPU + CUDA kernels' if built.get('with_cuda') else 'CPU kernels only'
    loaded = f'{library} (prebuilt, {kind})'
    _state.update(loaded_from=loaded, error=None)
    return loaded


def export_library(out_dir: str, with_cuda: bool) -> str:
    """Copy the library this process's :func:`build_jit` of that kind compiled to
    ``out_dir/mmattn_kernels.so``, with its build description (:func:`build_info`) beside it
    as ``mmattn_kernels.json``, for ``MMATTN_KERNELS_LIB`` on another machine. Each file is
    written under a temporary name and renamed, the description last (a failed step leaves no
    temporary file). Returns the library's path."""
    if with_cuda not in _jit_libraries:
        raise RuntimeError(f'nothing to export: no JIT build with_cuda={with_cuda} has run in '
                           f'this process (build_jit(with_cuda={with_cuda}) first)')
    os.makedirs(out_dir, exist_ok=True)
    library = osp.join(out_dir, LIBRARY_NAME + '.so')
    described = osp.join(out_dir, LIBRARY_NAME + '.json')
    try:
        shutil.copyfile(_jit_libraries[with_cuda], library + '.tmp')
        with open(described + '.tmp', 'w') as description:
            json.dump(build_info(with_cuda), description, indent=1)
        os.replace(library + '.tmp', library)
        os.replace(described + '.tmp', described)
    finally:   # nothing half-written left where a step failed
        for leftover in (library + '.tmp', described + '.tmp'):
            if osp.exists(leftover):
                os.remove(leftover)
    return library


def load_extension() -> Optional[str]:
    """Load the kernels once: the prebuilt ``mmattn._C``, else the library that
    ``MMATTN_KERNELS_LIB`` names, else a JIT build when ``MMATTN_JIT=1``. Returns where they came
    from, or None (:func:`load_error` then says why). Never raises; where kernels were asked for
    (``MMATTN_KERNELS_LIB`` set, or ``MMATTN_JIT=1``) and do not load, warns once
    (RuntimeWarning) that the blocks run their PyTorch paths."""
    with _lock:
        if _state['loaded_from'] is not None or _state['error'] is not None:
            return _state['loaded_from']
        try:
            importlib.import_module('mmattn._C')
            _state['loaded_from'] = 'mmattn._C (built at install)'
        except ImportError as prebuilt_error:
            library = os.environ.get(LIBRARY_ENV, '').strip()
            jit = os.environ.get(JIT_ENV, '').strip() == '1'
            if library:
                try:
                    load_library(library)
                except RuntimeError as exc:
                    _state['error'] = str(exc)
            elif not jit:
                _state['error'] = f'not built ({prebuilt_error}); {BUILD_HINT}'
            else:
                try:
                    build_jit()
                except Exception as exc:  # compiler missing, build error: report, never raise
                    _state['error'] = f'{JIT_ENV}=1 but the JIT build failed: {exc}'
            if _state['error'] is not None and (library or jit):  # asked for, not loaded
                warnings.warn(f"mmattn's compiled kernels were asked for but not loaded: "
                              f"{_state['error']}. The blocks run their PyTorch paths "
                              f"(backend='auto'); an explicit backend='cpu'/'cuda' raises.",
                              RuntimeWarning, stacklevel=2)
        return _state['loaded_from']


def reset_state(loaded_from: Optional[str] = None, error: Optional[str] = None) -> None:
    """Set what :func:`load_extension` reports (``reset_state()`` makes the next call look
    again). For tests and tools that load a build themselves; registered kernels stay
    registered, but :func:`has_kernel` reports them only while ``loaded_from`` is set."""
    _state.update(loaded_from=loaded_from, error=error)


def loaded_from() -> Optional[str]:
    """Where the kernels were loaded from (after :func:`load_extension`), or None."""
    return _state['loaded_from']


def load_error() -> Optional[str]:
    """Why the kernels are not loaded (after :func:`load_extension`), or None."""
    return _state['error']


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether a compiled implementation of ``mmattn::<op>`` for ``device``'s type is
    registered (loads the extension first, see :func:`load_extension`)."""
    key = {'cpu': 'CPU', 'cuda': 'CUDA'}.get(torch.device(device).type)
    if load_extension() is None or key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f'mmattn::{op}', key)
