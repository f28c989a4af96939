"""Benchmark mmattn's fast paths against eager PyTorch and torch.compile, in one process.

For each op, three implementations with the same weights and input:

* ``eager``: the eager form - PSA: ``PolarizedSelfAttention(backend='reference')`` (the paper's
  equations, or the authors' release with ``--variant official``, 1x1 convolutions on the full
  maps); outlook: ``timm.models.volo.OutlookAttention`` (unfold / fold);
* ``compile``: ``torch.compile`` of that same eager module (compiled once, before timing; its
  compile time is printed);
* ``mmattn``: ``PolarizedSelfAttention(backend='auto')`` / ``mmattn.layers.OutlookAttention``
  (``forward_nhwc``, ``backend='auto'``): the compiled kernels where they are loaded for the
  device (``MMATTN_JIT=1`` or a ``MMATTN_WITH_CUDA=1`` install, see ``mmattn.ops.extension``),
  else the pure-PyTorch fast paths; when a kernel is chosen, a second row gives the PyTorch path
  (``mmattn (folded)`` for PSA, ``mmattn (reference)`` for outlook: strided slices, no unfold),
  and for outlook on CUDA in bf16/fp16 a third the kernels with the gathers on the tensor-core
  kernel (``mmattn (tensor-core gathers)``: ``MMATTN_OUTLOOK_TENSOR_CORE_GATHER=1`` around its
  calls), and for PSA on the CUDA kernels at up to 256 channels the passes on their
  shared-memory tiles (``mmattn (shared-memory tiles)``: ``MMATTN_PSA_REGISTER_TILES=0``; NCHW
  takes the register tiles by default, ``mmattn/ops/csrc/psa_register_tiles.cuh``), and on
  GPUs with thread-block clusters (compute capability 9.0) the glue kernels on one block per
  image (``mmattn (one glue block an image)``: ``MMATTN_PSA_GLUE_BLOCKS=1``; by default a
  cluster of blocks spreads each image's, ``mmattn/ops/csrc/psa_glue.cuh``), and for the
  release's PSA_p on the CUDA kernels its spatial reduction and apply pass in two launches
  (``mmattn (two launches after the glue)``: ``MMATTN_PSA_COOPERATIVE=0``; by default one
  cooperative launch, ``mmattn/ops/csrc/psa_release_p.cuh``), and for the release's PSA_s on
  the CUDA kernels its value map as GEMMs into a transient map (``mmattn (value map by
  GEMM)``: ``MMATTN_PSA_VALUE_TILES=0``; by default, where tensor cores take the products, the
  kernels' own tiles, ``mmattn/ops/csrc/psa_value_tiles.cuh``) and, on those tiles, the
  backward's ``M = dVl x^T`` as a GEMM after its cooperative launch (``mmattn (M by GEMM)``:
  ``MMATTN_PSA_FUSED_M=0``; by default in that launch).

With ``--op mlp`` (part of ``all``) VOLO's MLP half-block ``x + MLP(LN(x))`` on (B, H, W, C)
tokens is timed with torch's layers (``eager``, ``compile``) against mmattn's
``dense_layers`` (``mmattn``: on CUDA the parameters' gradients as column sums on mmattn's
kernels; ``mmattn (PyTorch column sums)``: the same with ``MMATTN_COLUMN_SUMS=0``).

With ``--op volo`` (part of ``all``) a whole VOLO-D1 training step (forward, backward, SGD
update, batch of 224 px images) of timm's ``volo_d1_224`` (``eager``; ``eager (channels_last)``
with its weights channels-last) is timed against mmattn's ``volo_d1`` with the same weights
(``mmattn``), and on CUDA each through ``torch.compile`` (``compile``, ``mmattn (compile)``),
and mmattn's with torch's linear layers and LayerNorms, whose parameter gradients' column sums
then run on PyTorch's kernels (``mmattn (PyTorch sums)``: ``volo_d1(column_sum_grads=False)``'s
layers): training steps only, the forward columns stay empty.

Measured: forward (inference, ``torch.no_grad``) and forward+backward (``y.backward(g)``, input
and parameters requiring gradients) times, the median of ``--iters`` runs after ``--warmup``,
the implementations taking turns call by call (robust to load from other processes); the
forward+backward's host CPU time (the process's, every thread, from the call until it returns,
before the device is waited for: on CUDA, a host time equal to the wall time says the host,
not the GPU, sets the pace, as it did for mmattn's ops at the gpu preset's shapes on the lent
H100 machines, 2026-11-27); on CUDA, the kernels of one profiled forward+backward: their summed
durations and how many (the device's work whatever the host's pace: on the H200 of 2026-11-27
mmattn's VOLO-D1 step took 61.0 ms wall and 59.0 ms of host CPU for about 40 ms of kernels);
activation memory (bytes the autograd graph keeps for backward, through
``torch.autograd.graph.saved_tensors_hooks``; not available inside a compiled graph, where on
CUDA the peak column tells); peak memory above the inputs (CUDA only, from the caching
allocator); achieved bandwidth, the op's minimal traffic divided by the time, as a share of the
device's peak. Minimal traffic: PSA forward 3|x| (two reads of x for the reductions, one write),
forward+backward 8|x| (+ one read of x and of the output gradient, one write of ``dx``, two more
reads for the reductions); outlook forward 2|x| (read x, write y), forward+backward 5|x|.
The device peak: ``--peak-gbs``, else a table of GPU models, else (CPU) the measured bandwidth of
a large tensor copy (``torch.clone``, read + write), labelled as such. ``cudnn.benchmark`` stays
off unless ``--cudnn-benchmark`` (the VOLO-D1 step's stem and convolutions choose their
algorithms by timing then; ``tools/benchmark_model.py`` always sets it).

This is a tool, not a test: nothing here asserts a speed. Examples::

    python tools/benchmark.py --preset cpu          # PSA [4,256,64,64] fp32, 2 threads
    python tools/benchmark.py --preset gpu          # the issue's H100/H200 bf16 shapes
    python tools/benchmark.py --preset host         # PSA [1,8,4,4] vs conv3x3+BN+ReLU, 1 thread
    python tools/benchmark.py --preset host-gpu     # the same on CUDA: host cost per block
    python tools/benchmark.py --op psa --shape 2,64,32,32 --mode sequential --no-compile
    python tools/benchmark.py --op psa --variant official --mode sequential --no-compile \
        --shape 2,48,128,256 2,384,16,32 --kernels 12   # + each shape's kernels, by time
"""
from __future__ import annotations

