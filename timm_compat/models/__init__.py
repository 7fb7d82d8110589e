from .cifar_resnet import CifarResNet
from . import mobilenetv2_cifar  # registers mobilenetv2_100_cifar
