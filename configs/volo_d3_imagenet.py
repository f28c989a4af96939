# VOLO-D3 on ImageNet-1k at 224x224: the D2 recipe
# (volo_d2_imagenet.py: the D1 recipe at lr 1.0e-3) with the
# release README's D3 settings (lr 1.0e-3, drop path 0.5).
_base_ = './volo_d2_imagenet.py'

model = dict(model_name='volo_d3', drop_path_rate=0.5)
