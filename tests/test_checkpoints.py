"""Checkpoints mmattn writes load with ``torch.load(..., weights_only=True)`` in a process that
never imported mmattn, and through the OpenMMLab entry points (mmseg/mmpose ``init_model``,
mmpretrain ``init_model``/``get_model``); resuming restores mmengine's message hub exactly,
from new checkpoints and from checkpoints written before the conversion; what an interrupted
atomic save left is removed, and nothing else."""
from __future__ import annotations

import collections
import fcntl
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from torch import nn

from mmattn.engine import (AtomicLocalBackend, WeightsOnlyCheckpointHook,
                           mmengine_checkpoint_globals, remove_interrupted_saves)
from mmattn.utils.checkpoint import (CONVERSIONS_KEY, restore_from_weights_only,
                                     to_weights_only, unsafe_objects)

REPO = Path(__file__).resolve().parents[1]

# run in a fresh interpreter: torch.load with weights_only=True and no allow-listed globals;
# prints what it found as JSON
PLAIN_LOAD = textwrap.dedent('''
    import json, sys, torch
    ckpt = torch.load(sys.argv[1], map_location='cpu', weights_only=True)
    print(json.dumps({'keys': sorted(ckpt), 'mmattn_imported': 'mmattn' in sys.modules,
                      'mmengine_imported': 'mmengine' in sys.modules}))
''')


def plain_load(path: Path) -> dict:
    result = subprocess.run([sys.executable, '-c', PLAIN_LOAD, str(path)], capture_output=True,
                            text=True, timeout=300, cwd='/')
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert not found['mmattn_imported'] and not found['mmengine_imported']
    return found


def history(values: list[float]) -> HistoryBuffer:
    buffer = HistoryBuffer()
    for i, value in enumerate(values):
        buffer.update(value, count=i + 1)
    return buffer


def mmengine_like_checkpoint() -> dict:
    """What mmengine 0.10.7's Runner.save_checkpoint puts besides tensors (HistoryBuffers,
    numpy arrays, scalars, dtypes), in the containers it uses."""
    return {
        'meta': {'epoch': 1, 'iter': 4, 'seed': 0,
                 'dataset_meta': {'classes': ('a', 'b'),
                                  'sigmas': np.array([0.026, 0.025], dtype=np.float32),
                                  'colors': np.array([[255, 0, 0], [0, 255, 0]], dtype=np.uint8),
                                  'names': np.array(['nose', 'eye']),
                                  'pairs': [(np.int64(1), np.int64(2))]}},
        'state_dict': collections.OrderedDict(w=torch.randn(3, 2)),
        'message_hub': {
            'log_scalars': collections.OrderedDict(
                [('train/loss', history([0.5, 0.25, 0.125])), ('train/lr', history([1e-3]))]),
            'runtime_info': collections.OrderedDict(
                [('iter', 4), ('eta', np.float64(12.5)), ('best_score', np.float32(0.75)),
                 ('dtype', np.dtype('float16'))]),
            'resumed_keys': collections.OrderedDict([('train/loss', True), ('eta', True)])},
    }


def assert_same(restored: object, original: object, where: str = 'checkpoint') -> None:
    """Equal types, dtypes and values, recursively."""
    assert type(restored) is type(original), (where, type(restored), type(original))
    if isinstance(original, dict):
        assert list(restored) == list(original), where
        for key in original:
            assert_same(restored[key], original[key], f'{where}[{key!r}]')
    elif isinstance(original, (list, tuple)):
        assert len(restored) == len(original), where
        for i, (a, b) in enumerate(zip(restored, original)):
            assert_same(a, b, f'{where}[{i}]')
    elif isinstance(original, HistoryBuffer):
        for a, b in zip(restored.data, original.data):
            assert_same(a, b, f'{where}.data')
        assert restored.max_length == original.max_length
    elif isinstance(original, np.ndarray):
        assert restored.dtype == original.dtype, where
        np.testing.assert_array_equal(restored, original)
    elif isinstance(original, torch.Tensor):
        torch.testing.assert_close(restored, original, rtol=0, atol=0)
    else:
        assert restored == original, where
        if isinstance(original, np.generic):
            assert restored.dtype == original.dtype, where


