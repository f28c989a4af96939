# VOLO-D4 on ImageNet-1k at 224x224: the D1 recipe (volo_d1_imagenet.py) with lr 1.0e-3 and
# drop path 0.5, from the paper's model-settings table (the release README has commands
# for D1-D3 only; see docs/volo.md).
_base_ = './volo_d1_imagenet.py'

model = dict(model_name='volo_d4', drop_path_rate=0.5)
base_lr = 1.0e-3
optim_wrapper = dict(optimizer=dict(lr=base_lr))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6 / base_lr, by_epoch=True, begin=0, end=20,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=20, end=300),
]
