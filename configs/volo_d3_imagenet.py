# VOLO-D3 on ImageNet-1k at 224x224: the D1 recipe (volo_d1_imagenet.py) with the
# release README's D3 settings (lr 1.0e-3, drop path 0.5).
_base_ = './volo_d1_imagenet.py'

model = dict(model_name='volo_d3', drop_path_rate=0.5)
base_lr = 1.0e-3
optim_wrapper = dict(optimizer=dict(lr=base_lr))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6 / base_lr, by_epoch=True, begin=0, end=20,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=20, end=300),
]
