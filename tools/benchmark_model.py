"""Benchmark whole training steps of HRNetV2-W48 + OCR: stock against each PSA form.

Builds the models from the real configs (no weights loaded; SyncBN reverted to BN so that one
process runs them):

* ``stock``: mmseg's ``ocrnet/ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py``, the config the
  PSA configs are based on;
* ``psa_p-official``: ``configs/psa_hrnet_ocr_cityscapes.py`` (104 ``PSA_p`` of the authors'
  release), ``psa_s-official``: ``configs/psa-s_hrnet_ocr_cityscapes.py`` (104 ``PSA_s``, the
  released weights' form);
* ``paper-parallel``, ``paper-sequential``: the same placement with ``variant='paper'``;

each PSA form once per backend it accepts (``--backends``, default ``auto`` and
``reference``; ``auto`` is what a config runs). A training step is what mmengine's
``BaseModel.train_step`` does: the data preprocessor, forward with the loss, backward and the
config's optimizer update (SGD), on random images with random labels of the 19 Cityscapes classes.
``--dtypes bfloat16`` runs the preprocessor and the forward under ``torch.autocast`` (as
mmengine's ``AmpOptimWrapper`` does; the backward runs outside it).

Printed per model and dtype: the median step time over ``--iters`` steps (the models take
turns step by step, so load from other processes hits them alike), its ratio to ``stock`` in
the same dtype, the peak memory above the model and its optimizer state (CUDA: the caching
allocator's peak), the host time per step (CPU time of the whole process, every thread, from
the start of the step until it returns, before waiting for the GPU: on CUDA what the step costs
the host, the backward's included, which PyTorch's autograd engine runs on a thread of its own
per GPU while the Python thread waits; on a CPU device the compute of every thread), and
(CUDA) the kernel launches per step, per PSA block beyond stock and the GPU's kernel time per
step (the sum of the kernels' durations: a step time well above it is host-bound), counted
with ``torch.profiler`` over one step. ``--profile N`` prints, from that same profiled step,
each PSA model's N kernels with the most device time.

``--cuda-graph`` (CUDA) captures each model's training step (forward with the loss, backward,
the optimizer update; the data preprocessor runs once, outside) in a CUDA graph and times its
replays: the step without per-operator host work, what a host-bound step would cost if the
host kept up (stock and PSA alike). mmseg's accuracy metric in the decode heads' losses indexes
with a boolean mask, a host-device synchronisation that a capture refuses, so it is replaced,
for this run, by the same value computed without one
(:func:`mmattn.engine.sync_free_seg_accuracy`). The peak-memory column is left out (the graphs'
memory is allocated at capture).

``--switches`` (CUDA) adds, for each PSA model on the CUDA kernels, a copy (same weights, an
optimizer of its own) per kernel default named, with that default switched off by its
environment variable around each of its steps (around the capture, with ``--cuda-graph``):
the kernels' changes against what they replaced, in the same turns (``all``: every default that
applies to the form and GPU; the list, shared with ``tools/benchmark.py``'s rows, is
``PSA_SWITCHES`` there). With ``--cuda-graph`` the models' graphs share one memory pool
(replayed in the order of their captures), so that many models fit.

This is a tool, not a test: nothing here asserts a speed. Examples::

    python tools/benchmark_model.py                       # CPU: 2 x 3x64x128, fp32
    python tools/benchmark_model.py --device cuda         # 2 x 3x512x1024, fp32 and bf16
    python tools/benchmark_model.py --forms stock,psa_s-official --backends auto --iters 20
    python tools/benchmark_model.py --device cuda --cuda-graph --dtypes float32
    python tools/benchmark_model.py --device cuda --cuda-graph --backends auto --switches all

It needs mmseg (and mmcv), not mmpose, mmdet or mmpretrain.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os.path as osp
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

import mmattn  # noqa: F401  (registers the blocks and PluginHRNet)
from mmattn.analysis import load_model
from mmattn.engine import sync_free_seg_accuracy
from mmattn.layers import PolarizedSelfAttention
from mmattn.ops import KernelUnavailableError, backends_for, kernel_status, select_backend
from mmattn.utils.cli import int_at_least, int_tuple, visible_device
from mmattn.utils.quiet import filter_tool_warnings, quiet_no_cuda_runtime

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from benchmark import (DTYPES, PSA_SWITCHES, KernelSwitch, device_name,  # noqa: E402
                       graph_replay, markdown_table, peak_cuda_bytes, profile_kernels, sync,
                       with_env)

quiet_no_cuda_runtime()
filter_tool_warnings()

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
STOCK_CONFIG = 'mmseg::ocrnet/ocrnet_hr48_4xb2-80k_cityscapes-512x1024.py'
PSA_P_CONFIG = osp.join(ROOT, 'configs', 'psa_hrnet_ocr_cityscapes.py')
PSA_S_CONFIG = osp.join(ROOT, 'configs', 'psa-s_hrnet_ocr_cityscapes.py')
#: form -> (config, PSA options replacing the config's, or None to keep the config's block)
FORMS: dict[str, tuple[str, Optional[dict]]] = {
    'stock': (STOCK_CONFIG, None),
    'psa_p-official': (PSA_P_CONFIG, None),
    'psa_s-official': (PSA_S_CONFIG, None),
    'paper-parallel': (PSA_P_CONFIG, dict(variant='paper', mode='parallel')),
    'paper-sequential': (PSA_P_CONFIG, dict(variant='paper', mode='sequential')),
}
NUM_CLASSES = 19
HEADER = ['model', 'backend', 'dtype', 'step ms', 'vs stock', 'peak MiB (CUDA)',
          'host ms / step', 'kernel ms / step (CUDA)', 'launches / step (CUDA)',
          'launches / PSA block (CUDA)']


@dataclass
class Model:
    """One built model with its optimizer, ready to step."""

    form: str
    backend: str
    model: nn.Module
    optim_wrapper: object
    blocks: int  # PSA blocks inside
    optim_cfg: object = None  # the config's optim_wrapper, to build a copy's
    switch: Optional[KernelSwitch] = None  # a kernel default switched off around each step

    @property
    def backend_label(self) -> str:
        if self.switch is None:
            return self.backend
        return f'{self.backend}; {self.switch.variable}={self.switch.value}'

    @property
    def label(self) -> str:
        return self.form if self.form == 'stock' else f'{self.form} ({self.backend_label})'

    @property
    def env(self) -> dict[str, str]:
        return {} if self.switch is None else self.switch.env

    def switched(self, switch: KernelSwitch) -> 'Model':
        """A copy of this model (same weights, an optimizer of its own) whose steps run with
        ``switch``'s variable set."""
        from mmengine.optim import build_optim_wrapper
        model = copy.deepcopy(self.model)
        return Model(self.form, self.backend, model, build_optim_wrapper(model, self.optim_cfg),
                     self.blocks, self.optim_cfg, switch)


