"""Check registered type names before building, with the closest names on a typo.

mmengine reports a misspelled ``type`` deep inside the build (for a plugin of HRNet:
``KeyError: 'Cannot find None in registry under scope name mmseg'``, with neither the
misspelled name nor where it was written). :func:`check_type_name` names both, and the
registered names closest to it; :func:`check_plugin_types` applies it to every ``plugins``
entry of a model config, which ``tools/train.py`` and ``tools/test.py`` do before building.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterator

from mmengine.registry import Registry

__all__ = ['UnknownTypeError', 'check_plugin_types', 'check_type_name', 'registered_names']

MMATTN_SCOPE = 'mmattn'


class UnknownTypeError(KeyError, ValueError):
    """A ``type`` name that no registry in reach knows. A KeyError, like mmengine's own
    error for it, and a ValueError (bad input); printed without KeyError's quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ''


def _chain(registry: Registry) -> Iterator[Registry]:
    while registry is not None:
        yield registry
        registry = registry.parent


def registered_names(registry: Registry) -> list[str]:
    """The names a config of ``registry``'s scope can use: those of ``registry`` and its
    parents as they are, and mmattn's with their ``mmattn.`` prefix (registry locations are
    imported first, as a build would)."""
    names: list[str] = []
    for reg in _chain(registry):
        reg.import_from_location()
        names += [name for name in reg.module_dict if name not in names]
    root = list(_chain(registry))[-1]
    mmattn = root._search_child(MMATTN_SCOPE)
    if mmattn is not None:
        mmattn.import_from_location()
        names += [f'{MMATTN_SCOPE}.{name}' for name in mmattn.module_dict]
    return names


def _closest(type_name: str, names: list[str], n: int = 3) -> list[str]:
    """Registered names closest to ``type_name``, comparing the names without their scope
    prefix and case (so ``PolarizedSelfAtention`` finds ``mmattn.PolarizedSelfAttention``)."""
    def bare(name: str) -> str:
        return name.rsplit('.', 1)[-1].lower()

    by_bare: dict[str, list[str]] = {}
    for name in names:
        by_bare.setdefault(bare(name), []).append(name)
    matches = difflib.get_close_matches(bare(type_name), list(by_bare), n=n, cutoff=0.6)
    return [name for match in matches for name in by_bare[match]][:n]


def check_type_name(type_name: Any, registry: Registry, owner: str) -> Any:
    """Return what ``type_name`` builds in ``registry``; raise :class:`UnknownTypeError`
    when it is registered nowhere in reach.

    Args:
        type_name: the config's ``type``: a registered name (``'ContextBlock'``,
            ``'mmattn.PolarizedSelfAttention'``) or a class (returned as it is).
        registry: the registry the name is built from (e.g. mmengine's ``MODELS`` switched to
            the config's scope, or ``mmattn.registry.MODELS``).
        owner: where the name was written, for the message
            (``'model.backbone.plugins[0].cfg.type'``).

    Raises:
        UnknownTypeError: with the name, ``owner``, the registry's scope, the closest
            registered names and how to fix it.
    """
    if not isinstance(type_name, str):
        if isinstance(type_name, type) or callable(type_name):
            return type_name
        raise UnknownTypeError(f'{owner} must be a registered type name (str) or a class, '
                               f'got {type_name!r} ({type(type_name).__name__})')
    found = registry.get(type_name)
    if found is not None:
        return found
    close = _closest(type_name, registered_names(registry))
    hint = (f'closest registered names: {", ".join(repr(n) for n in close)}' if close
            else 'no registered name is close to it')
    raise UnknownTypeError(
        f'{owner}={type_name!r} is not registered (scope {registry.scope!r}, registry '
        f'{registry.name!r}); {hint}. Fix the name in the config, or import the package that '
        f'registers it (custom_imports = dict(imports=[...])); blocks of mmattn are named '
        f'with their scope, e.g. "mmattn.PolarizedSelfAttention".')


def _plugin_entries(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    """(location, type name) of every ``plugins=[dict(cfg=dict(type=...)), ...]`` entry in a
    config tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f'{where}.{key}'
            if key == 'plugins' and isinstance(value, (list, tuple)):
                for i, entry in enumerate(value):
                    cfg = entry.get('cfg') if isinstance(entry, dict) else None
                    if isinstance(cfg, dict) and 'type' in cfg:
                        yield f'{here}[{i}].cfg.type', cfg['type']
            else:
                yield from _plugin_entries(value, here)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _plugin_entries(value, f'{where}[{i}]')


def check_plugin_types(model_cfg: Any, registry: Registry, owner: str = 'model') -> None:
    """:func:`check_type_name` for the ``type`` of every ``plugins`` entry in ``model_cfg``
    (a model config dict; ``owner`` is its name in the messages)."""
    for where, type_name in _plugin_entries(model_cfg, owner):
        check_type_name(type_name, registry, where)
