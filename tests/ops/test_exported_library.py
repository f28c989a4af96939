"""Kernels built on one machine and loaded on another: ``python -m mmattn.ops.build --output
DIR`` writes the library and its build description; ``MMATTN_KERNELS_LIB`` loads it where the
description matches the process (torch's version and commit, the kernel sources, the GPUs) and
refuses it where it does not, naming what differs."""
from __future__ import annotations

import importlib.util
import json
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest
import torch

from mmattn.ops import build, extension

ENV = extension.LIBRARY_ENV
ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
#: an installed mmattn._C is loaded before the library (extension.load_extension)
INSTALLED = pytest.mark.skipif(importlib.util.find_spec('mmattn._C') is not None,
                               reason='mmattn._C is installed: it is loaded first')


def _child_env(library: str, extensions_dir) -> dict[str, str]:
    """A process that may only load the library: no JIT build asked for, an empty cache."""
    env = {k: v for k, v in os.environ.items() if k != extension.JIT_ENV}
    env.update({ENV: library, 'TORCH_EXTENSIONS_DIR': str(extensions_dir)})
    return env


@INSTALLED
def test_exported_library_loads_in_another_process(cpu_kernels: str, tmp_path) -> None:
    out, cache = tmp_path / 'lib', tmp_path / 'cache'
    library = extension.export_library(str(out), with_cuda=False)
    assert sorted(os.listdir(out)) == ['mmattn_kernels.json', 'mmattn_kernels.so']
    with open(out / 'mmattn_kernels.json') as f:
        info = json.load(f)
    assert info == {'torch': torch.__version__, 'torch_git': torch.version.git_version,
                    'torch_cuda': torch.version.cuda, 'sources': extension.sources_digest(),
                    'with_cuda': False, 'cuda_arch_list': ''}
    env = _child_env(library, cache)
    code = ('from mmattn.ops import extension as e\n'
            'print(e.load_extension()); print(e.has_kernel("psa_block_fwd", "cpu"))\n'
            'print(e.has_kernel("outlook_fwd", "cpu"))')
    loaded = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split('\n')[:3] == [f'{library} (prebuilt, CPU kernels only)', 'True',
                                             'True'], loaded.stdout
    # the build command, given the library, checks it (an op's argument error, raised by the
    # loaded kernels in a child of its own, keeps its numbers) and compiles nothing
    checked = subprocess.run([sys.executable, '-m', 'mmattn.ops.build', '--cpu-only'], env=env,
                             capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stderr
    assert f'loaded {library} (prebuilt, CPU kernels only)' in checked.stdout
    assert not cache.exists() or not any(cache.iterdir())


def test_prebuild_tool_builds_exports_and_checks_without_the_package(cpu_kernels: str,
                                                                    tmp_path) -> None:
    """tools/prebuild_kernels.py, which --prepare runs under another torch, where the mmattn
    package cannot be imported (here a package of that name that refuses to be)."""
    shadow = tmp_path / 'shadow' / 'mmattn'
    shadow.mkdir(parents=True)
    (shadow / '__init__.py').write_text('raise ImportError("the mmattn package was imported")\n')
    env = dict(os.environ, PYTHONPATH=str(shadow.parent))
    run = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'prebuild_kernels.py'),
                          str(tmp_path / 'out'), '--cpu-only'], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    library = tmp_path / 'out' / 'mmattn_kernels.so'
    assert run.stdout.strip().endswith(f"prebuild_kernels: {library} for torch "
                                       f"{torch.__version__} (commit "
                                       f"{torch.version.git_version[:12]}), checked: it loads "
                                       f"and keeps its errors' numbers"), run.stdout
    with open(tmp_path / 'out' / 'mmattn_kernels.json') as f:
        assert json.load(f) == extension.build_info(False)


def _library_described(tmp_path, **changes) -> str:
    """A file standing for a library, with this process's build description, changed."""
    library = tmp_path / 'mmattn_kernels.so'
    library.write_bytes(b'not a shared library')
    info = dict(extension.build_info(False), **changes)
    (tmp_path / 'mmattn_kernels.json').write_text(json.dumps(info))
    return str(library)


@pytest.mark.parametrize('key,value,name', [
    ('torch', '2.0.0+cpu', 'torch'),
    ('torch_git', '0' * 40, "torch's commit"),
    ('sources', 'f' * 64, 'the kernel sources')])
def test_library_for_another_build_is_refused(tmp_path, key: str, value: str,
                                              name: str) -> None:
    library = _library_described(tmp_path, **{key: value})
    here = extension.build_info(False)[key]
    with pytest.raises(RuntimeError) as raised:
        extension.load_library(library)
    assert f'{ENV}={library} was built for {name} {value!r}, this process has {here!r}' \
        in str(raised.value)
    assert 'python -m mmattn.ops.build --output DIR' in str(raised.value)


