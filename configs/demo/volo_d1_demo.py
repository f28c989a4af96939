# A few CPU iterations of VOLO-D1 on the embedded demo images (ImageNet-style folders
# data/demo/imagenet/{train,val}/<class>/*.png written by tools/make_demo_data.py):
#   python tools/make_demo_data.py && python tools/train.py configs/demo/volo_d1_demo.py
# Same model and optimiser as volo_d1_imagenet.py; only the data, image size, batch size
# and schedule change.
_base_ = '../volo_d1_imagenet.py'

img_size = 64
num_classes = 4  # classes written by tools/make_demo_data.py
data_root = 'data/demo/imagenet'
model = dict(num_classes=num_classes, img_size=img_size)
data_preprocessor = dict(num_classes=num_classes)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=img_size, backend='pillow', interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=img_size, edge='short', backend='pillow',
         interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=img_size),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, data_prefix='train',
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(_delete_=True, type='CustomDataset', data_root=data_root, data_prefix='val',
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator

optim_wrapper = dict(optimizer=dict(lr=1e-4))
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end=4)]
train_cfg = dict(_delete_=True, by_epoch=False, max_iters=4, val_interval=4)
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=1),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=4, max_keep_ckpts=1))
auto_scale_lr = dict(enable=False, base_batch_size=1024)
log_processor = dict(by_epoch=False)