import argparse
import copy
import os
import os.path as osp
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar

import torch
from torch import nn

import mmattn  # noqa: F401  (registers the blocks, checks the stack)
from mmattn.analysis import saved_bytes
from mmattn.layers import OutlookAttention, PolarizedSelfAttention
from mmattn.models.dense_layers import restore_torch_layers, use_column_sum_layers
from mmattn.ops import kernel_status, select_backend
from mmattn.ops.param_grads import ENV_COLUMN_SUMS
from mmattn.utils.cli import int_at_least, int_tuple, visible_device
from mmattn.utils.device import device_problem
from mmattn.utils.quiet import quiet_no_cuda_runtime

quiet_no_cuda_runtime()  # torch.compile imports torch.utils.cpp_extension, which says it on CPU

# HBM bandwidth in GB/s (vendor data sheets)
GPU_PEAK_GBS = {'H100 SXM': 3350, 'H100 80GB HBM3': 3350, 'H100 NVL': 3900, 'H100 PCIe': 2000,
                'H200': 4800, 'A100-SXM4-80GB': 2039, 'A100-SXM4-40GB': 1555,
                'A100-PCIE-40GB': 1555, 'A100 80GB PCIe': 1935}
T = TypeVar('T')
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


@dataclass
class Case:
    """One benchmark: an op at one shape, with its implementations."""

    op: str
    shape: tuple[int, ...]
    detail: str
    floor_fwd: int                      # minimal bytes moved, forward
    floor_fwdbwd: int                   # minimal bytes moved, forward + backward
    make_input: Callable[[], torch.Tensor]
    impls: dict[str, nn.Module] = field(default_factory=dict)
    compile: bool = True                # whether the eager form is also run through torch.compile
    compiled_too: tuple[str, ...] = ()  # further implementations run through torch.compile
    train_only: bool = False            # time forward + backward only (no inference forward)
    # environment variables set around each call of an implementation (by name): a kernel
    # choice of mmattn's (MMATTN_OUTLOOK_TENSOR_CORE_GATHER) timed in the same turns as the default
    envs: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class KernelSwitch:
    """A default of mmattn's PSA kernels, switched off by an environment variable that the C++
    reads at each call: the benchmarks time it beside the default, in the same turns."""

    name: str       # what runs instead, as a row says it: 'mmattn (<name>)'
    key: str        # tools/benchmark_model.py --switches
    variable: str
    value: str
    forms: tuple[tuple[str, str], ...] = ()  # the (variant, mode) it applies to; () every form
    max_channels: Optional[int] = None       # the default applies up to these channels
    min_capability: int = 0                  # ... on GPUs of this compute capability and up

    @property
    def env(self) -> dict[str, str]:
        return {self.variable: self.value}

    def applies(self, variant: str, mode: str, device: torch.device,
                channels: Optional[int] = None) -> bool:
        """Whether the default runs for this form on ``device`` (CUDA; ``channels``: a block's,
        or None for a model's blocks of several widths)."""
        return (device.type == 'cuda' and (not self.forms or (variant, mode) in self.forms)
                and (channels is None or self.max_channels is None
                     or channels <= self.max_channels)
                and torch.cuda.get_device_capability(device)[0] >= self.min_capability)


_RELEASE_P, _RELEASE_S = ('official', 'parallel'), ('official', 'sequential')
#: the PSA kernels' defaults that a variable switches off (docs/kernels.md), oldest first
PSA_SWITCHES = (
    # NCHW's passes on register tiles (psa_register_tiles.cuh), up to 256 channels
    KernelSwitch('shared-memory tiles', 'register-tiles', 'MMATTN_PSA_REGISTER_TILES', '0',
                 max_channels=256),
    # each image's glue on a cluster of blocks (psa_glue.cuh), compute capability 9.0
    KernelSwitch('one glue block an image', 'glue-clusters', 'MMATTN_PSA_GLUE_BLOCKS', '1',
                 min_capability=9),
    # PSA_p's spatial reduction and apply pass in one cooperative launch (psa_release_p.cuh)
    KernelSwitch('two launches after the glue', 'cooperative', 'MMATTN_PSA_COOPERATIVE', '0',
                 forms=(_RELEASE_P,)),
    # PSA_s's value map in the kernels' own tiles (psa_value_tiles.cuh)
    KernelSwitch('value map by GEMM', 'value-tiles', 'MMATTN_PSA_VALUE_TILES', '0',
                 forms=(_RELEASE_S,)),
    # ... and on those tiles M = dVl x^T in the backward's cooperative launch
    KernelSwitch('M by GEMM', 'fused-m', 'MMATTN_PSA_FUSED_M', '0', forms=(_RELEASE_S,)),
)


def device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return f'CUDA, {torch.cuda.get_device_name(device)}'
    model = platform.processor() or 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f
                         if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f'CPU, {torch.get_num_threads()} threads, {model}'


