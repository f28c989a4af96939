# PSA (sequential layout) in every BasicBlock of UDP-Pose HRNet-W48, COCO keypoints
# 384x288. 79.4 AP (COCO val) reported by the PSA authors -- taken from there, not
# reproduced here. Only the backbone changes (see psa_udp_hrnet_w48_coco_384x288.py for the
# placement: 104 blocks, 'after_conv1' of every BasicBlock in stages 2-4).
#
# variant='official': the reported numbers (and the released weights) come from the
# authors' code, whose sequential PSA differs from the paper's equations (a
# C/2 -> C/8 -> LN -> ReLU -> C channel bottleneck; the spatial softmax on the values).
_base_ = ['mmpose::body_2d_keypoint/topdown_heatmap/coco/td-hm_hrnet-w48_udp-8xb32-210e_coco-384x288.py']
custom_imports = dict(imports=['mmattn'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='mmattn.PosePluginHRNet',
        plugins=[
            dict(
                cfg=dict(type='mmattn.PolarizedSelfAttention', mode='sequential',
                         variant='official'),
                position='after_conv1',
                stages=(False, True, True, True)),
        ]))
