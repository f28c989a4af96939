# VOLO-D5 on ImageNet-1k at 224x224: the D2 recipe
# (volo_d2_imagenet.py: the D1 recipe at lr 1.0e-3) with lr 1.0e-3 and
# drop path 0.75, from the paper's model-settings table (the release README has commands
# for D1-D3 only; see docs/volo.md).
_base_ = './volo_d2_imagenet.py'

model = dict(model_name='volo_d5', drop_path_rate=0.75)
