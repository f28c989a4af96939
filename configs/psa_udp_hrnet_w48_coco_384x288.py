# PSA (parallel layout) in every BasicBlock of UDP-Pose HRNet-W48, COCO keypoints 384x288.
# 79.5 AP (COCO val) reported by the PSA authors -- taken from there, not reproduced here.
# Only the backbone changes: the stock config's codec, data, schedule, head and ImageNet
# init (hrnet_w48-8ef0771d.pth, which loads with only the PSA keys missing) are kept.
#
# Placement (the official release): one PSA after conv1 + BN + ReLU of every BasicBlock,
# i.e. 'after_conv1' in stages 2-4 (stage 1 is Bottlenecks): 8 + 48 + 48 = 104 blocks with
# in_channels = the branch width (48/96/192/384).
#
# variant='official': the reported numbers (and the released weights) come from the
# authors' code, whose PSA differs from the paper's equations (e.g. PSA_p has no LayerNorm
# in its channel branch). 'official' is the module those numbers were measured with;
# variant='paper' follows the equations instead.
_base_ = ['mmpose::body_2d_keypoint/topdown_heatmap/coco/td-hm_hrnet-w48_udp-8xb32-210e_coco-384x288.py']
custom_imports = dict(imports=['mmattn'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='mmattn.PosePluginHRNet',
        plugins=[
            dict(
                cfg=dict(type='mmattn.PolarizedSelfAttention', mode='parallel',
                         variant='official'),
                position='after_conv1',
                stages=(False, True, True, True)),
        ]))
