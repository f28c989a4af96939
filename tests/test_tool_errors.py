"""Bad input to the tools ends in one message that names the input and the fix, before anything
is built: misspelled plugin types, files that are not (complete) checkpoints, ``--resume``
targets, ``--amp`` without a GPU, and the ``tools/test.py`` output flags that do not apply to
a config's library."""
from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS as ROOT_MODELS

from mmattn.engine.run_config import (LAUNCHER_ENVIRONMENT, RunConfigError, check_amp,
                                      check_launcher_environment, check_work_dir,
                                      resolve_resume)
from mmattn.registry import MODELS
from mmattn.utils.checkpoint import CheckpointFileError, check_checkpoint_file
from mmattn.utils.cli import int_at_least, int_tuple, number_between, visible_device
from mmattn.utils.device import check_device, device_problem
from mmattn.utils.registry_names import UnknownTypeError, check_plugin_types, check_type_name

REPO = Path(__file__).resolve().parents[1]
SEG_DEMO = 'configs/demo/psa_hrnet_ocr_cityscapes_demo.py'
POSE_DEMO = 'configs/demo/psa_udp_hrnet_w48_coco_demo.py'
CLS_DEMO = 'configs/demo/volo_d1_demo.py'


def load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f'_mmattn_tool_{name}',
                                                  REPO / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------
# registered names

def test_misspelled_block_names_the_typo_and_the_right_name() -> None:
    with pytest.raises(UnknownTypeError) as info:
        check_type_name('PolarizedSelfAtention', MODELS, 'model.backbone.plugins[0].cfg.type')
    message = str(info.value)
    assert "model.backbone.plugins[0].cfg.type='PolarizedSelfAtention'" in message
    assert 'PolarizedSelfAttention' in message.split('closest registered names:')[1]
    assert not message.startswith("'")  # not KeyError's quoted repr
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


def test_names_are_checked_in_the_config_scope() -> None:
    from mmattn.layers import PolarizedSelfAttention
    with ROOT_MODELS.switch_scope_and_registry('mmseg') as registry:
        assert check_type_name('mmattn.PolarizedSelfAttention', registry, 'x') is \
            PolarizedSelfAttention
        with pytest.raises(UnknownTypeError, match="closest registered names: 'ContextBlock'"):
            check_type_name('ContextBlok', registry, 'x')
        # an mmattn block without its scope: the scoped name is suggested
        with pytest.raises(UnknownTypeError, match="'mmattn.PolarizedSelfAttention'"):
            check_type_name('PolarizedSelfAttention', registry, 'x')
        with pytest.raises(UnknownTypeError, match='no registered name is close'):
            check_type_name('Zzzzqqqq', registry, 'x')
    assert check_type_name(PolarizedSelfAttention, MODELS, 'x') is PolarizedSelfAttention
    with pytest.raises(UnknownTypeError, match=r'x must be a registered type name .* got 3'):
        check_type_name(3, MODELS, 'x')


def test_plugin_entries_are_found_anywhere_in_the_model() -> None:
    model = dict(type='CascadeEncoderDecoder', backbone=dict(
        type='mmattn.PluginHRNet',
        plugins=[dict(cfg=dict(type='mmattn.PolarizedSelfAttention'), position='after_conv1'),
                 dict(cfg=dict(type='mmattn.SqueezeExcitaton'), position='after_conv2')]))
    with ROOT_MODELS.switch_scope_and_registry('mmseg') as registry:
        with pytest.raises(UnknownTypeError) as info:
            check_plugin_types(model, registry)
    assert "model.backbone.plugins[1].cfg.type='mmattn.SqueezeExcitaton'" in str(info.value)
    assert "'mmattn.SqueezeExcitation'" in str(info.value)


# ---------------------------------------------------------------------------------------
# checkpoint files and --resume

@pytest.fixture()
def real_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / 'iter_8.pth'
    torch.save({'state_dict': {'w': torch.randn(64, 64)}, 'meta': {'iter': 8}}, path)
    return path


