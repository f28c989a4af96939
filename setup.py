"""mmattn: attention blocks for OpenMMLab and timm.

The pinned dependency stack is installed by ``python tools/setup_env.py`` (mmcv must be
built from source with its ops, which a plain ``install_requires`` cannot express); the
requirements below are the loose ranges the code works with. The compiled kernels are optional
(see ``kernel_extensions``).
"""
import os
import os.path as osp
import shutil
import sys

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))
# shipped inside the package, so configs can be inherited as `mmattn::...` (mmengine reads
# model-index.yml for that) and the stack check finds its pins after a non-editable install
MIM_FILES = ('configs', 'tools', 'requirements', 'model-index.yml')


def kernel_extensions() -> tuple[list, dict]:
    """``mmattn._C`` (the C++ CPU and the CUDA kernels) when the build includes CUDA: torch sees
    a GPU or ``MMATTN_WITH_CUDA=1`` (compiles on a machine with nvcc and no GPU);
    ``MMATTN_WITH_CUDA=0``, no torch or no toolkit: none, and mmattn runs on its PyTorch paths
    (``MMATTN_JIT=1`` compiles the kernels on first use instead). Needs
    ``pip install --no-build-isolation`` so that the installed torch is the one built against."""
    if os.environ.get('MMATTN_WITH_CUDA', '').strip() == '0':
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        '_mmattn_extension', osp.join(HERE, 'mmattn', 'ops', 'extension.py'))
    extension = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    if not extension.want_cuda():
        return [], {}
    extension.default_cuda_arch_list()
    ext = CUDAExtension(
        'mmattn._C',
        sources=[osp.relpath(src, HERE) for src in extension.sources(with_cuda=True)],
        extra_compile_args=extension.compile_flags(with_cuda=True),
        extra_link_args=extension.link_flags())
    return [ext], {'build_ext': BuildExtension}


def read_version() -> str:
    scope: dict = {}
    with open(osp.join(HERE, 'mmattn', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


def add_mim_extension() -> None:
    """Put ``configs``, ``tools``, ``requirements`` and ``model-index.yml`` into
    ``mmattn/.mim`` as OpenMMLab packages do: symbolic links for an editable install, copies
    for a wheel or sdist."""
    editable = any(cmd in sys.argv for cmd in ('develop', 'editable_wheel'))
    packaged = any(cmd in sys.argv for cmd in ('bdist_wheel', 'sdist', 'build', 'install'))
    if not (editable or packaged):
        return
    mim = osp.join(HERE, 'mmattn', '.mim')
    os.makedirs(mim, exist_ok=True)
    for name in MIM_FILES:
        src, dst = osp.join(HERE, name), osp.join(mim, name)
        if not osp.exists(src):
            continue
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        if editable:
            os.symlink(osp.relpath(src, mim), dst, target_is_directory=osp.isdir(src))
        elif osp.isdir(src):
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
        else:
            shutil.copyfile(src, dst)


if __name__ == '__main__':
    add_mim_extension()
    ext_modules, cmdclass = kernel_extensions()
    setup(
        name='mmattn',
        version=read_version(),
        description='Attention blocks (PSA, SE, ECA, CBAM, CoordAtt, non-local, DANet, '
                    'criss-cross, outlook/VOLO) for OpenMMLab and timm',
        long_description=open(osp.join(HERE, 'README.md'), encoding='utf-8').read(),
        long_description_content_type='text/markdown',
        license='Apache-2.0',
        python_requires='>=3.9',
        packages=find_packages(exclude=('configs', 'tools', 'tests', 'tests.*')),
        include_package_data=True,
        package_data={'mmattn': ['.mim/**/*', 'ops/csrc/*', 'py.typed']},
        install_requires=[
            'torch>=2.0', 'torchvision', 'timm>=1.0', 'mmengine>=0.10,<1.0', 'mmcv>=2.0,<2.2',
        ],
        extras_require={
            'seg': ['mmsegmentation>=1.2,<1.3'],
            'pose': ['mmpose>=1.3,<1.4', 'mmdet>=3.3,<3.4'],
            'cls': ['mmpretrain>=1.2,<1.3'],
            'tests': ['pytest'],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )
