"""What a user expects of the repository: the licence setup.py declares, a changelog that
knows the current version, and the PEP 561 marker that makes type checkers read our hints."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import mmattn

ROOT = Path(__file__).resolve().parents[1]


def _setup_kwargs() -> dict:
    """The literal keyword arguments of the ``setup(...)`` call in setup.py."""
    tree = ast.parse((ROOT / 'setup.py').read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, 'id', None) == 'setup')
    kwargs = {}
    for kw in call.keywords:
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            pass
    return kwargs


def test_license_file_is_the_declared_license() -> None:
    assert _setup_kwargs()['license'] == 'Apache-2.0'
    text = (ROOT / 'LICENSE').read_text()
    assert 'Apache License' in text and 'Version 2.0, January 2004' in text
    assert 'TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION' in text
    assert '{yyyy}' not in text   # the appendix's placeholder is filled in


def test_changelog_covers_the_current_version() -> None:
    text = (ROOT / 'CHANGELOG.md').read_text()
    assert '## [Unreleased]' in text
    versions = re.findall(r'^## \[(\d+\.\d+\.\d+)\]', text, flags=re.M)
    assert versions and versions[0] == mmattn.__version__


def test_py_typed_marker_ships_with_the_package() -> None:
    assert (Path(mmattn.__file__).parent / 'py.typed').is_file()
    assert 'py.typed' in _setup_kwargs()['package_data']['mmattn']
