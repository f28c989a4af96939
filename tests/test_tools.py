"""The tools end to end: the demo configs through tools/train.py and tools/test.py with the
real metrics, a two-process CPU run through tools/dist_train.sh (gloo), a killed run resumed
with --resume, and the missing-dataset message. The runs are marked slow (a few minutes in
all on 2 cores)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmattn.datasets import DEMO_ROOT, make_demo_data

REPO = Path(__file__).resolve().parents[1]
SEG_DEMO = 'configs/demo/psa_hrnet_ocr_cityscapes_demo.py'
POSE_DEMO = 'configs/demo/psa_udp_hrnet_w48_coco_demo.py'
# a short schedule for the seg demo: N iterations, evaluation and checkpoint at the end
SHORT = ['train_cfg.max_iters={n}', 'train_cfg.val_interval={n}',
         'default_hooks.checkpoint.interval={k}', 'param_scheduler.0.end={n}']


def short(n: int, k: int | None = None) -> list[str]:
    return [s.format(n=n, k=k or n) for s in SHORT]


@pytest.fixture(scope='module')
def demo_data() -> Path:
    make_demo_data(REPO / DEMO_ROOT)  # idempotent: a complete copy is left alone
    return REPO / DEMO_ROOT


def run(args: list[str], timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def ok(result: subprocess.CompletedProcess) -> str:
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_seg_demo_trains_evaluates_and_tests(demo_data: Path, tmp_path: Path) -> None:
    out = ok(run([sys.executable, 'tools/train.py', SEG_DEMO, '--work-dir', str(tmp_path),
                  '--cfg-options', *short(4)]))
    assert re.search(r'Iter\(val\).*mIoU: \d', out)
    ckpt = tmp_path / 'iter_4.pth'
    assert ckpt.is_file() and (tmp_path / 'last_checkpoint').read_text().strip() == str(ckpt)
    assert list(tmp_path.glob('*/*.log'))
    assert not list(tmp_path.glob('.*.tmp'))  # checkpoints are written atomically
    out = ok(run([sys.executable, 'tools/test.py', SEG_DEMO, str(ckpt),
                  '--work-dir', str(tmp_path / 'test')]))
    assert re.search(r'Iter\(test\).*mIoU: \d', out)


@pytest.mark.slow
def test_pose_demo_trains_with_coco_ap(demo_data: Path, tmp_path: Path) -> None:
    out = ok(run([sys.executable, 'tools/train.py', POSE_DEMO, '--work-dir', str(tmp_path),
                  '--cfg-options', 'train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
                  'default_hooks.checkpoint.interval=1']))
    assert re.search(r'coco/AP: \d', out)
    assert (tmp_path / 'epoch_1.pth').is_file()


def _gloo_threads() -> int:
    """How many of this process's threads are gloo's group workers (Linux)."""
    names = []
    for task in Path('/proc/self/task').iterdir():
        try:
            names.append((task / 'comm').read_text().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return names.count('pt_gloo_runloop')


@pytest.mark.skipif(not Path('/proc/self/task').is_dir(), reason='needs Linux /proc')
def test_release_process_group_ends_the_group(tmp_path: Path) -> None:
    """tools/train.py and tools/test.py end the process group after a run: its worker threads
    must be gone before the interpreter's exit (a gloo worker still alive there can abort the
    rank). A one-process gloo group, held - as mmengine's Runner holds it - by a DDP wrapper
    in a reference cycle that the caller no longer names; released, then released again with
    none left."""
    import torch
    import torch.distributed as dist

    from mmattn.engine import release_process_group
    before = _gloo_threads()
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0,
                            world_size=1)
    try:
        assert dist.is_initialized()
        deadline = time.time() + 10  # a worker names itself once it runs
        while _gloo_threads() == before and time.time() < deadline:
            time.sleep(0.01)
        assert _gloo_threads() > before

        class Holder:  # the Runner's shape: the model, and a reference cycle
            pass
        holder = Holder()
        holder.model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        holder.self = holder
        holder.model(torch.ones(1, 2)).sum().backward()
        del holder
        release_process_group()
        assert not dist.is_initialized()
        assert _gloo_threads() == before  # the group itself is gone, not only unregistered
        release_process_group()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_cpu_run_through_dist_train(demo_data: Path, tmp_path: Path) -> None:
    out = ok(run(['bash', 'tools/dist_train.sh', SEG_DEMO, '2', '--work-dir', str(tmp_path),
                  '--cfg-options', *short(2), 'env_cfg.dist_cfg.backend=gloo'],
                 env={'OMP_NUM_THREADS': '1', 'PORT': '29517'}))
    (log,) = tmp_path.glob('*/*.log')  # rank 0's log
    text = log.read_text()
    assert 'Distributed launcher: pytorch' in text and 'Distributed training: True' in text
    assert 'GPU number: 2' in text  # mmengine's name for the world size
    assert 'Saving checkpoint at 2 iterations' in text
    assert re.search(r'Iter\(val\) \[2/2\].*mIoU', text)  # the 4 val images split over 2 ranks
    assert (tmp_path / 'iter_2.pth').is_file()


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(demo_data: Path, tmp_path: Path) -> None:
    args = [sys.executable, 'tools/train.py', SEG_DEMO, '--work-dir', str(tmp_path),
            '--cfg-options', *short(6, 2)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 600
        last = tmp_path / 'last_checkpoint'  # written after the checkpoint it names
        while not (last.is_file() and last.read_text().strip().endswith('iter_2.pth')):
            assert proc.poll() is None, 'the run ended before its first checkpoint'
            assert time.time() < deadline, 'no checkpoint after 10 minutes'
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / 'iter_6.pth').exists()
    out = ok(run(args + ['--resume']))
    resumed = re.search(r'resumed epoch: \d+, iter: (\d+)', out)
    assert resumed and int(resumed.group(1)) in (2, 4), out[-3000:]
    assert not re.search(r'Iter\(train\) \[1/6\]', out)  # it did not start over
    assert (tmp_path / 'iter_6.pth').is_file()


def test_missing_demo_data_is_explained(tmp_path: Path) -> None:
    # run from an empty directory: the demo config's relative data root does not exist
    result = subprocess.run([sys.executable, str(REPO / 'tools/train.py'), str(REPO / SEG_DEMO),
                             '--work-dir', str(tmp_path / 'wd')], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert 'the CityscapesDataset data is missing' in result.stderr
    assert 'leftImg8bit/{train,val}/<city>/*_leftImg8bit.png' in result.stderr
    assert 'python tools/make_demo_data.py' in result.stderr
    assert 'Traceback' not in result.stderr


def test_missing_real_dataset_is_explained(tmp_path: Path) -> None:
    import torch
    ckpt = tmp_path / 'ckpt.pth'  # a checkpoint file (it is looked at before the data)
    torch.save({'state_dict': {}}, ckpt)
    result = subprocess.run(
        [sys.executable, 'tools/test.py', 'configs/psa_udp_hrnet_w48_coco_256x192.py',
         str(ckpt), '--work-dir', str(tmp_path / 'wd'),
         '--cfg-options', f'test_dataloader.dataset.data_root={tmp_path}/coco/'],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert 'the CocoDataset data is missing' in result.stderr
    assert 'person_keypoints_{train,val}2017.json' in result.stderr
    assert 'cocodataset.org' in result.stderr
    assert 'Traceback' not in result.stderr


def test_resume_target_survives_a_damaged_pointer(tmp_path: Path) -> None:
    from mmattn.engine.run_config import latest_checkpoint
    assert latest_checkpoint(str(tmp_path)) is None
    for n in (2, 10, 4):
        (tmp_path / f'iter_{n}.pth').write_bytes(b'x')
    (tmp_path / 'best_mIoU_iter_10.pth').write_bytes(b'x')
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_10.pth')
    # the pointer wins while it names an existing file
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_4.pth'))
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_4.pth')
    # killed while mmengine rewrote it in place: empty, or naming a file that is gone
    (tmp_path / 'last_checkpoint').write_text('')
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_10.pth')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_99.pth'))
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / 'iter_10.pth')
