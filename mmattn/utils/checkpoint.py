"""mmengine checkpoints that torch's weights-only loader reads, and checks of checkpoint files.

torch >= 2.6 loads with ``weights_only=True`` by default: only tensors, containers and Python
scalars. mmengine 0.10.7's ``Runner.save_checkpoint`` also stores the message hub's
``HistoryBuffer`` s and numpy arrays, scalars and dtypes (``meta``, ``message_hub``), so a
plain ``torch.load(path)``, ``mmseg.apis.init_model`` or ``mmpose.apis.init_model`` refuses
the file ("Unsupported global: mmengine.logging.history_buffer.HistoryBuffer").

* :func:`to_weights_only` rewrites a checkpoint dict, before it is saved, into those plain
  types: a ``HistoryBuffer`` becomes ``{'log_history': tensor, 'count_history': tensor,
  'max_length': int}``, a numeric numpy array a tensor of the same dtype, another array a
  list, a numpy scalar the Python scalar, a numpy dtype its name. What was converted is
  recorded under ``checkpoint['weights_only_conversions']`` (plain lists);
  :func:`restore_from_weights_only` undoes it when a run resumes, so ``Runner.resume``
  gets back the exact objects. ``mmattn.engine.WeightsOnlyCheckpointHook`` calls both.
* :func:`mmengine_checkpoint_globals` lets weights-only loading read checkpoints written
  without that conversion (by mmengine directly, or by mmattn before it), allowing exactly
  the globals mmengine stores, rather than turning weights-only loading off
  (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``), which would run any pickle it is given.
* :func:`check_checkpoint_file` says, without loading it, what is wrong with a file given as
  a checkpoint (missing, empty, truncated, not a PyTorch checkpoint) and what to do.
"""
from __future__ import annotations

import builtins
import collections
import contextlib
import os.path as osp
import zipfile
from typing import Any, Iterator

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer

__all__ = ['CONVERSIONS_KEY', 'CheckpointFileError', 'MMENGINE_CHECKPOINT_GLOBALS',
           'check_checkpoint_file', 'checkpoint_file_problem', 'mmengine_checkpoint_globals',
           'restore_from_weights_only', 'to_weights_only', 'unsafe_objects']

#: the key of a checkpoint that records what :func:`to_weights_only` converted
CONVERSIONS_KEY = 'weights_only_conversions'

# what torch's weights-only unpickler accepts without allow-listing (exact types: a subclass
# of dict or str pickles through its own class, which the unpickler refuses)
_ATOMS = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype,
          torch.device, torch.Size)
_MAPPINGS = (dict, collections.OrderedDict, collections.Counter)
_SEQUENCES = (list, tuple, set)
# numpy dtype kinds torch.from_numpy keeps as they are: bool, signed/unsigned int, float, complex
_TENSOR_KINDS = frozenset('biufc')


def _numpy_globals() -> list:
    core = getattr(np, '_core', None) or np.core  # numpy 2 / numpy 1
    return [np.dtype, np.ndarray, core.multiarray.scalar, core.multiarray._reconstruct,
            *(getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith('DType'))]


#: the non-tensor objects mmengine's CheckpointHook stores (numpy 2 pickles dtypes through
#: ``getattr``)
MMENGINE_CHECKPOINT_GLOBALS = [HistoryBuffer, builtins.getattr, *_numpy_globals()]


@contextlib.contextmanager
def mmengine_checkpoint_globals() -> Iterator[None]:
    """Within the block, weights-only loading also accepts the objects mmengine stores in a
    checkpoint (``HistoryBuffer``, numpy arrays, scalars and dtypes) and nothing else."""
    with torch.serialization.safe_globals(MMENGINE_CHECKPOINT_GLOBALS):
        yield


# ----------------------------------------------------------------------------------------
# conversion to weights-only types and back

