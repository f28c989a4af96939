# VOLO-D1 (arXiv 2106.13112) on ImageNet-1k at 224x224, trained with mmpretrain's tools through
# its TimmClassifier (timm model `volo_d1`, registered by `import mmattn`).
# Recipe of the official release (sail-sg/volo, main.py defaults + README command for D1):
# 8 GPUs x 128 = batch 1024, AdamW (lr 1.6e-3, weight decay 0.05, no decay on norms, biases,
# pos_embed, cls_token), 20 warm-up epochs from 1e-6, cosine to 1e-5 at epoch 300, 10 cool-down
# epochs, label smoothing 0.1, drop path 0.1, RandAugment rand-m9-mstd0.5-inc1, random erasing
# 0.25 (per-pixel), bicubic, test crop ratio 0.96.
# NOT included: token labelling (dense score-map targets from the release's annotator,
# MixToken, TokenLabelCrossEntropy); see docs/volo.md.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmattn'], allow_failed_imports=False)

img_size = 224
model = dict(
    type='TimmClassifier',
    model_name='volo_d1',
    pretrained=False,
    num_classes=1000,
    img_size=img_size,
    drop_path_rate=0.1,
    loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
)

bgr_mean = [103.53, 116.28, 123.675]
bgr_std = [57.375, 57.12, 58.395]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=img_size, backend='pillow', interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='RandAugment', policies='timm_increasing', num_policies=2, total_level=10,
         magnitude_level=9, magnitude_std=0.5,
         hparams=dict(pad_val=[round(x) for x in bgr_mean], interpolation='bicubic')),
    dict(type='RandomErasing', erase_prob=0.25, mode='rand', min_area_ratio=0.02,
         max_area_ratio=1 / 3, fill_color=bgr_mean, fill_std=bgr_std),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=int(img_size / 0.96), edge='short', backend='pillow',
         interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=img_size),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=128, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(batch_size=128, dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

base_lr = 1.6e-3
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=base_lr, weight_decay=0.05, eps=1e-8, betas=(0.9, 0.999)),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, flat_decay_mult=0.0,
                       custom_keys={'pos_embed': dict(decay_mult=0.0),
                                    'cls_token': dict(decay_mult=0.0)}),
    clip_grad=None,
)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6 / base_lr, by_epoch=True, begin=0, end=20,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=20, end=300),
]
train_cfg = dict(by_epoch=True, max_epochs=310, val_interval=1)
# 8 GPUs x 128; with another total batch the lr is scaled linearly (--auto-scale-lr)
auto_scale_lr = dict(base_batch_size=1024)
# cuDNN's algorithm search for the fixed-size crops, as the release's main.py sets
# torch.backends.cudnn.benchmark (mmpretrain's default runtime leaves it off)
env_cfg = dict(cudnn_benchmark=True)
