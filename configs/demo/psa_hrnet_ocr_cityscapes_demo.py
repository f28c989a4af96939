# The main job's demo: configs/psa_hrnet_ocr_cityscapes.py (HRNetV2-W48 + OCR with 104
# parallel PSA blocks, unchanged architecture) on the embedded Cityscapes-format demo data
# (`python tools/make_demo_data.py`: 16 train / 4 val images of 128x256 with labelTrainIds).
# Only the data root, the crop/resize sizes and the schedule differ: 40 iterations at
# batch 2 on 64x128 crops (about 1 s each on 2 CPU cores), evaluated with mmseg's IoUMetric
# (mIoU) at 20 and 40, a checkpoint at each. No ImageNet initialisation (nothing is
# downloaded). It shows the pipeline working end to end, not a trained model: from scratch,
# 40 iterations do not get a W48 network past predicting the majority classes.
_base_ = ['../psa_hrnet_ocr_cityscapes.py']

data_root = 'data/demo/cityscapes/'
crop_size = (64, 128)
scale = (256, 128)
model = dict(pretrained=None, data_preprocessor=dict(size=crop_size))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=scale, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

max_iters = 40
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=20)
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=20, max_keep_ckpts=2),
    visualization=dict(draw=False))