def test_mmengine_objects_become_weights_only_and_come_back(tmp_path: Path) -> None:
    original = mmengine_like_checkpoint()
    assert unsafe_objects(original)  # what torch's weights-only loader refuses today
    shared_meta = original['meta']['dataset_meta']
    checkpoint = dict(original)
    assert to_weights_only(checkpoint) == []
    assert unsafe_objects(checkpoint) == []
    assert original['meta']['dataset_meta'] is shared_meta  # converted copies, not in place
    assert isinstance(shared_meta['sigmas'], np.ndarray)
    torch.save(checkpoint, tmp_path / 'ckpt.pth')

    found = plain_load(tmp_path / 'ckpt.pth')
    assert found['keys'] == sorted([*original, CONVERSIONS_KEY])

    loaded = torch.load(tmp_path / 'ckpt.pth', weights_only=True)
    assert isinstance(loaded['message_hub']['log_scalars']['train/loss']['log_history'],
                      torch.Tensor)
    assert_same(restore_from_weights_only(loaded), original)
    assert CONVERSIONS_KEY not in loaded


def test_checkpoint_without_record_is_left_alone() -> None:
    checkpoint = {'state_dict': {'w': torch.ones(1)}, 'meta': {'iter': 3}}
    assert restore_from_weights_only(checkpoint) == {'state_dict': {'w': torch.ones(1)},
                                                     'meta': {'iter': 3}}


def test_other_objects_are_reported_not_converted() -> None:
    class Custom:
        pass

    checkpoint = {'meta': {'thing': Custom(), 'ok': np.float64(1.0)}}
    left = to_weights_only(checkpoint)
    assert left == [("checkpoint['meta']['thing']", f'{__name__}.{Custom.__qualname__}')]
    assert isinstance(checkpoint['meta']['thing'], Custom)
    assert type(checkpoint['meta']['ok']) is float


# ---------------------------------------------------------------------------------------
# a real mmengine Runner (tiny model and data): save, load without mmattn, resume

class ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs: list, data_samples: list | None = None, mode: str = 'tensor'):
        x = torch.stack(inputs)
        out = self.linear(x)
        if mode == 'loss':
            return {'loss': ((out - torch.stack(data_samples)) ** 2).mean()}
        return out


class ToyDataset(torch.utils.data.Dataset):
    # numpy in the metainfo, as mmpose datasets have: saved in checkpoint['meta']
    metainfo = {'classes': ('a', ), 'sigmas': np.array([0.1, 0.2], dtype=np.float32)}

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        return {'inputs': torch.full((2, ), float(i)), 'data_samples': torch.ones(1) * i}


def toy_runner(work_dir: Path, max_iters: int, hook: bool, **kwargs):
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Model(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            self.toy = ToyModel()

        def forward(self, inputs, data_samples=None, mode='tensor'):
            return self.toy(inputs, data_samples, mode)

    return Runner(
        model=Model(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=ToyDataset(), batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False)),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        param_scheduler=dict(type='LinearLR', start_factor=0.5, by_epoch=False, end=4),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2,
                                           backend_args=dict(backend='atomic_local')),
                           logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=[dict(type='mmattn.WeightsOnlyCheckpointHook')] if hook else None,
        experiment_name=f'toy_{work_dir.name}_{time.time_ns()}', **kwargs)


def test_runner_checkpoint_loads_without_mmattn_and_resumes(tmp_path: Path) -> None:
    runner = toy_runner(tmp_path / 'new', max_iters=2, hook=True)
    assert any(isinstance(h, WeightsOnlyCheckpointHook) for h in runner.hooks)
    runner.train()
    saved_loss = runner.message_hub.get_scalar('train/loss').data
    ckpt = tmp_path / 'new' / 'iter_2.pth'
    plain_load(ckpt)

    resumed = toy_runner(tmp_path / 'new', max_iters=4, hook=True, resume=True,
                         load_from=str(ckpt))
    resumed.load_or_resume()
    assert resumed.iter == 2
    buffer = resumed.message_hub.get_scalar('train/loss')
    assert isinstance(buffer, HistoryBuffer)
    for got, want in zip(buffer.data, saved_loss):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    log = '\n'.join(open(p).read() for p in (tmp_path / 'new').glob('*/*.log'))
    assert 'dataset metainfo from the resumed checkpoint is different' not in log

    # a runner without the hook (mmseg's own tools) resumes too, without the loss history
    plain = toy_runner(tmp_path / 'new', max_iters=4, hook=False, resume=True,
                       load_from=str(ckpt))
    plain.load_or_resume()
    assert plain.iter == 2


