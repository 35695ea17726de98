from .aik_mobilenet_v2 import AIKMobileNetV2
from .aik_resnet import AIKResNet
from .aik_resnet_cifar import AIKResNet_CIFAR

__all__ = ['AIKResNet', 'AIKResNet_CIFAR', 'AIKMobileNetV2']