def _array(value: np.ndarray, path: list, record: list) -> Any:
    dtype = value.dtype
    if dtype.kind in _TENSOR_KINDS and dtype.isnative:
        try:
            tensor = torch.from_numpy(np.array(value, copy=True, order='C'))
        except TypeError:  # a dtype torch has no tensor type for (e.g. uint16 on old torch)
            pass
        else:
            record.append([path, 'ndarray', dtype.str])
            return tensor
    record.append([path, 'ndarray_list', dtype.str])
    return _convert(value.tolist(), path, [])  # object arrays: convert what they hold too


def _convert(obj: Any, path: list, record: list) -> Any:
    """``obj`` with every numpy object and HistoryBuffer replaced by plain types (new
    containers where something inside changed, the same objects elsewhere)."""
    if isinstance(obj, torch.Tensor) or type(obj) in _ATOMS:
        return obj
    if isinstance(obj, np.ndarray):
        return _array(obj, path, record)
    if isinstance(obj, np.generic):  # before float/int: np.float64 subclasses float
        record.append([path, 'scalar', obj.dtype.str])
        return obj.item()
    if isinstance(obj, np.dtype):
        record.append([path, 'dtype', obj.str])
        return obj.str
    if isinstance(obj, HistoryBuffer):
        logs, counts = obj.data
        converted = {'log_history': _array(logs, path + ['log_history'], record),
                     'count_history': _array(counts, path + ['count_history'], record),
                     'max_length': int(obj.max_length)}
        record.append([path, 'HistoryBuffer', None])
        return converted
    if type(obj) in _MAPPINGS:
        items = {key: _convert(value, path + [key], record) for key, value in obj.items()}
        if all(items[key] is value for key, value in obj.items()):
            return obj
        return type(obj)(items)
    if type(obj) in _SEQUENCES and not isinstance(obj, set):
        values = [_convert(value, path + [i], record) for i, value in enumerate(obj)]
        if all(new is old for new, old in zip(values, obj)):
            return obj
        return type(obj)(values)
    return obj  # left as it is; unsafe_objects() reports it


def to_weights_only(checkpoint: dict) -> list[tuple[str, str]]:
    """Convert, in place, what ``checkpoint`` holds besides tensors and plain Python into
    weights-only-loadable types, and record the conversions under :data:`CONVERSIONS_KEY`.

    Containers that hold converted objects are replaced, never modified, so objects the
    checkpoint shares with the running program (a dataset's ``metainfo``) are left alone.

    Returns:
        What remains that weights-only loading would refuse, as (location, type name) pairs
        (see :func:`unsafe_objects`); empty for what mmengine and OpenMMLab store.
    """
    if not isinstance(checkpoint, dict):
        raise TypeError(f'to_weights_only: checkpoint must be a dict, got '
                        f'{type(checkpoint).__name__}')
    record: list = list(checkpoint.get(CONVERSIONS_KEY, []))
    for key in list(checkpoint):
        if key != CONVERSIONS_KEY:
            checkpoint[key] = _convert(checkpoint[key], [key], record)
    if record:
        checkpoint[CONVERSIONS_KEY] = record
    return unsafe_objects(checkpoint)


def unsafe_objects(obj: Any, where: str = 'checkpoint') -> list[tuple[str, str]]:
    """The objects inside ``obj`` that ``torch.load(..., weights_only=True)`` refuses, as
    (location such as ``checkpoint['meta']['x']``, type name) pairs."""
    found: list[tuple[str, str]] = []
    if isinstance(obj, torch.Tensor) or type(obj) in _ATOMS:
        return found
    if type(obj) in _MAPPINGS:
        for key, value in obj.items():
            found += unsafe_objects(key, f'{where} (a key)')
            found += unsafe_objects(value, f'{where}[{key!r}]')
    elif type(obj) in _SEQUENCES:
        for i, value in enumerate(obj):
            found += unsafe_objects(value, f'{where}[{i}]')
    else:
        found.append((where, f'{type(obj).__module__}.{type(obj).__qualname__}'))
    return found


