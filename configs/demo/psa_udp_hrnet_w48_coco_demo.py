# configs/psa_udp_hrnet_w48_coco_256x192.py (UDP-Pose HRNet-W48 with 104 parallel PSA
# blocks, unchanged architecture) on the embedded COCO-keypoints demo data
# (`python tools/make_demo_data.py`: 32 train images with 47 persons, 8 val images with 13;
# every keypoint is a visible disc of its own colour).
# Only the data root, the input size (128x96 instead of 256x192; mmpose's HRNet needs sizes
# divisible by 32), the augmentation strength, the learning rate and the schedule differ:
# 6 epochs at batch 4 (72 iterations), evaluated with mmpose's CocoMetric (COCO keypoint
# AP, xtcocotools) on ground-truth boxes every 2 epochs (measured: AP 0.00, 0.93, 0.98); one
# checkpoint is kept (the latest, with the optimiser state, so --resume works). No ImageNet
# initialisation (nothing is downloaded).
_base_ = ['../psa_udp_hrnet_w48_coco_256x192.py']

data_root = 'data/demo/coco/'
codec = dict(type='UDPHeatmap', input_size=(96, 128), heatmap_size=(24, 32), sigma=2)
model = dict(backbone=dict(init_cfg=None), head=dict(decoder=codec))

train_pipeline = [
    dict(type='LoadImage'),
    dict(type='GetBBoxCenterScale'),
    dict(type='RandomFlip', direction='horizontal'),
    dict(type='RandomHalfBody'),
    # milder than the stock setting (up to 80 degrees): the demo's persons stand upright
    dict(type='RandomBBoxTransform', rotate_factor=30.0, scale_factor=(0.75, 1.25)),
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

optim_wrapper = dict(optimizer=dict(lr=1e-3))
max_epochs = 6
train_cfg = dict(max_epochs=max_epochs, val_interval=2)
param_scheduler = [
    dict(type='LinearLR', begin=0, end=10, start_factor=0.001, by_epoch=False),
    dict(type='MultiStepLR', begin=0, end=max_epochs, milestones=[5], gamma=0.1, by_epoch=True),
]
default_hooks = dict(
    logger=dict(interval=5),
    checkpoint=dict(interval=2, max_keep_ckpts=1, save_best=None))
randomness = dict(seed=0)