def test_checkpoint_written_without_the_hook_still_resumes(tmp_path: Path) -> None:
    runner = toy_runner(tmp_path / 'old', max_iters=2, hook=False)
    runner.train()
    saved_loss = runner.message_hub.get_scalar('train/loss').data
    ckpt = tmp_path / 'old' / 'iter_2.pth'
    with pytest.raises(Exception, match='Weights only load failed'):  # mmengine's format
        torch.load(ckpt, weights_only=True)

    resumed = toy_runner(tmp_path / 'old', max_iters=4, hook=True, resume=True,
                         load_from=str(ckpt))
    with mmengine_checkpoint_globals():  # what tools/train.py does around the run
        resumed.load_or_resume()
    assert resumed.iter == 2
    np.testing.assert_array_equal(resumed.message_hub.get_scalar('train/loss').data[0],
                                  saved_loss[0])


# ---------------------------------------------------------------------------------------
# what an interrupted atomic save leaves behind

KILLED_SAVE = textwrap.dedent('''
    import os, signal, sys
    from mmattn.engine import AtomicLocalBackend
    mode = sys.argv[2]
    def replace(src, dst):  # the moment between the written temporary file and the rename
        if mode == 'kill':
            os.kill(os.getpid(), signal.SIGKILL)
        print('writing', flush=True)
        sys.stdin.read()  # "still saving" until the test closes stdin or kills us
    os.replace = replace
    AtomicLocalBackend().put(b'x' * 100000, sys.argv[1])
''')