def peak_bandwidth(device: torch.device, override: Optional[float]) -> tuple[float, str]:
    """Peak bandwidth in GB/s and where the number comes from."""
    if override:
        return override, '--peak-gbs'
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
        for key, gbs in GPU_PEAK_GBS.items():
            if key in name:
                return gbs, f'data sheet ({key})'
        return float('nan'), f'unknown GPU {name!r}: pass --peak-gbs'
    src = torch.randn(64 * 2 ** 20 // 4)          # 64 MiB, beyond the caches
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / min(times) / 1e9, 'measured copy (read + write) of 64 MiB'


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
          iters: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall time in ms of each function, and the median CPU time of the process (every
    thread) from the call until it returns, before the device is waited for: where the two
    are equal on CUDA, the host is what the call waits for, not the GPU. The functions are run
    round-robin (one call of each per round), so that load from other processes on a shared
    machine hits them alike and the ratios stay meaningful."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    host: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            host[name].append(time.process_time() - c0)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    median_ms = (lambda series: {name: statistics.median(ts) * 1e3
                                 for name, ts in series.items()})
    return median_ms(times), median_ms(host)


def graph_replay(fn: Callable[[], object], device: torch.device, warmup: int,
                 reset: Optional[Callable[[], object]] = None,
                 pool: Optional[tuple] = None) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (PyTorch's whole-network capture: warm-up calls on a
    side stream, then one captured call; ``reset``, if given, before each of them, e.g. a
    training step's ``zero_grad``) and returned as its replay: the call without its host work,
    what the kernels alone cost (``tools/benchmark_model.py --cuda-graph`` too). ``pool``
    (``torch.cuda.graph_pool_handle()``): a memory pool shared with other captures, which is
    safe where the graphs are replayed one after another on one stream in the order of their
    captures."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            if reset is not None:
                reset()
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    if reset is not None:
        reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph.replay


def peak_cuda_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    if device.type != 'cuda':
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


@dataclass
class Kernels:
    """The CUDA kernels of one profiled step."""

    launches: int
    ms: float  # the sum of their durations
    table: str  # the top ones by device time ('' unless asked for)


def top_table(prof: object, device: torch.device, top: int) -> str:
    """A profile's ``top`` operators and kernels with the most self time on ``device``
    (CUDA: device time; CPU: host time)."""
    key = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=70)


#: the profiler range around each run of a step that profiled records with ``mark_steps``
PROFILE_STEP = 'benchmark: one step'


def profiled(step: Callable[[], None], device: torch.device, runs: int = 1,
             mark_steps: bool = False) -> object:
    """``torch.profiler``'s record of ``runs`` calls of ``step`` (host operators, and on CUDA
    the kernels), the device synchronised before and after; with ``mark_steps``, each call in
    a range named :data:`PROFILE_STEP`, so that what the harness and the profiler do around
    the calls (the wait for the device, the profiler's own synchronisation when it stops) can
    be told from them."""
    from contextlib import nullcontext

    from torch.profiler import ProfilerActivity, profile, record_function
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == 'cuda' else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(runs):
            with record_function(PROFILE_STEP) if mark_steps else nullcontext():
                step()
        sync(device)
    return prof


def profile_kernels(step: Callable[[], None], device: torch.device,
                    top: int = 0) -> Optional[Kernels]:
    """The CUDA kernels one call of ``step`` runs, or None off CUDA; with ``top``, the table of
    the ``top`` operators and kernels with the most device time."""
    if device.type != 'cuda':
        return None
    prof = profiled(step, device)
    kernels = [evt for evt in prof.events()
               if evt.device_type == torch.autograd.DeviceType.CUDA
               and 'Memcpy' not in evt.name and 'Memset' not in evt.name]
    return Kernels(len(kernels), sum(evt.time_range.elapsed_us() for evt in kernels) / 1e3,
                   top_table(prof, device, top) if top else '')


@dataclass
class HostSplit:
    """Where the host time of one implementation's forward + backward goes (medians, ms):
    each phase's wall time until it returns (before the device is waited for), the calling
    thread's CPU time and the process's (every thread: the backward of CUDA tensors runs on
    autograd's device thread); ``wall`` ends when the device is done. ``api``: the CUDA
    runtime and driver calls of a step, as the profiler records them (name, calls per step, ms
    per step, the longest call's ms), most time first."""

    wall: float
    fwd: tuple[float, float, float]   # wall, calling thread's CPU, every thread's CPU
    bwd: tuple[float, float, float]
    api: list[tuple[str, float, float, float]]


#: names of the CUDA runtime's (cudaLaunchKernel, cudaStreamSynchronize, ...) and driver's
#: (cuLaunchKernel, ...) calls among the profiler's host events
CUDA_API = re.compile(r'^cu(da)?[A-Z]')


def cuda_api_calls(step: Callable[[], None], device: torch.device,
                   runs: int = 3) -> list[tuple[str, float, float, float]]:
    """The CUDA runtime and driver calls of ``runs`` calls of ``step`` (profiled), per call:
    ``(name, calls, ms, longest ms)``, most time first; only the calls made while a step
    runs (its backward's on autograd's device thread too), not the harness's wait for the
    device after the runs or the profiler's own synchronisation when it stops. Empty off
    CUDA."""
    if device.type != 'cuda':
        return []
    return api_call_rows(profiled(step, device, runs, mark_steps=True).events(), runs,
                         PROFILE_STEP)


