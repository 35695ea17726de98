# Plain twin of aik-resnet50_8xb32_in1k.py: MMPretrain's own recipe.
_base_ = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'