def _restore_one(kind: str, info: Any, value: Any) -> Any:
    if kind == 'ndarray':
        return value.numpy().astype(np.dtype(info), copy=False)
    if kind == 'ndarray_list':
        return np.array(value, dtype=np.dtype(info))
    if kind == 'scalar':
        return np.dtype(info).type(value)
    if kind == 'dtype':
        return np.dtype(value)
    if kind == 'HistoryBuffer':
        return HistoryBuffer(value['log_history'], value['count_history'],
                                      value['max_length'])
    raise ValueError(f'restore_from_weights_only: unknown conversion {kind!r} in '
                     f'{CONVERSIONS_KEY}')


def _replace(container: Any, path: list, kind: str, info: Any) -> Any:
    """``container`` with the object at ``path`` restored (tuples are rebuilt)."""
    if not path:
        return _restore_one(kind, info, container)
    key, rest = path[0], path[1:]
    new = _replace(container[key], rest, kind, info)
    if isinstance(container, tuple):
        return container[:key] + (new, ) + container[key + 1:]
    container[key] = new
    return container


def restore_from_weights_only(checkpoint: dict) -> dict:
    """Undo :func:`to_weights_only` in place (a checkpoint without its record is left as it
    is) and return ``checkpoint``."""
    record = checkpoint.pop(CONVERSIONS_KEY, None)
    if not record:
        return checkpoint
    for path, kind, info in record:  # children before the objects that hold them
        top = path[0]
        checkpoint[top] = _replace(checkpoint[top], list(path[1:]), kind, info)
    return checkpoint


# ----------------------------------------------------------------------------------------
# checkpoint files

class CheckpointFileError(ValueError):
    """A file given as a checkpoint cannot be one; the message names the file, what is wrong
    and what to do."""


_WHERE = ('a checkpoint written by tools/train.py is work_dirs/<config name>/iter_N.pth '
          '(or epoch_N.pth)')


def checkpoint_file_problem(path: str) -> tuple[str, str] | None:
    """What is wrong with ``path`` as a PyTorch checkpoint, read from its first and last
    bytes only: ``(problem, fix)``, or None when it looks like one (torch's zip format with a
    ``data.pkl``, or the legacy pickle format)."""
    if not osp.exists(path):
        return 'does not exist', f'give the path of an existing checkpoint; {_WHERE}'
    if osp.isdir(path):
        return 'is a directory', f'give a checkpoint file inside it; {_WHERE}'
    size = osp.getsize(path)
    if size == 0:
        return ('is empty (0 bytes): a save or a copy that did not finish',
                'use another checkpoint of the run, or copy the file again')
    with open(path, 'rb') as f:
        head = f.read(4)
    if head.startswith(b'PK'):  # torch.save's zip archive
        if not zipfile.is_zipfile(path):
            return (f'is truncated ({size} bytes): it starts as a PyTorch checkpoint but its '
                    'end is missing (a save or a copy that did not finish)',
                    'use another checkpoint of the run (tools/train.py --resume picks the '
                    'latest complete one), or copy the file again')
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            return (f'is a damaged zip archive ({exc})',
                    'use another checkpoint of the run, or copy the file again')
        if not any(name == 'data.pkl' or name.endswith('/data.pkl') for name in names):
            return ('is a zip archive but not a PyTorch checkpoint (no data.pkl inside)',
                    f'give a file written by torch.save; {_WHERE}')
        return None
    if head[:2] == b'\x80\x02':  # the legacy (torch < 1.6) format: a pickle stream
        return None
    return (f'is not a PyTorch checkpoint (torch.save writes a zip archive; this file starts '
            f'with {head!r})', f'give a file written by torch.save; {_WHERE}')


def check_checkpoint_file(path: str, arg: str = 'checkpoint') -> None:
    """Raise :class:`CheckpointFileError` when ``path`` cannot be a checkpoint.

    Args:
        path: the file.
        arg: how the user gave it (``'--resume'``, ``'CHECKPOINT'``), for the message.
    """
    problem = checkpoint_file_problem(path)
    if problem is not None:
        what, fix = problem
        raise CheckpointFileError(f'{arg} {path!r} {what}; {fix}')