def api_call_rows(events: list, runs: int, within: str) -> list[tuple[str, float, float, float]]:
    """The CUDA runtime/driver calls among a profile's host ``events`` (``FunctionEvent``s,
    of any thread) that start inside a range named ``within``: ``(name, calls, ms, longest
    ms)`` per run, most time first."""
    ranges = [evt.time_range for evt in events if evt.name == within]
    calls: dict[str, list[float]] = {}
    for evt in events:
        if evt.device_type != torch.autograd.DeviceType.CPU or not CUDA_API.match(evt.name):
            continue
        if not any(r.start <= evt.time_range.start <= r.end for r in ranges):
            continue
        calls.setdefault(evt.name, []).append(evt.time_range.elapsed_us() / 1e3)
    rows = [(name, len(ms) / runs, sum(ms) / runs, max(ms)) for name, ms in calls.items()]
    return sorted(rows, key=lambda row: -row[2])


def forward_backward(module: nn.Module, x: torch.Tensor, g: torch.Tensor,
                     mark: Optional[Callable[[], None]] = None) -> None:
    """One timed forward + backward of ``module``: x as a leaf requiring gradients, ``g`` the
    output gradient (ones where the output has another shape: a loss, logits), the model's
    ``after_backward`` (an optimizer step), the parameters' gradients reset. ``mark``, if
    given, is called before the forward, between it and the backward, and after the
    backward. No wait for the device."""
    xg = x.detach().requires_grad_()
    if mark is not None:
        mark()
    out = module(xg)
    if mark is not None:
        mark()
    out.backward(g if out.shape == g.shape else torch.ones_like(out))
    if mark is not None:
        mark()
    if hasattr(module, 'after_backward'):
        module.after_backward()
    for p in module.parameters():
        p.grad = None


def host_split(module: nn.Module, x: torch.Tensor, g: torch.Tensor, device: torch.device,
               warmup: int, iters: int) -> HostSplit:
    """:class:`HostSplit` of ``module``'s forward + backward on ``x`` (output gradient ``g``)."""
    def call() -> list[tuple[float, float, float]]:
        """:func:`forward_backward`; the clocks at its start, after the forward and after the
        backward. No wait for the device: the profile of the runtime calls must not hold the
        harness's own synchronisation."""
        clocks: list[tuple[float, float, float]] = []
        forward_backward(module, x, g, lambda: clocks.append(
            (time.perf_counter(), time.thread_time(), time.process_time())))
        return clocks

    def step() -> list[float]:
        clocks = call()
        sync(device)
        phases = [b - a for i in (0, 1) for a, b in zip(clocks[i], clocks[i + 1])]
        return phases + [time.perf_counter() - clocks[0][0]]

    for _ in range(warmup):
        step()
    sync(device)
    samples = [step() for _ in range(iters)]
    med = [statistics.median(column) * 1e3 for column in zip(*samples)]
    return HostSplit(med[6], tuple(med[0:3]), tuple(med[3:6]), cuda_api_calls(call, device))


def host_split_report(title: str, splits: dict[str, HostSplit], top: int) -> str:
    """The tables of ``--host-split``: the phases per implementation, and (CUDA) each one's
    ``top`` costliest runtime calls."""
    header = ['impl', 'fwd+bwd wall ms', 'fwd wall', 'fwd CPU, calling thread',
              'fwd CPU, every thread', 'bwd wall', 'bwd CPU, calling thread',
              'bwd CPU, every thread']
    rows = [[name, f'{s.wall:.3f}'] + [f'{v:.3f}' for v in s.fwd + s.bwd]
            for name, s in splits.items()]
    text = f'\n{title}: where the host time of a forward + backward goes (ms, medians)\n'
    text += markdown_table(header, rows)
    api_rows = [[name, call, f'{n:.1f}', f'{ms:.3f}', f'{longest:.3f}']
                for name, s in splits.items() for call, n, ms, longest in s.api[:top]]
    if api_rows:
        text += ('\n\nCUDA runtime/driver calls per forward + backward (the costliest '
                 f'{top} of each implementation):\n')
        text += markdown_table(['impl', 'call', 'calls', 'ms', 'longest call ms'], api_rows)
    return text


# ----------------------------------------------------------------------- the cases
def psa_case(shape: tuple[int, ...], mode: str, dtype: torch.dtype, device: torch.device,
             variant: str = 'paper') -> Case:
    n, c, h, w = shape

    def block(backend: str) -> PolarizedSelfAttention:
        return PolarizedSelfAttention(c, mode=mode, variant=variant, backend=backend,
                                      device=device, dtype=dtype)

    eager = block('reference')
    with torch.no_grad():
        for p in eager.parameters():   # non-trivial LayerNorm affine and biases
            p.normal_(0, 0.05)
    impls = {'eager': eager, 'mmattn': block('auto')}
    probe = torch.empty(1, c, 1, 1, device=device, dtype=dtype)
    backend = impls['mmattn'].selected_backend(probe)[0]
    if backend != 'folded':  # kernels, or (CUDA) the reference
        impls['mmattn (folded)'] = block('folded')
    # the kernels with a default switched off by its variable, where the default applies
    envs = {}
    if backend == 'cuda':
        for switch in PSA_SWITCHES:
            if switch.applies(variant, mode, device, c):
                name = f'mmattn ({switch.name})'
                impls[name] = block('auto')
                envs[name] = switch.env
    for module in impls.values():
        module.load_state_dict(eager.state_dict())
    nbytes = n * c * h * w * torch.finfo(dtype).bits // 8
    return Case('psa', shape, f'{variant}, {mode}', 3 * nbytes, 8 * nbytes,
                lambda: torch.randn(shape, device=device, dtype=dtype), impls, envs=envs)