def test_library_without_description_or_not_loadable(tmp_path) -> None:
    library = _library_described(tmp_path)
    with pytest.raises(RuntimeError, match=f'{ENV}={library} does not load: '):
        extension.load_library(library)    # the description matches; the file is no library
    os.remove(tmp_path / 'mmattn_kernels.json')
    with pytest.raises(RuntimeError, match=r'its build description .*mmattn_kernels\.json '
                                           r'cannot be read \(.*No such file'):
        extension.load_library(library)
    (tmp_path / 'mmattn_kernels.json').write_text('[1, 2]')
    with pytest.raises(RuntimeError, match=r'cannot be read \(not a JSON object: \[1, 2\]\)'):
        extension.load_library(library)


@INSTALLED
def test_load_extension_reports_a_refused_library(tmp_path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The import-time path never raises: the refusal becomes the load error, and one
    RuntimeWarning says so (the library was asked for; the blocks fall back to PyTorch)."""
    library = _library_described(tmp_path, torch='2.0.0+cpu')
    monkeypatch.setenv(ENV, library)
    saved = dict(extension._state)
    extension.reset_state()
    try:
        with pytest.warns(RuntimeWarning, match=r"compiled kernels were asked for but not "
                                                r"loaded: .*was built for torch '2\.0\.0\+cpu'.*"
                                                r"run their PyTorch paths") as caught:
            assert extension.load_extension() is None
            assert extension.load_extension() is None   # once, not per call
        assert len(caught) == 1
        assert f"was built for torch '2.0.0+cpu'" in extension.load_error()
    finally:
        extension.reset_state(**saved)


def test_load_extension_warns_only_where_kernels_were_asked_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The default install (no mmattn._C, neither variable set) is not built on purpose:
    no warning, the reason stays in load_error() / kernel_status()."""
    import warnings
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv(extension.JIT_ENV, raising=False)
    monkeypatch.setattr(extension.importlib, 'import_module',
                        lambda name: (_ for _ in ()).throw(ImportError(f'No module {name}')))
    saved = dict(extension._state)
    extension.reset_state()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            assert extension.load_extension() is None
        assert extension.load_error().startswith('not built (No module mmattn._C)')
    finally:
        extension.reset_state(**saved)


def test_jit_build_of_the_library_kind_loads_it_instead(tmp_path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the library named is of the kind asked for, the JIT build loads it (here refused:
    the error is the library's, and nothing compiles)."""
    monkeypatch.setenv(ENV, _library_described(tmp_path, torch='2.0.0+cpu'))
    monkeypatch.setattr('torch.utils.cpp_extension.load', lambda **kwargs: pytest.fail(kwargs))
    with pytest.raises(RuntimeError, match="was built for torch '2.0.0"):
        extension.build_jit(with_cuda=False)


def test_build_command_does_not_export_a_loaded_library(tmp_path, capsys,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, '/elsewhere/mmattn_kernels.so')
    assert build.main(['--cpu-only', '--output', str(tmp_path)]) == 2
    assert f'but {ENV}=/elsewhere/mmattn_kernels.so is set' in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_export_needs_a_build_in_the_process(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extension, '_jit_libraries', {})
    with pytest.raises(RuntimeError, match=r'nothing to export: no JIT build with_cuda=True'):
        extension.export_library(str(tmp_path), with_cuda=True)
    assert not any(tmp_path.iterdir())


def test_failed_export_leaves_nothing_half_written(tmp_path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    built = tmp_path / 'built.so'
    built.write_bytes(b'a library')
    monkeypatch.setattr(extension, '_jit_libraries', {False: str(built)})

    def fail(*args, **kwargs):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(extension.json, 'dump', fail)   # the library copied, then a failure
    with pytest.raises(OSError, match='No space left'):
        extension.export_library(str(tmp_path / 'out'), with_cuda=False)
    assert not any((tmp_path / 'out').iterdir())


def test_sources_digest_follows_every_source_file(tmp_path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    original = extension.sources_digest()
    csrc = tmp_path / 'csrc'
    shutil.copytree(extension.CSRC, csrc)
    monkeypatch.setattr(extension, 'CSRC', str(csrc))
    assert extension.sources_digest() == original
    header = csrc / 'vector.cuh'
    text = header.read_text()
    header.write_text(text.replace('\n', '\n ', 1))       # a header's one byte more
    changed = extension.sources_digest()
    header.write_text(text)
    os.rename(header, csrc / 'vectors.cuh')                # the same bytes, another name
    renamed = extension.sources_digest()
    assert len({original, changed, renamed}) == 3


@pytest.mark.parametrize('arch_list,capability,runs', [
    ('8.0', (8, 0), True),
    ('8.0', (8, 6), True),           # machine code runs on a later minor version
    ('8.6', (8, 0), False),
    ('8.0', (9, 0), False),          # ... not on another major version
    ('8.0;9.0+PTX', (10, 0), True),  # PTX: compiled by the driver for later GPUs
    ('9.0+PTX', (8, 9), False),
    ('9.0a', (9, 0), True),          # architecture-specific: that GPU alone
    ('8.0a', (8, 6), False),
    ('7.5 8.0', (8, 9), True),       # torch also takes spaces
    ('Hopper', (9, 0), False),       # a name: not known to cover anything
    ('', (9, 0), False)])
def test_arch_list_covers(arch_list: str, capability: tuple[int, int], runs: bool) -> None:
    assert extension.arch_list_covers(arch_list, capability) is runs