def build(form: str, backend: str, shape: tuple[int, int, int], device: torch.device) -> Model:
    """The model of ``form`` from its config, with ``backend`` for its PSA blocks, its data
    preprocessor padding to ``shape``'s size (the configs' crop size, 512x1024, otherwise)."""
    from mmengine.config import Config
    from mmengine.hub import get_config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.optim import build_optim_wrapper

    config, override = FORMS[form]
    cfg = get_config(config) if '::' in config else Config.fromfile(config)
    options = {'model.data_preprocessor.size': shape[1:]}
    if form != 'stock':
        plugins = copy.deepcopy(cfg.model.backbone.plugins)
        for plugin in plugins:
            plugin['cfg'].update(override or {}, backend=backend)
        options['model.backbone.plugins'] = plugins
    loaded = load_model(config, cfg_options=options, device=device)
    model = revert_sync_batchnorm(loaded.model).to(device).train()
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    blocks = sum(isinstance(m, PolarizedSelfAttention) for m in model.modules())
    return Model(form, backend, model, optim_wrapper, blocks, cfg.optim_wrapper)


def make_batch(shape: tuple[int, int, int], device: torch.device, seed: int = 0) -> dict:
    """mmengine's data batch: uint8 images and SegDataSamples with random label maps."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    n, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(n):
        inputs.append(torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
                      .to(device))
        sample = SegDataSample(metainfo=dict(img_shape=(h, w), pad_shape=(h, w),
                                             ori_shape=(h, w)))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, NUM_CLASSES, (1, h, w), generator=gen).to(device))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def step_fn(entry: Model, batch: dict, dtype: torch.dtype, device: torch.device,
            host: list[float]) -> Callable[[], None]:
    """One training step; appends the host time (the process's CPU time, all threads, until it
    returns) to host."""
    model = entry.model

    def step() -> None:  # mmengine's BaseModel.train_step, with autocast around the forward
        t0 = time.process_time()
        entry.optim_wrapper.update_params(training_loss(model, batch, dtype, device))
        host.append(time.process_time() - t0)

    return step


def training_loss(model: nn.Module, data: dict, dtype: torch.dtype, device: torch.device,
                  preprocess: bool = True, cache: bool = True) -> torch.Tensor:
    """The model's loss on ``data`` (a data batch, run through the model's data preprocessor
    first unless ``preprocess`` is off), under autocast to ``dtype`` (none for float32;
    ``cache``: autocast's cache of cast weights) as mmengine's ``AmpOptimWrapper`` runs it."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32,
                        cache_enabled=cache):
        if preprocess:
            data = model.data_preprocessor(data, True)
        losses = model._run_forward(data, mode='loss')
    return model.parse_losses(losses)[0]


def graph_step_fn(entry: Model, batch: dict, dtype: torch.dtype, device: torch.device,
                  host: list[float], warmup: int, pool: Optional[tuple] = None
                  ) -> Callable[[], None]:
    """One training step as the replay of a CUDA graph (PyTorch's whole-network capture: warm-up
    steps on a side stream, the gradients set to None, then one captured step, in ``pool``
    if given: a memory pool the models' graphs share, replayed in the order of their
    captures); appends the host time of each replay to host. Needs mmseg's decode heads'
    accuracy without a synchronisation (:func:`mmattn.engine.sync_free_seg_accuracy`)."""
    model, optim = entry.model, entry.optim_wrapper
    data = model.data_preprocessor(batch, True)

    def step() -> None:
        # no autocast cache: a capture must not keep the casts of the eager steps
        optim.backward(training_loss(model, data, dtype, device, preprocess=False, cache=False))
        optim.step()

    graph_step = with_env(lambda: graph_replay(step, device, warmup, reset=optim.zero_grad,
                                               pool=pool), entry.env)()

    def replay() -> None:
        t0 = time.process_time()
        graph_step()
        host.append(time.process_time() - t0)

    return replay


def graph_steps(models: list[Model], batch: dict, dtype: torch.dtype, device: torch.device,
                host: dict[str, list[float]], warmup: int) -> dict[str, Callable[[], None]]:
    """Each model's training step captured in a CUDA graph (:func:`graph_step_fn`), by label,
    the graphs in one memory pool: they must replay in this order, one after another. A model
    whose step does not capture is said and left out, and the next captures take a fresh
    pool."""
    steps = {}
    pool = torch.cuda.graph_pool_handle()
    for m in models:
        try:
            steps[m.label] = graph_step_fn(m, batch, dtype, device, host[m.label], warmup, pool)
        except RuntimeError as exc:
            print(f'skipped: {m.label}, {str(dtype).split(".")[-1]}: its step did not capture '
                  f'in a CUDA graph: {str(exc).strip()[:2000]}', flush=True)
            pool = torch.cuda.graph_pool_handle()
    return steps


