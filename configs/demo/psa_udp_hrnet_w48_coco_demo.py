# configs/psa_udp_hrnet_w48_coco_256x192.py (UDP-Pose HRNet-W48 with 104 parallel PSA
# blocks, unchanged architecture) on the embedded COCO-keypoints demo data
# (`python tools/make_demo_data.py`: 16 train images with 25 persons, 8 val images with 10).
# Only the data root, the input size (128x96 instead of 256x192; mmpose's HRNet needs sizes
# divisible by 32) and the schedule differ: 12 epochs at batch 4, evaluated with mmpose's
# CocoMetric (COCO keypoint AP, xtcocotools) on ground-truth boxes every 6 epochs, a
# checkpoint each time. No ImageNet initialisation (nothing is downloaded).
_base_ = ['../psa_udp_hrnet_w48_coco_256x192.py']

data_root = 'data/demo/coco/'
codec = dict(type='UDPHeatmap', input_size=(96, 128), heatmap_size=(24, 32), sigma=2)
model = dict(backbone=dict(init_cfg=None), head=dict(decoder=codec))

train_pipeline = [
    dict(type='LoadImage'),
    dict(type='GetBBoxCenterScale'),
    dict(type='RandomFlip', direction='horizontal'),
    dict(type='RandomHalfBody'),
    dict(type='RandomBBoxTransform'),
    dict(type='TopdownAffine', input_size=codec['input_size'], use_udp=True),
    dict(type='GenerateTarget', encoder=codec),
    dict(type='PackPoseInputs'),
]
val_pipeline = [
    dict(type='LoadImage'),
    dict(type='GetBBoxCenterScale'),
    dict(type='TopdownAffine', input_size=codec['input_size'], use_udp=True),
    dict(type='PackPoseInputs'),
]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, bbox_file=None, pipeline=val_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/person_keypoints_val2017.json')
test_evaluator = val_evaluator

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs, val_interval=6)
param_scheduler = [
    dict(type='LinearLR', begin=0, end=10, start_factor=0.001, by_epoch=False),
    dict(type='MultiStepLR', begin=0, end=max_epochs, milestones=[10], gamma=0.1, by_epoch=True),
]
default_hooks = dict(logger=dict(interval=5), checkpoint=dict(interval=6, max_keep_ckpts=2))
