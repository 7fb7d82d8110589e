from .cifar_resnet import CifarResNet
