"""Silence the deprecation notices the OpenMMLab stack prints on every start of a tool.

They concern the libraries' own code, not the user's, and nothing the user does removes them:

* ``UserWarning: pkg_resources is deprecated as an API`` - setuptools warns when mmengine's
  ``is_installed`` / ``get_installed_path`` (``mmengine/utils/package_utils.py``) import and
  reload ``pkg_resources``, which mmengine does while it resolves ``mmseg::`` configs and
  registry scopes (:func:`filter_tool_warnings`);
* ``UserWarning: ``build_loss`` would be deprecated soon`` - mmseg's own decode heads call
  its deprecated ``mmseg/models/builder.py`` (:func:`filter_tool_warnings`);
* ``"FileClient" will be deprecated in future ...`` and ``"HardDiskBackend" is the alias of
  "LocalBackend" ...`` - logged at WARNING by mmengine 0.10.7's ``CheckpointHook.before_train``
  (``FileClient.infer_client``, called whatever the config says); log records of the run's
  logger (:func:`quiet_runner_logger`);
* ``No CUDA runtime is found, using CUDA_HOME=...`` - logged by ``torch.utils.cpp_extension``
  when it is imported (``torch.compile`` does, on the CPU too) on a machine with a CUDA
  toolkit and no GPU (:func:`quiet_no_cuda_runtime`).

Each filter matches its message exactly; every other warning still shows.
"""
from __future__ import annotations

import logging
import warnings

__all__ = ['MMENGINE_NOTICES', 'filter_tool_warnings', 'quiet_no_cuda_runtime',
           'quiet_runner_logger']

PKG_RESOURCES_WARNING = r'pkg_resources is deprecated as an API'
MMSEG_BUILD_LOSS_WARNING = r'``build_loss`` would be deprecated soon'
NO_CUDA_RUNTIME = 'No CUDA runtime is found, using CUDA_HOME='

#: mmengine log messages dropped by :func:`quiet_runner_logger`, verbatim
MMENGINE_NOTICES = frozenset({
    '"FileClient" will be deprecated in future. Please use io functions in '
    'https://mmengine.readthedocs.io/en/latest/api/fileio.html#file-io',
    '"HardDiskBackend" is the alias of "LocalBackend" and the former will be deprecated in '
    'future.',
})


def filter_tool_warnings() -> None:
    """Ignore setuptools' ``pkg_resources`` and mmseg's ``build_loss`` deprecation warnings
    (call before loading a config)."""
    warnings.filterwarnings('ignore', message=PKG_RESOURCES_WARNING, category=UserWarning)
    warnings.filterwarnings('ignore', message=MMSEG_BUILD_LOSS_WARNING, category=UserWarning,
                            module=r'mmseg\.models\.builder')


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in MMENGINE_NOTICES


def quiet_runner_logger(logger: logging.Logger) -> None:
    """Drop mmengine's FileClient/HardDiskBackend deprecation notices from ``logger`` (the
    Runner's ``runner.logger``; idempotent)."""
    if not any(isinstance(f, _DropNotices) for f in logger.filters):
        logger.addFilter(_DropNotices())


class _DropNoCudaRuntime(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NO_CUDA_RUNTIME)


def quiet_no_cuda_runtime() -> None:
    """Drop ``torch.utils.cpp_extension``'s "No CUDA runtime is found" line (it says only that
    the machine has a CUDA toolkit and no GPU; idempotent, works before the module is
    imported)."""
    logger = logging.getLogger('torch.utils.cpp_extension')
    if not any(isinstance(f, _DropNoCudaRuntime) for f in logger.filters):
        logger.addFilter(_DropNoCudaRuntime())