def switched_copies(entry: Model, switches: list[KernelSwitch],
                    device: torch.device) -> list[Model]:
    """A copy of ``entry`` per switch that applies to its blocks on the CUDA kernels (what
    does not apply is said, and left out)."""
    if not switches:
        return []
    block = next(m for m in entry.model.modules() if isinstance(m, PolarizedSelfAttention))
    probe = torch.empty(1, block.in_channels, 8, 8, device=device)
    selected = block.selected_backend(probe)[0]
    if selected != 'cuda':
        print(f'skipped: {entry.label} with its kernel defaults switched off: its blocks run '
              f'on {selected!r} here, not on the CUDA kernels')
        return []
    copies = []
    for switch in switches:
        if switch.applies(block.variant, block.mode, device):
            copies.append(entry.switched(switch))
        else:
            print(f'skipped: {entry.label} with {switch.variable}={switch.value}: its default '
                  'does not apply to this form or GPU')
    return copies


def fmt(value: Optional[float], spec: str) -> str:
    return '-' if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Forms: ' + ', '.join(FORMS) + '.')
    parser.add_argument('--device', type=visible_device,
                        default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--shape', type=int_tuple(3, 'batch,height,width'), default=None,
                        help='batch,height,width (default 2,512,1024 on CUDA, 2,64,128 on CPU)')
    parser.add_argument('--forms', default=','.join(FORMS),
                        help='comma-separated forms (stock is always run, as the baseline)')
    parser.add_argument('--backends', default='auto,reference',
                        help='comma-separated PSA backends (each form runs those it accepts)')
    parser.add_argument('--dtypes', default=None,
                        help='comma-separated: float32, bfloat16 (autocast); default both on '
                             'CUDA, float32 on CPU')
    parser.add_argument('--iters', type=int_at_least(1), default=None,
                        help='timed steps (10 CUDA, 5 CPU)')
    parser.add_argument('--warmup', type=int_at_least(0), default=3)
    parser.add_argument('--threads', type=int_at_least(1), default=None, help='torch CPU threads')
    parser.add_argument('--cuda-graph', action='store_true',
                        help='CUDA: time the replays of each training step captured in a CUDA '
                             'graph (see the description)')
    parser.add_argument('--profile', type=int_at_least(0), default=0, metavar='N',
                        help='CUDA: print each PSA model\'s N operators with the most device '
                             'time in the profiled step')
    parser.add_argument('--switches', default='', metavar='NAMES',
                        help='CUDA: comma-separated kernel defaults to time switched off too, '
                             'each a copy of every PSA model on the CUDA kernels where it '
                             'applies, its variable set around its steps: '
                             + ', '.join(f'{s.key} ({s.variable}={s.value})'
                                         for s in PSA_SWITCHES) + '; or all')
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    if args.cuda_graph and not cuda:
        parser.error(f'--cuda-graph needs --device cuda (a CUDA graph), got --device '
                     f'{args.device}')
    shape = args.shape or ((2, 512, 1024) if cuda else (2, 64, 128))
    forms = [f.strip() for f in args.forms.split(',') if f.strip()]
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        parser.error(f'--forms: unknown {unknown}; choose from {list(FORMS)}')
    forms = ['stock'] + [f for f in forms if f != 'stock']
    backends = [b.strip() for b in args.backends.split(',') if b.strip()]
    dtype_names = (args.dtypes or ('float32,bfloat16' if cuda else 'float32')).split(',')
    bad = [d for d in dtype_names if d not in ('float32', 'bfloat16')]
    if bad:
        parser.error(f'--dtypes: unknown {bad}; choose from float32, bfloat16')
    iters = args.iters or (10 if cuda else 5)
    switch_keys = [k.strip() for k in args.switches.split(',') if k.strip()]
    known = {s.key: s for s in PSA_SWITCHES}
    if switch_keys == ['all']:
        switch_keys = list(known)
    unknown = [k for k in switch_keys if k not in known]
    if unknown:
        parser.error(f'--switches: unknown {unknown}; choose from {list(known)} or all')
    switches = [known[k] for k in switch_keys]
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True
    patches = contextlib.ExitStack()  # undone after the table (a failed run ends the process)
    if args.cuda_graph:
        patches.enter_context(sync_free_seg_accuracy())

    started = time.perf_counter()
    models: list[Model] = []
    for form in forms:
        if form == 'stock':
            models.append(build(form, '-', shape, device))
            continue
        variant = (FORMS[form][1] or {}).get('variant', 'official')
        accepted = backends_for(f'psa_{variant}')
        for backend in backends:
            if backend not in accepted:
                print(f'skipped: {form} with backend={backend!r} (it accepts {accepted})')
                continue
            try:  # a compiled backend that cannot run here says why, as the block would
                select_backend(f'psa_{variant}', torch.empty(1, 2, 1, 1, device=device), backend)
            except KernelUnavailableError as exc:
                print(f'skipped: {form} with backend={backend!r}: {exc}')
                continue
            models.append(build(form, backend, shape, device))
            models += switched_copies(models[-1], switches, device)
    batch = make_batch(shape, device)

    print(f'device: {device_name(device)}')
    print(f'torch {torch.__version__}; batch {shape[0]} x 3x{shape[1]}x{shape[2]}; median of '
          f'{iters} training steps after {args.warmup} warm-up steps'
          + ('; each step a CUDA graph replay' if args.cuda_graph else ''))
    print(f'mmattn kernels: {kernel_status()}')
    print(f'built {len(models)} models in {time.perf_counter() - started:.0f} s', flush=True)
    rows = []
    for name in dtype_names:
        started = time.perf_counter()
        dtype = DTYPES[name]
        host = {m.label: [] for m in models}
        if args.cuda_graph:
            steps = graph_steps(models, batch, dtype, device, host, args.warmup)
        else:
            steps = {m.label: with_env(step_fn(m, batch, dtype, device, host[m.label]), m.env)
                     for m in models}
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        for times in host.values():
            times.clear()
        wall: dict[str, list[float]] = {label: [] for label in steps}
        for _ in range(iters):
            for label, step in steps.items():
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                wall[label].append(time.perf_counter() - t0)
        timed = time.perf_counter()
        median = {label: statistics.median(ts) * 1e3 for label, ts in wall.items()}
        host_ms = {label: statistics.median(ts) * 1e3 for label, ts in host.items()}
        kernels = {label: profile_kernels(step, device, 0 if label == 'stock' else args.profile)
                   for label, step in steps.items()}
        peaks = {label: None if args.cuda_graph else peak_cuda_bytes(step, device)
                 for label, step in steps.items()}
        peaks_mib = {label: None if b is None else b / 2 ** 20 for label, b in peaks.items()}
        print(f'{name}: {timed - started:.0f} s of steps, {time.perf_counter() - timed:.0f} s '
              f'of profiled and peak-memory steps', flush=True)
        base = median.get('stock')
        for m in models:
            label = m.label
            if label not in steps:
                continue
            k, per_block = kernels[label], None
            if k is not None and m.blocks and 'stock' in kernels:
                per_block = (k.launches - kernels['stock'].launches) / m.blocks
            rows.append([m.form, m.backend_label, name, f'{median[label]:.1f}',
                         fmt(base and median[label] / base, '.2f') + ('x' if base else ''),
                         fmt(peaks_mib[label], '.0f'),
                         f'{host_ms[label]:.1f}', fmt(k and k.ms, '.1f'),
                         fmt(k and k.launches, 'd'), fmt(per_block, '.1f')])
            print(' | '.join(rows[-1]), flush=True)
            if k is not None and k.table:
                print(f'{label}, {name}: top {args.profile} by device time\n{k.table}',
                      flush=True)
    print()
    print(markdown_table(HEADER, rows))
    patches.close()


if __name__ == '__main__':
    main()