def test_interrupted_save_is_cleaned_up_and_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / 'epoch_3.pth'
    result = subprocess.run([sys.executable, '-c', KILLED_SAVE, str(target), 'kill'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    (left, ) = tmp_path.glob('.epoch_3.pth.*.tmp')  # the real writer's leftover
    assert left.stat().st_size == 100000 and not target.exists()

    keep = ['iter_2.pth', 'last_checkpoint', '.epoch_3.pth.tmp', 'notes.abcd1234.tmp',
            '.iter_2.pth.abc.tmp', '.iter_2.pth.abcd1234.tmpx', '.hidden']
    for name in keep:
        (tmp_path / name).write_bytes(b'keep')
    (tmp_path / '.iter_9.pth.abcd1234.tmp').mkdir()  # a directory, whatever its name
    nested = tmp_path / 'sub' / '.iter_1.pth.abcd1234.tmp'
    nested.parent.mkdir()
    nested.write_bytes(b'keep')

    assert remove_interrupted_saves(tmp_path) == [str(left)]
    assert not left.exists()
    for name in keep:
        assert (tmp_path / name).read_bytes() == b'keep'
    assert (tmp_path / '.iter_9.pth.abcd1234.tmp').is_dir() and nested.exists()
    assert remove_interrupted_saves(tmp_path / 'missing') == []


def test_a_save_in_progress_is_not_removed(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, '-c', KILLED_SAVE, str(tmp_path / 'iter_4.pth'),
                             'wait'], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == 'writing'
        (tmp, ) = tmp_path.glob('.iter_4.pth.*.tmp')
        assert remove_interrupted_saves(tmp_path) == []  # its writer holds the lock
        assert tmp.exists()
    finally:
        proc.kill()
        proc.wait()
    assert remove_interrupted_saves(tmp_path) == [str(tmp)]  # the writer died


def test_atomic_writes_leave_no_temporary_file(tmp_path: Path) -> None:
    AtomicLocalBackend().put(b'abc', tmp_path / 'iter_1.pth')
    assert [p.name for p in tmp_path.iterdir()] == ['iter_1.pth']
    # the lock is released: another process could take it
    fd = os.open(tmp_path / 'iter_1.pth', os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# the demo configs through tools/train.py, loaded by the OpenMMLab entry points

def train(config: str, work_dir: Path, *options: str, extra: tuple = ()) -> str:
    result = subprocess.run(
        [sys.executable, 'tools/train.py', config, '--work-dir', str(work_dir), *extra,
         '--cfg-options', *options], cwd=REPO, capture_output=True, text=True, timeout=1200)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    return out


ENTRY_POINT = textwrap.dedent('''
    import sys, torch
    config, ckpt, api = sys.argv[1:]
    torch.load(ckpt, map_location='cpu', weights_only=True)
    if api == 'mmseg':
        from mmseg.apis import init_model
        models = [init_model(config, ckpt, device='cpu')]
    elif api == 'mmpose':
        from mmpose.apis import init_model
        models = [init_model(config, ckpt, device='cpu')]
    else:
        from mmpretrain.apis import get_model, init_model
        models = [init_model(config, ckpt, device='cpu'),
                  get_model(config, pretrained=ckpt, device='cpu')]
    state = torch.load(ckpt, map_location='cpu', weights_only=True)['state_dict']
    for model in models:
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key
    print('loaded', len(models))
''')


def load_with_entry_point(config: str, ckpt: Path, api: str) -> None:
    result = subprocess.run([sys.executable, '-c', ENTRY_POINT, config, str(ckpt), api],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert 'loaded' in result.stdout


@pytest.fixture(scope='module')
def demo_data() -> Path:
    from mmattn.datasets import DEMO_ROOT, make_demo_data
    make_demo_data(REPO / DEMO_ROOT)
    return REPO / DEMO_ROOT


@pytest.mark.slow
def test_volo_demo_checkpoint_everywhere_and_resume(demo_data: Path, tmp_path: Path) -> None:
    config = 'configs/demo/volo_d1_demo.py'
    short = ['train_cfg.max_iters={n}', 'train_cfg.val_interval={n}',
             'default_hooks.checkpoint.interval=2', 'param_scheduler.0.end={n}']
    out = train(config, tmp_path, *[s.format(n=2) for s in short], extra=('--resume', ))
    assert re.search(r'--resume: no checkpoint in \S+ to resume from; starting from scratch',
                     out)
    assert 'pkg_resources is deprecated' not in out and '"FileClient" will be' not in out
    ckpt = tmp_path / 'iter_2.pth'
    plain_load(ckpt)
    load_with_entry_point(config, ckpt, 'mmpretrain')
    from mmattn.analysis import load_model  # tools/visualize_attention.py --checkpoint
    loaded = load_model(config, checkpoint=str(ckpt))
    state = torch.load(ckpt, weights_only=True)['state_dict']
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())

    # a save killed by SIGKILL left its temporary file; the next run removes it, only it
    stale = tmp_path / '.iter_4.pth.k1ll3d_x.tmp'
    stale.write_bytes(b'half a checkpoint')
    other = tmp_path / 'notes.tmp'
    other.write_text('mine')
    out = train(config, tmp_path, *[s.format(n=4) for s in short], extra=('--resume', ))
    assert f'removed {stale}, left by a checkpoint save that was interrupted' in out
    assert not stale.exists() and other.read_text() == 'mine'
    assert re.search(r'resumed epoch: \d+, iter: 2', out)
    assert (tmp_path / 'iter_4.pth').is_file()
    plain_load(tmp_path / 'iter_4.pth')


@pytest.mark.slow
@pytest.mark.parametrize('config, overrides, checkpoint, library', [
    ('configs/demo/psa_hrnet_ocr_cityscapes_demo.py',
     ('train_cfg.max_iters=1', 'train_cfg.val_interval=2',
      'default_hooks.checkpoint.interval=1', 'param_scheduler.0.end=1'), 'iter_1.pth', 'mmseg'),
    # one iteration: the first 4 training samples, no validation
    ('configs/demo/psa_udp_hrnet_w48_coco_demo.py',
     ('train_cfg.max_epochs=1', 'train_cfg.val_interval=2',
      'default_hooks.checkpoint.interval=1', 'train_dataloader.dataset.indices=4'),
     'epoch_1.pth', 'mmpose'),
], ids=['seg-mmseg', 'pose-mmpose'])
def test_demo_checkpoint_loads_with_init_model(demo_data: Path, tmp_path: Path, config: str,
                                               overrides: tuple[str, ...], checkpoint: str,
                                               library: str) -> None:
    train(config, tmp_path, *overrides)
    plain_load(tmp_path / checkpoint)
    load_with_entry_point(config, tmp_path / checkpoint, library)
