from .cifar_resnet import CifarResNet
from . import mobilenetv2_cifar  # registers mobilenetv2_100_cifar
from .airbench import AirbenchNet, init_whitening  # registers airbench94_cifar, airbench_{desktop,mobile}_cifar
