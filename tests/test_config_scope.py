"""Configs elsewhere inherit mmattn's configs as `mmattn::...` once mmattn is imported."""
from __future__ import annotations

from pathlib import Path

import mmattn  # noqa: F401  (registers the mmattn:: scope)
from mmengine.config import Config


def test_inherit_an_mmattn_config(tmp_path: Path) -> None:
    cfg_file = tmp_path / 'my_experiment.py'
    cfg_file.write_text("_base_ = ['mmattn::demo/psa_hrnet_ocr_cityscapes_demo.py']\n"
                        'train_cfg = dict(max_iters=7)\n')
    cfg = Config.fromfile(str(cfg_file))
    assert cfg.model.backbone.type == 'mmattn.PluginHRNet'
    assert cfg.model.backbone.plugins[0].cfg.type == 'mmattn.PolarizedSelfAttention'
    assert cfg.train_cfg.max_iters == 7
    assert cfg.train_dataloader.dataset.data_root == 'data/demo/cityscapes/'


def test_other_packages_still_resolve(tmp_path: Path) -> None:
    cfg_file = tmp_path / 'seg.py'
    cfg_file.write_text("_base_ = ['mmseg::_base_/schedules/schedule_80k.py']\n")
    assert Config.fromfile(str(cfg_file)).train_cfg.max_iters == 80000