def test_checkpoint_file_problems(tmp_path: Path, real_checkpoint: Path) -> None:
    check_checkpoint_file(str(real_checkpoint))  # a complete one passes
    legacy = tmp_path / 'legacy.pth'
    torch.save({'w': torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    check_checkpoint_file(str(legacy))

    truncated = tmp_path / 'truncated.pth'
    data = real_checkpoint.read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    text = tmp_path / 'notes.pth'
    text.write_text('hello')
    archive = tmp_path / 'archive.pth'
    with zipfile.ZipFile(archive, 'w') as z:
        z.writestr('readme.txt', 'x')
    cases = {tmp_path / 'missing.pth': 'does not exist', tmp_path: 'is a directory',
             empty: 'is empty', truncated: 'is truncated', text: 'is not a PyTorch checkpoint',
             archive: 'is a zip archive but not a PyTorch checkpoint (no data.pkl inside)'}
    for path, what in cases.items():
        with pytest.raises(CheckpointFileError) as info:
            check_checkpoint_file(str(path), '--resume')
        message = str(info.value)
        assert message.startswith(f'--resume {str(path)!r} {what}'), message
        assert '; ' in message  # followed by what to do


def test_resume_targets(tmp_path: Path, real_checkpoint: Path) -> None:
    assert resolve_resume(None, str(tmp_path)) == (None, None)
    empty = tmp_path / 'empty_work_dir'
    checkpoint, note = resolve_resume('auto', str(empty))
    assert checkpoint is None and note == (f'--resume: no checkpoint in {empty} to resume '
                                           'from; starting from scratch')
    assert resolve_resume('auto', str(tmp_path))[0] == str(real_checkpoint)
    assert resolve_resume(str(real_checkpoint), str(empty))[0] == str(real_checkpoint)
    with pytest.raises(CheckpointFileError, match='does not exist'):
        resolve_resume(str(tmp_path / 'iter_99.pth'), str(tmp_path))
    (tmp_path / 'iter_9.pth').write_bytes(b'PK\x03\x04 cut short')  # the latest one is broken
    with pytest.raises(CheckpointFileError, match='latest checkpoint of the work dir'):
        resolve_resume('auto', str(tmp_path))
    assert resolve_resume('https://host/iter_1.pth', str(tmp_path))[0] == \
        'https://host/iter_1.pth'


def test_load_model_checks_the_checkpoint_before_building(tmp_path: Path) -> None:
    from mmattn.analysis import load_model
    bad = tmp_path / 'iter_40.pth'
    bad.write_bytes(b'PK\x03\x04' + b'\0' * 100)
    with pytest.raises(CheckpointFileError, match=r"checkpoint '.*iter_40.pth' is truncated"):
        load_model('timm:no_such_model_either', checkpoint=str(bad))


# ---------------------------------------------------------------------------------------
# --amp

def test_amp_without_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import mmengine.device as device
    for name in ('is_cuda_available', 'is_npu_available', 'is_mlu_available',
                 'is_musa_available'):
        monkeypatch.setattr(device, name, lambda: False)
    cfg = Config(dict(optim_wrapper=dict(type='OptimWrapper')))
    check_amp(cfg, amp_flag=False)
    with pytest.raises(RunConfigError, match='--amp needs a GPU'):
        check_amp(cfg, amp_flag=True)
    with pytest.raises(RunConfigError, match='optim_wrapper.type=OptimWrapper'):
        check_amp(Config(dict(optim_wrapper=dict(type='AmpOptimWrapper'))), amp_flag=False)
    monkeypatch.setattr(device, 'is_cuda_available', lambda: True)
    check_amp(cfg, amp_flag=True)


def test_train_tool_stops_before_building(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture,
                                          tmp_path: Path) -> None:
    train = load_tool('train')
    work_dir = tmp_path / 'wd'
    cases = {('--resume', str(tmp_path / 'gone.pth')): "--resume '",
             ('--cfg-options', 'model.backbone.plugins.0.cfg.type=mmattn.PSA'):
                 'model.backbone.plugins[0].cfg.type'}
    if not torch.cuda.is_available():
        cases[('--amp', )] = '--amp needs a GPU'
    for launcher, (names, _) in LAUNCHER_ENVIRONMENT.items():   # started by hand
        for name in names:
            monkeypatch.delenv(name, raising=False)
        cases[('--launcher', launcher)] = (f'--launcher {launcher} runs in processes that '
                                           f'{LAUNCHER_ENVIRONMENT[launcher][1]} starts')
    for extra, expected in cases.items():
        monkeypatch.setattr(sys, 'argv', ['tools/train.py', str(REPO / SEG_DEMO),
                                          '--work-dir', str(work_dir), *extra])
        assert train.main() == 2
        err = capsys.readouterr().err
        assert err.startswith('tools/train.py: ') and expected in err, err
        assert not work_dir.exists()  # nothing was built


def test_launcher_environment_and_work_dir(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    """mmengine's init_dist failed with a bare KeyError ('SLURM_PROCID',
    'OMPI_COMM_WORLD_LOCAL_RANK') or torch's env:// error, and a work dir that is a file with
    FileExistsError once the model was built; each missing variable is named, and the
    variables torchrun/srun/mpirun set let the check pass."""
    for launcher, (names, _) in LAUNCHER_ENVIRONMENT.items():
        for name in names:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(names[0], '0')
        with pytest.raises(RunConfigError) as info:
            check_launcher_environment(launcher)
        assert f'this process lacks {", ".join(names[1:])}: start it that way' in \
            str(info.value)
        for name in names:
            monkeypatch.setenv(name, '0')
        check_launcher_environment(launcher)
    check_launcher_environment('none')
    afile = tmp_path / 'afile'
    afile.write_text('')
    for flag, where in ((True, '--work-dir'), (False, "the config's work_dir")):
        with pytest.raises(RunConfigError, match=re.escape(f"{where} '{afile}' is a file, "
                                                           'not a directory')):
            check_work_dir(Config(dict(work_dir=str(afile))), flag)
    check_work_dir(Config(dict(work_dir=str(tmp_path / 'new'))), True)


@pytest.mark.parametrize('argv, message', [
    (['tools/analysis/get_flops.py', 'no_such_model'],
     "tools/analysis/get_flops.py: load_model: spec must be an existing config file (*.py) or "
     "a timm model name, got 'no_such_model'"),
    (['tools/analysis/get_flops.py', 'timm:volo_d1', '--shape', '8', '8'],
     'tools/analysis/get_flops.py: VOLO: expected images of at least 15 x 15 pixels'),
    (['tools/analysis/block_costs.py', '--channels', '7', '--blocks', 'PolarizedSelfAttention'],
     'tools/analysis/block_costs.py: PolarizedSelfAttention: in_channels must be even'),
])
def test_analysis_tools_name_bad_input_in_one_line(argv: list[str], message: str,
                                                   tmp_path: Path) -> None:
    """Through mmattn.utils.cli.run_tool: exit status 2 and one line, where a traceback ended
    in the same message; no --json file is written."""
    out = tmp_path / 'costs.json'
    result = subprocess.run([sys.executable, *argv, '--json', str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_write_atomic_leaves_the_old_file_or_the_new_one(tmp_path: Path) -> None:
    """A write that fails halfway leaves what was there and no temporary file; one that
    succeeds replaces it whole, with open()'s mode."""
    from mmattn.utils.file_mode import default_mode, write_atomic
    target = tmp_path / 'sub' / 'result.json'
    assert write_atomic(str(target), lambda tmp: Path(tmp).write_text('{"old": 1}')) == \
        str(target)

    def half(tmp: str) -> None:
        Path(tmp).write_text('{"new": ')
        raise OSError('disk full')
    with pytest.raises(OSError, match='disk full'):
        write_atomic(str(target), half)
    assert target.read_text() == '{"old": 1}'
    assert [p.name for p in target.parent.iterdir()] == ['result.json']
    write_atomic(str(target), lambda tmp: Path(tmp).write_text('{"new": 2}'))
    assert target.read_text() == '{"new": 2}'
    assert target.stat().st_mode & 0o777 == default_mode()


def test_test_tool_names_a_broken_checkpoint(tmp_path: Path, real_checkpoint: Path) -> None:
    data = real_checkpoint.read_bytes()
    cut = tmp_path / 'iter_40.pth'
    cut.write_bytes(data[:1000])
    result = subprocess.run([sys.executable, 'tools/test.py', SEG_DEMO, str(cut)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert f"CHECKPOINT '{cut}' is truncated" in result.stderr
    assert 'Traceback' not in result.stderr


# ---------------------------------------------------------------------------------------
# tools/test.py --show-dir / --out / --dump

@pytest.fixture(scope='module')
def test_tool() -> ModuleType:
    return load_tool('test')


@pytest.fixture(scope='module')
def configs() -> dict[str, Config]:
    import mmattn  # noqa: F401  (the mmattn:: scope)
    return {name: Config.fromfile(str(REPO / path))
            for name, path in (('seg', SEG_DEMO), ('pose', POSE_DEMO), ('cls', CLS_DEMO))}


def output_args(test_tool: ModuleType, *argv: str) -> argparse.Namespace:
    return test_tool.parse_args(['CONFIG', 'CKPT', *argv])


def test_output_flags_follow_each_library(test_tool: ModuleType, configs: dict,
                                          tmp_path: Path) -> None:
    seg = configs['seg'].copy()
    test_tool.apply_output_args(seg, output_args(test_tool, '--show-dir', 'vis', '--out', 'p'))
    assert seg.test_evaluator['output_dir'] == 'p'  # mmseg: IoUMetric writes the PNGs
    assert seg.default_hooks.visualization.draw is True and seg.visualizer.save_dir == 'vis'

    pose = configs['pose'].copy()
    test_tool.apply_output_args(pose, output_args(test_tool, '--show-dir', 'vis', '--dump',
                                                  'p.pkl', '--interval', '3'))
    assert pose.test_evaluator[-1] == dict(type='DumpResults', out_file_path='p.pkl')
    hook = pose.default_hooks.visualization
    assert hook.enable is True and hook.interval == 3 and hook.out_dir == str(Path('vis')
                                                                             .absolute())

    cls = configs['cls'].copy()
    test_tool.apply_output_args(cls, output_args(test_tool, '--out', 'p.pkl', '--show-dir', 'v'))
    assert cls.default_hooks.visualization.enable is True


@pytest.mark.parametrize('name, argv, message', [
    ('seg', ['--dump', 'p.pkl'], '--dump does not apply to this config'),
    ('cls', ['--dump', 'p.pkl'], 'use --out FILE.pkl'),
    ('pose', ['--dump', 'p.json'], '--dump must name a .pkl file'),
    ('pose', ['--out', 'm.txt'], 'must name a .json, .yaml or .pkl file'),
    ('pose', ['--out', 'm.json', '--out-item', 'pred'], '--out-item does not apply'),
    ('cls', ['--out', 'p.json'], '--out must name a .pkl file'),
    ('cls', ['--out-item', 'metrics'], '--out-item needs --out'),
    ('seg', ['--show-dir', 'v', '--interval', '0'], '--interval must be >= 1'),
])
def test_output_flags_that_do_not_apply(test_tool: ModuleType, configs: dict, name: str,
                                        argv: list[str], message: str) -> None:
    with pytest.raises(RunConfigError, match=message):
        test_tool.apply_output_args(configs[name].copy(), output_args(test_tool, *argv))


def test_output_flags_need_a_known_library(test_tool: ModuleType, configs: dict) -> None:
    cfg = configs['seg'].copy()
    cfg.default_scope = 'mmdet'
    with pytest.raises(RunConfigError, match="default_scope='mmdet'"):
        test_tool.apply_output_args(cfg, output_args(test_tool, '--show-dir', 'v'))
    cfg = configs['cls'].copy()
    cfg.default_hooks.pop('visualization')
    with pytest.raises(RunConfigError, match="type='VisualizationHook'"):
        test_tool.apply_output_args(cfg, output_args(test_tool, '--show-dir', 'v'))


# ---------------------------------------------------------------------------------------
# numbers and shapes on the command line (mmattn.utils.cli)

@pytest.mark.parametrize('parse, text, message', [
    (int_at_least(1), '0', "must be an integer >= 1, got '0'"),
    (int_at_least(0), '-1', "must be an integer >= 0, got '-1'"),
    (int_at_least(1), '2.5', "must be an integer >= 1, got '2.5'"),
    (number_between(0, 1), '1.5', "must be a number in [0, 1], got '1.5'"),
    (number_between(0, 1), 'nan', "must be a number in [0, 1], got 'nan'"),
    (int_tuple(4, 'N,C,H,W'), '4,256,64', "takes N,C,H,W (4 positive integers), got '4,256,64'"),
    (int_tuple(4, 'N,C,H,W'), '4,8,0,4', "takes N,C,H,W (4 positive integers), got '4,8,0,4'"),
    (int_tuple(3, 'batch,height,width'), '2,x,4', "takes batch,height,width (3 positive"),
])
def test_command_line_types_refuse_naming_the_value(parse: Callable[[str], object], text: str,
                                                    message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        parse(text)


def test_command_line_types_accept_their_range() -> None:
    assert int_at_least(0)('0') == 0 and int_at_least(1)('12') == 12
    assert number_between(0, 1)('0') == 0.0 and number_between(0, 1)('1') == 1.0
    assert int_tuple(4, 'N,C,H,W')('2,8,5,7') == (2, 8, 5, 7)


@pytest.mark.parametrize('device', ['gpu', 'CPU', 'cuda:-1', 'cuda:x', 'mps', ' cpu', None])
def test_device_names_outside_cpu_and_cuda_are_refused(device: object) -> None:
    """torch's own errors list twenty device types (or none, for None); ours says what the
    tools and the API take, and the value."""
    assert device_problem(device) == f"expected 'cpu', 'cuda' or 'cuda:N', got {device!r}"
    with pytest.raises(ValueError, match=re.escape('device: expected ')):
        check_device(device)


def test_cuda_devices_this_process_does_not_see(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a GPU every CUDA device is refused; with two, cuda:2 is, naming the range."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for device in ('cuda', 'cuda:0', 0):
        assert device_problem(device) == (f'{device!r} needs a CUDA GPU; none is visible to '
                                          f'this process')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert device_problem('cuda:2') == ("'cuda:2' names GPU 2, but this process sees 2 "
                                        "(cuda:0 to cuda:1)")
    for device in ('cuda', 'cuda:1', 'cpu', torch.device('cuda', 0)):
        assert device_problem(device) is None
        assert check_device(device) == torch.device(device)
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape("'cuda:5' names GPU 5")):
        visible_device('cuda:5')
    assert visible_device('cuda:1') == 'cuda:1'


def test_api_device_is_checked_before_any_work(tmp_path: Path) -> None:
    """inference() and load_model() name a bad device before reading a config or building a
    model (mmseg's init_model would fail deep inside with torch's RuntimeError)."""
    from mmattn.analysis import load_model
    from mmattn.apis import inference
    ckpt = tmp_path / 'x.pth'
    torch.save({'state_dict': {}}, str(ckpt))
    with pytest.raises(ValueError, match=re.escape("device: expected 'cpu', 'cuda' or "
                                                   "'cuda:N', got 'gpu'")):
        inference(str(tmp_path / 'not_read.py'), str(ckpt), 'demo', str(tmp_path / 'out'),
                  device='gpu')
    assert not (tmp_path / 'out').exists()
    with pytest.raises(ValueError, match=re.escape("load_model: device: expected 'cpu', "
                                                   "'cuda' or 'cuda:N', got 'gpu'")):
        load_model('no_such_timm_model', device='gpu')


def run_tool(path: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The tool's argument parsing: ``parse_args(argv)`` where it has one, else ``main()``
    with ``sys.argv`` set (a usage error exits before any work)."""
    spec = importlib.util.spec_from_file_location('_mmattn_tool_' + Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # for its dataclasses
    spec.loader.exec_module(module)
    if hasattr(module, 'parse_args'):
        module.parse_args(argv)
    else:
        monkeypatch.setattr(sys, 'argv', [path, *argv])
        module.main()


@pytest.mark.skipif(torch.cuda.is_available(), reason='the preset runs where a GPU is seen')
def test_a_cuda_preset_without_a_gpu_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """The preset sets the device itself, so its --device is checked as the option's is."""
    with pytest.raises(SystemExit) as info:
        run_tool('tools/benchmark.py', ['--preset', 'gpu'], monkeypatch)
    assert info.value.code == 2
    assert ("--preset gpu: 'cuda' needs a CUDA GPU; none is visible to this process"
            in capsys.readouterr().err)


@pytest.mark.parametrize('path, argv, message', [
    ('tools/benchmark.py', ['--iters', '0'], "argument --iters: must be an integer >= 1, got '0'"),
    ('tools/benchmark.py', ['--op', 'psa', '--shape', '4,256,64'],
     "argument --shape: takes N,C,H,W or B,H,W,C (4 positive integers), got '4,256,64'"),
    ('tools/benchmark.py', ['--op', 'outlook', '--shape', '1,4,4,8', '--heads', '3'],
     '--shape/--heads: OutlookAttention: in_channels=8 is not divisible by num_heads=3'),
    ('tools/sanitize_kernels.py', ['--shapes', '1,8,0,4'], 'argument --shapes: takes N,C,H,W'),
    ('tools/make_demo_data.py', ['--seed', '-1'], "argument --seed: must be an integer >= 0"),
    ('tools/infer.py', [SEG_DEMO, 'x.pth', 'demo', '--topk', '0'], 'argument --topk: must be'),
    ('tools/infer.py', [SEG_DEMO, 'x.pth', 'demo', '--opacity', '2'],
     "argument --opacity: must be a number in [0, 1], got '2'"),
    ('tools/infer.py', [SEG_DEMO, 'x.pth', 'demo', '--kpt-thr', '-1'],
     "argument --kpt-thr: must be a number in [0, inf], got '-1'"),
    ('tools/visualize_attention.py', [SEG_DEMO, 'demo', '--size', '0', '64'],
     "argument --size: must be an integer >= 1, got '0'"),
    ('tools/visualize_attention.py', [SEG_DEMO, 'demo', '--panel-px', '0'],
     'argument --panel-px: must be an integer >= 1'),
    ('tools/analysis/block_costs.py', ['--channels', '0'], 'argument --channels: must be'),
    ('tools/analysis/get_flops.py', [SEG_DEMO, '--shape', '64', '0'],
     "argument --shape: must be an integer >= 1, got '0'"),
    ('tools/benchmark.py', ['--device', 'gpu'],
     "argument --device: expected 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ('tools/benchmark_model.py', ['--device', 'cuda:0:1'], "argument --device: expected 'cpu'"),
    ('tools/infer.py', [SEG_DEMO, 'x.pth', 'demo', '--device', 'gpu'], 'argument --device: '),
    ('tools/visualize_attention.py', [SEG_DEMO, 'demo', '--device', 'xpu'],
     "argument --device: expected 'cpu', 'cuda' or 'cuda:N', got 'xpu'"),
    ('tools/analysis/block_costs.py', ['--device', 'gpu'], 'argument --device: expected'),
])
def test_tool_usage_errors_name_the_option(path: str, argv: list[str], message: str,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    """Where the value used to fail later, with a traceback: a median of no runs, an
    unpacking error, a NaN figure size, a convolution larger than its input."""
    with pytest.raises(SystemExit) as info:
        run_tool(path, argv, monkeypatch)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