def outlook_case(shape: tuple[int, ...], heads: int, dtype: torch.dtype,
                 device: torch.device) -> Case:
    from timm.models.volo import OutlookAttention as TimmOutlook
    b, h, w, c = shape
    eager = TimmOutlook(c, heads, kernel_size=3, padding=1, stride=2).to(device, dtype)
    impls: dict[str, nn.Module] = {'eager': eager}
    for name, backend in (('mmattn', 'auto'), ('mmattn (reference)', 'reference')):
        ours = OutlookAttention(c, num_heads=heads, kernel_size=3, padding=1, stride=2,
                                data_format='NHWC', backend=backend, device=device,
                                dtype=dtype)
        ours.load_state_dict(eager.state_dict())
        impls[name] = ours
    probe = torch.empty(1, 1, 1, c, device=device, dtype=dtype)
    envs = {}
    if select_backend('outlook', probe)[0] == 'reference':
        del impls['mmattn (reference)']   # 'mmattn' runs the reference already
    elif device.type == 'cuda' and dtype in (torch.bfloat16, torch.float16):
        # the gathers on the tensor-core kernel, where the scalar one runs by default
        name = 'mmattn (tensor-core gathers)'
        impls[name] = copy.deepcopy(impls['mmattn'])
        envs[name] = {'MMATTN_OUTLOOK_TENSOR_CORE_GATHER': '1'}
    nbytes = b * h * w * c * torch.finfo(dtype).bits // 8
    return Case('outlook', shape, f'NHWC, {heads} heads, K=3, s=2', 2 * nbytes, 5 * nbytes,
                lambda: torch.randn(shape, device=device, dtype=dtype), impls, envs=envs)


def with_env(fn: Callable[[], T], env: dict[str, str]) -> Callable[[], T]:
    """``fn`` run with the variables of ``env`` set in the process's environment (what mmattn's
    C++ reads at each call), each restored after it."""
    if not env:
        return fn

    def run() -> T:
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return run


class _MlpHalf(nn.Module):
    """A transformer block's second half, ``x + MLP(LN(x))`` (timm's ``Mlp``, ratio 3: VOLO's)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        from timm.layers import Mlp
        self.norm = nn.LayerNorm(channels)
        self.mlp = Mlp(channels, 3 * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def mlp_case(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Case:
    """VOLO's MLP half-block on (B, H, W, C) tokens: torch's layers (``eager``, and compiled)
    against mmattn's ``dense_layers`` (``mmattn``: on CUDA the parameters' gradients as column
    sums on mmattn's kernels; ``mmattn (PyTorch column sums)``: the same with
    ``MMATTN_COLUMN_SUMS=0``). No traffic floor (the products dominate)."""
    eager = _MlpHalf(shape[-1]).to(device, dtype)
    impls: dict[str, nn.Module] = {'eager': eager,
                                   'mmattn': use_column_sum_layers(copy.deepcopy(eager))}
    envs = {}
    if device.type == 'cuda':
        name = 'mmattn (PyTorch column sums)'
        impls[name] = copy.deepcopy(impls['mmattn'])
        envs[name] = {ENV_COLUMN_SUMS: '0'}
    return Case('mlp', shape, 'LN + Linear(C, 3C) + GELU + Linear(3C, C)', 0, 0,
                lambda: torch.randn(shape, device=device, dtype=dtype), impls, envs=envs)


#: the implementation name of the yardstick of a block's host overhead (``--preset host``)
YARDSTICK = 'conv3x3+BN+ReLU (yardstick)'


def conv_block(channels: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A 3x3 convolution + BatchNorm + ReLU (training mode): the yardstick of a block's host
    overhead. ``--preset host`` times it as one more implementation of each PSA case, in the
    same round-robin as the PSA forms, so that both run under the same conditions (alone in a
    loop of its own, the yardstick had the caches to itself: 0.07 ms here against 0.17 ms for
    a PSA form that ran 94 µs in a loop of its own, 2026-11-27)."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(channels), nn.ReLU()).to(device, dtype)


class _TrainStep(nn.Module):
    """A model whose timed forward+backward ends with an SGD update (``after_backward``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.optim = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def after_backward(self) -> None:
        self.optim.step()


def volo_case(batch: int, dtype: torch.dtype, device: torch.device) -> Case:
    """A VOLO-D1 training step: timm's ``volo_d1_224`` (``eager``; ``eager (channels_last)``:
    the same model with its weights channels-last, so that its convolutional stem runs NHWC as
    mmattn's does) against mmattn's ``volo_d1`` with the same weights. On CUDA both models are
    also run through ``torch.compile`` (``compile``, ``mmattn (compile)``; about 75 s each on
    an H100 machine); on CPU, where inductor's compile of the step takes minutes, not."""
    import timm
    eager = timm.create_model('volo_d1_224', pretrained=False).to(device, dtype).train()
    ours = timm.create_model('volo_d1', pretrained=False).to(device, dtype).train()
    ours.load_state_dict(eager.state_dict())
    eager_cl = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    shape = (batch, 3, 224, 224)
    on_cuda = device.type == 'cuda'
    impls = {'eager': _TrainStep(eager), 'eager (channels_last)': _TrainStep(eager_cl),
             'mmattn': _TrainStep(ours)}
    if on_cuda:
        # torch's linear layers and LayerNorms: their parameter gradients on PyTorch's kernels,
        # not mmattn's column sums (volo_d1(column_sum_grads=False), mmattn.models.volo.VOLO)
        impls['mmattn (PyTorch sums)'] = _TrainStep(restore_torch_layers(copy.deepcopy(ours)))
    return Case('volo_d1 step', shape, 'timm volo_d1_224 vs mmattn volo_d1', 0, 0,
                lambda: torch.randn(shape, device=device, dtype=dtype), impls,
                compile=on_cuda, compiled_too=('mmattn',) if on_cuda else (), train_only=True)


# ----------------------------------------------------------------------- running
def compile_impl(case: Case, name: str, x: torch.Tensor, g: torch.Tensor) -> nn.Module:
    """torch.compile of a copy of implementation ``name``, run once for training (and, unless
    the case is ``train_only``, for inference), so that the timings exclude compilation."""
    compiled = torch.compile(copy.deepcopy(case.impls[name]))
    if not case.train_only:
        with torch.no_grad():
            compiled(x)
    out = compiled(x.detach().requires_grad_())
    out.backward(g if out.shape == g.shape else torch.ones_like(out))
    for p in compiled.parameters():
        p.grad = None
    return compiled


def probe_compile(argv: list[str]) -> Optional[str]:
    """Compile and run the eager form in a child process first: inductor's generated code can
    abort the process (it does for timm's OutlookAttention on CPU with torch 2.13: 'double free
    or corruption'), and a crash must not take the other rows with it. None if it survives,
    else what went wrong."""
    cmd = [sys.executable, osp.abspath(__file__), *argv, '--probe-compile']
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:   # glibc's abort message goes to the terminal, not to stderr
        return f'killed by {signal.Signals(-proc.returncode).name}'
    errors = [ln.strip() for ln in proc.stderr.splitlines() if 'Error' in ln]
    return f'exit code {proc.returncode}: {(errors or ["see stderr"])[-1]}'


def run_case(case: Case, args: argparse.Namespace, device: torch.device, peak: float,
             rows: list[list[str]], probe_argv: list[str]) -> dict[str, float]:
    """Times ``case``'s implementations, appends their rows to ``rows`` (and prints the
    profiles asked for); returns each implementation's forward + backward ms (unrounded)."""
    torch.manual_seed(0)
    x = case.make_input()
    g = torch.randn_like(x)
    impls = {'eager': case.impls['eager']}
    failure = None
    graphs = 'the training graph' if case.train_only else 'forward and training graphs'
    if not args.no_compile and case.compile:
        # inductor's generated code has aborted the process on CPU (see probe_compile)
        failure = probe_compile(probe_argv) if device.type == 'cpu' else None
        if failure:
            print(f'  [{case.op}] torch.compile of the eager form crashed in a child process '
                  f'({failure})', flush=True)
        else:
            t0 = time.perf_counter()
            impls['compile'] = compile_impl(case, 'eager', x, g)
            print(f'  [{case.op}] torch.compile of the eager form: '
                  f'{time.perf_counter() - t0:.1f} s ({graphs})', flush=True)
    impls.update((name, m) for name, m in case.impls.items() if name != 'eager')
    if not args.no_compile and not args.compile_eager_only:
        for name in case.compiled_too:
            t0 = time.perf_counter()
            impls[f'{name} (compile)'] = compile_impl(case, name, x, g)
            print(f'  [{case.op}] torch.compile of {name}: {time.perf_counter() - t0:.1f} s '
                  f'({graphs})', flush=True)

    def output(module: nn.Module) -> torch.Tensor:
        if case.train_only:  # the mode the timed (and compiled) runs use
            return module(x.detach().requires_grad_()).detach().float()
        with torch.no_grad():
            return module(x).float()

    ref = output(impls['eager'])
    fwd, fwdbwd, errs = {}, {}, {}
    for name, module in impls.items():
        def run_fwd(module: nn.Module = module) -> None:
            with torch.no_grad():
                module(x)

        def run_fwdbwd(module: nn.Module = module) -> None:
            forward_backward(module, x, g)

        env = case.envs.get(name, {})
        fwd[name], fwdbwd[name] = with_env(run_fwd, env), with_env(run_fwdbwd, env)
        # (the yardstick computes something else: no error to report)
        errs[name] = float('nan') if name == YARDSTICK else \
            (with_env(lambda module=module: output(module), env)() - ref).abs().max().item()
    if args.cuda_graph:   # every implementation's calls replayed from CUDA graphs
        for name in list(impls):
            try:
                if not case.train_only:
                    fwd[name] = graph_replay(fwd[name], device, args.warmup)
                fwdbwd[name] = graph_replay(fwdbwd[name], device, args.warmup)
            except RuntimeError as exc:   # (a host-device synchronisation, say): no row
                print(f'  [{case.op}] {name}: no CUDA graph ({str(exc).strip()[:300]})',
                      flush=True)
                del impls[name]
        if 'eager' not in impls:   # nothing to compare with
            return {}
    t_fwd = {name: float('nan') for name in impls} if case.train_only else \
        timed(fwd, device, args.warmup, args.iters)[0]
    t_fwdbwd, host_fwdbwd = timed(fwdbwd, device, args.warmup, args.iters)
    mb = (lambda v: '-' if v is None else f'{v / 2 ** 20:.1f}')
    # the device's work apart from the host's pace: one profiled forward + backward each (CUDA)
    kernels = {name: profile_kernels(fwdbwd[name], device) for name in impls}
    for name, module in impls.items():
        t_f, t_b = t_fwd[name], t_fwdbwd[name]
        compiled = name == 'compile' or name.endswith('(compile)')
        act = None if compiled else saved_bytes(module, x.detach().requires_grad_())
        # (a replay allocates nothing: the graph's memory is its own)
        peak_b = None if args.cuda_graph else peak_cuda_bytes(fwdbwd[name], device)
        bw_f = case.floor_fwd / (t_f * 1e-3) / 1e9
        bw_b = case.floor_fwdbwd / (t_b * 1e-3) / 1e9
        share = (lambda bw: f'{bw:.0f} ({100 * bw / peak:.0f}%)' if case.floor_fwd else '-')
        fwd_cells = ['-', '-'] if case.train_only else [f'{t_f:.2f}',
                                                        f'{t_fwd["eager"] / t_f:.2f}x']
        speedup_b = f'{t_fwdbwd["eager"] / t_b:.2f}x'
        if name == YARDSTICK:   # not the op: its times only
            fwd_cells[1] = speedup_b = '-'
        rows.append([case.op, 'x'.join(map(str, case.shape)), case.detail, name,
                     fwd_cells[0], f'{t_b:.2f}', f'{host_fwdbwd[name]:.2f}',
                     '-' if kernels[name] is None else
                     f'{kernels[name].ms:.2f} ({kernels[name].launches})', fwd_cells[1],
                     speedup_b, mb(act), mb(peak_b), share(bw_f), share(bw_b),
                     '-' if name == YARDSTICK else f'{errs[name]:.1e}'])
        if name == 'eager' and failure:
            rows.append([case.op, 'x'.join(map(str, case.shape)), case.detail, 'compile',
                         f'crashed ({failure})'] + ['-'] * (len(HEADER) - 5))
    if args.host_split:
        splits = {name: with_env(lambda module=module: host_split(
                      module, x, g, device, args.warmup, args.iters), case.envs.get(name, {}))()
                  for name, module in impls.items()}
        print(host_split_report(f'{case.op} {"x".join(map(str, case.shape))} {case.detail}',
                                splits, args.host_split), flush=True)
    if args.kernels and 'mmattn' in impls:
        what = 'device' if device.type == 'cuda' else 'host'
        print(f'\n{case.op} {"x".join(map(str, case.shape))} {case.detail}, mmattn forward + '
              f'backward: top {args.kernels} by self {what} time over 3 runs\n'
              f'{top_table(profiled(fwdbwd["mmattn"], device, 3), device, args.kernels)}',
              flush=True)
    return t_fwdbwd


HEADER = ['op', 'shape', 'form', 'impl', 'fwd ms', 'fwd+bwd ms', 'fwd+bwd host CPU ms',
          'fwd+bwd kernels ms (launches)', 'fwd speedup', 'fwd+bwd speedup', 'activations MiB',
          'peak MiB (CUDA)', 'fwd GB/s (% peak)', 'fwd+bwd GB/s (% peak)', 'max |y - eager|']


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


PRESETS = {
    'cpu': dict(device='cpu', dtype='float32', threads=2,
                psa=[((4, 256, 64, 64), 'parallel', 'paper'),
                     ((4, 256, 64, 64), 'sequential', 'paper'),
                     ((4, 256, 64, 64), 'sequential', 'official')],
                outlook=[((8, 28, 28, 192), 6)], volo=[4], mlp=[(8, 28, 28, 192)]),
    # issue 12's host-overhead goal: every PSA form's forward + backward at most 1.5x a 3x3
    # conv + BN + ReLU at [1, 8, 4, 4], one thread (what a small map costs beyond its FLOPs)
    'host': dict(device='cpu', dtype='float32', threads=1,
                 psa=[((1, 8, 4, 4), mode, variant) for variant in ('paper', 'official')
                      for mode in ('parallel', 'sequential')],
                 outlook=[], volo=[], mlp=[], yardstick=True),
    'gpu': dict(device='cuda', dtype='bfloat16', threads=None,
                psa=[((16, 256, 128, 128), 'parallel', 'paper'),
                     ((16, 256, 128, 128), 'sequential', 'paper'),
                     ((16, 256, 128, 128), 'parallel', 'official'),
                     ((16, 256, 128, 128), 'sequential', 'official'),
                     # PSA_s at HRNet-OCR's widest map and its widest channels (2 x 512x1024)
                     ((2, 48, 128, 256), 'sequential', 'official'),
                     ((2, 384, 16, 32), 'sequential', 'official')],
                outlook=[((128, 28, 28, 192), 6)],    # VOLO-D1 stage 1 at 224 px, batch 128
                volo=[128],
                # VOLO-D1's MLP half-blocks at batch 128: the outlooker and transformer stages
                mlp=[(128, 28, 28, 192), (128, 14, 14, 384)]),
}
# the host preset on a GPU: the host-bound cost of a block (Python, dispatch, autograd, launches)
# against the conv block's, where the host drives the GPU (HRNet-OCR's step is host-bound)
PRESETS['host-gpu'] = dict(PRESETS['host'], device='cuda', threads=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--preset', choices=sorted(PRESETS),
                        help='the issue\'s shapes for this device kind (overrides the below)')
    parser.add_argument('--op', choices=['psa', 'outlook', 'volo', 'mlp', 'all'],
                        default='all')
    parser.add_argument('--shape', type=int_tuple(4, 'N,C,H,W or B,H,W,C'), nargs='+',
                        help='PSA: N,C,H,W (default 4,256,64,64); outlook, mlp: B,H,W,C '
                             '(default 8,28,28,192); several run in turn')
    parser.add_argument('--mode', choices=['parallel', 'sequential', 'both'], default='both')
    parser.add_argument('--variant', choices=['paper', 'official'], default='paper',
                        help="PSA: the paper's equations or the authors' release")
    parser.add_argument('--heads', type=int_at_least(1), default=6, help='outlook heads')
    parser.add_argument('--batch', type=int_at_least(1), default=8,
                        help='VOLO-D1 training-step batch')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='float32')
    parser.add_argument('--device', type=visible_device,
                        default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int_at_least(1), default=None, help='torch CPU threads')
    parser.add_argument('--iters', type=int_at_least(1), default=10)
    parser.add_argument('--warmup', type=int_at_least(0), default=3)
    parser.add_argument('--no-compile', action='store_true', help='skip torch.compile')
    parser.add_argument('--compile-eager-only', action='store_true',
                        help="torch.compile the eager reference only (the goals' baseline), "
                             "not mmattn's implementations too (the VOLO-D1 step: one compile "
                             'instead of two, about 75 s less on an H100)')
    parser.add_argument('--peak-gbs', type=float, default=None,
                        help='device peak bandwidth in GB/s (default: see the docstring)')
    parser.add_argument('--cudnn-benchmark', action='store_true',
                        help="torch.backends.cudnn.benchmark on (cuDNN picks each convolution's "
                             'algorithm by timing; off by default, as in the tables so far; '
                             'tools/benchmark_model.py always sets it)')
    parser.add_argument('--kernels', type=int_at_least(0), default=0, metavar='N',
                        help="also print, per case, the N operators and kernels with the most "
                             "self time over 3 of mmattn's forward + backward runs (torch.profiler;"
                             " device time on CUDA, host time on the CPU)")
    parser.add_argument('--host-split', type=int_at_least(0), default=0, metavar='N',
                        help="also print, per case and implementation, where a forward + "
                             "backward's host time goes: each phase's wall time and CPU time "
                             "(the calling thread's, every thread's), and on CUDA the N "
                             'costliest CUDA runtime/driver calls (torch.profiler): whether '
                             'the host works, waits on the device, or launches')
    parser.add_argument('--cuda-graph', action='store_true',
                        help='time each call as the replay of a CUDA graph captured once '
                             '(CUDA): the kernels without the host work of a call, which set '
                             "the pace of mmattn's ops at the gpu preset's shapes on the lent "
                             'H100 machines')
    parser.add_argument('--probe-compile', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.preset:
        preset = PRESETS[args.preset]
        args.device, args.dtype = preset['device'], preset['dtype']
        args.threads = args.threads or preset['threads']
        psa_cases, outlook_cases, volo_cases = preset['psa'], preset['outlook'], preset['volo']
        mlp_cases = preset['mlp']
        yardstick = preset.get('yardstick', False)
        args.no_compile = args.no_compile or args.preset.startswith('host')
    else:
        modes = ['parallel', 'sequential'] if args.mode == 'both' else [args.mode]
        psa_cases = [(shape, m, args.variant) for shape in args.shape or [(4, 256, 64, 64)]
                     for m in modes]
        outlook_cases = [(shape, args.heads) for shape in args.shape or [(8, 28, 28, 192)]]
        volo_cases = [args.batch]
        mlp_cases = list(args.shape or [(8, 28, 28, 192)])
        yardstick = False
    if args.shape and args.op == 'all' and not args.preset:
        parser.error('--shape needs --op psa (N,C,H,W), --op outlook or --op mlp (B,H,W,C)')
    problem = device_problem(args.device) if args.preset else None  # --device: by its type
    if problem:
        parser.error(f'--preset {args.preset}: {problem}')
    if args.cuda_graph and not args.device.startswith('cuda'):
        parser.error(f'--cuda-graph needs a CUDA device (--device cuda or a CUDA preset), got '
                     f'--device {args.device}')
    if args.op != 'all':
        psa_cases, outlook_cases, volo_cases, mlp_cases = [
            cases if args.op == op else []
            for op, cases in (('psa', psa_cases), ('outlook', outlook_cases),
                              ('volo', volo_cases), ('mlp', mlp_cases))]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    peak, peak_src = (float('nan'), '') if args.probe_compile else \
        peak_bandwidth(device, args.peak_gbs)

    common = ['--dtype', args.dtype, '--device', args.device,
              '--threads', str(torch.get_num_threads())]
    try:  # a block refuses a shape/heads combination with an error naming it
        cases = [(psa_case(shape, mode, dtype, device, variant),
                  ['--op', 'psa', '--shape', ','.join(map(str, shape)), '--mode', mode,
                   '--variant', variant])
                 for shape, mode, variant in psa_cases]
        cases += [(outlook_case(shape, heads, dtype, device),
                   ['--op', 'outlook', '--shape', ','.join(map(str, shape)), '--heads',
                    str(heads)])
                  for shape, heads in outlook_cases]
    except ValueError as err:
        parser.error(f'--shape/--heads: {err}')
    cases += [(volo_case(batch, dtype, device), ['--op', 'volo', '--batch', str(batch)])
              for batch in volo_cases]
    cases += [(mlp_case(shape, dtype, device),
               ['--op', 'mlp', '--shape', ','.join(map(str, shape))]) for shape in mlp_cases]
    if yardstick:   # one more implementation of each PSA case, in the same round-robin
        for case, _ in cases:
            if case.op == 'psa':
                case.impls[YARDSTICK] = conv_block(case.shape[1], dtype, device)
    if args.probe_compile:   # child process of probe_compile: one case, compile and run it
        case, _ = cases[0]
        x = case.make_input()
        compile_impl(case, 'eager', x, torch.randn_like(x))
        return
    print(f'device: {device_name(device)}')
    print(f'torch {torch.__version__}, dtype {args.dtype}, median of {args.iters} runs after '
          f'{args.warmup} warm-up runs, cudnn.benchmark {"on" if args.cudnn_benchmark else "off"}'
          + ('; each call a CUDA graph replay' if args.cuda_graph else ''))
    print(f'peak bandwidth: {peak:.0f} GB/s ({peak_src})')
    print(f'mmattn kernels: {kernel_status()}', flush=True)
    rows: list[list[str]] = []
    times = [(case, run_case(case, args, device, peak, rows, argv + common))
             for case, argv in cases]
    print()
    print(markdown_table(HEADER, rows))
    if yardstick:
        print('\nforward + backward against a 3x3 conv + BN + ReLU at the same shape, timed in '
              'the same round-robin:')
        for case, t in times:
            if case.op == 'psa' and YARDSTICK in t:
                base = t[YARDSTICK]
                for name, ms in t.items():
                    if name != YARDSTICK:
                        print(f'  PSA {case.detail}, {name}: {ms / base:.2f}x '
                              f'(the yardstick {base:.3f} ms)')


if __name__ == '__main__':
    main()
