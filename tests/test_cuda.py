"""What only a CUDA device can show: the model, the on-device batch builder and train.py on the GPU agree with the
CPU. Marked ``cuda`` and skipped without a CUDA device; ``benchmarks/device_check.py`` runs them on a GPU."""
import pytest
import torch

import timm_compat as tc
import train
from timm_compat.data import ImageData, training_batch
from tests.conftest import REPO

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device'),
              pytest.mark.usefixtures('fresh_accelerate')]
CUDA = torch.device('cuda')


def test_a_compatible_model_gives_the_same_logits_on_the_gpu_as_on_the_cpu():
    interface = tc.Interface(width=32, rp=True)
    model = tc.make_compatible('resnet8_cifar', split='layer2', interface=interface, num_classes=10, init_seed=0).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = model.to(CUDA)(x.to(CUDA)).cpu()
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-3)  # TF32 matmuls and cuDNN kernels differ a little


def test_training_batches_are_built_on_the_device_and_match_the_cpu_ones():
    g = torch.Generator().manual_seed(0)
    data = ImageData(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g),
                     torch.arange(64) % 10, [str(i) for i in range(10)])
    index = torch.randperm(64, generator=g)[:16]
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    images, labels = training_batch(data.to(CUDA), index.to(CUDA), mean, std, augment_images=False)
    assert images.device.type == 'cuda' and labels.device.type == 'cuda'
    expected, expected_labels = training_batch(data, index, mean, std, augment_images=False)
    assert torch.allclose(images.cpu(), expected) and torch.equal(labels.cpu(), expected_labels)


def test_train_py_trains_on_the_gpu_and_its_components_load_on_the_cpu(tmp_path):
    summary = train.main(['-c', str(REPO / 'tests' / 'tiny.yaml'), '--output-dir', str(tmp_path / 'run')])
    assert summary['device'].startswith('cuda')
    components = tmp_path / 'run' / 'main' / 'components'
    extractor = tc.Extractor.from_pretrained(components / 'a' / 'extractor', map_location='cpu')
    assert all(p.device.type == 'cpu' for p in extractor.parameters())


@pytest.mark.parametrize('deterministic', [False, True])
def test_train_py_sets_cudnn_for_speed_or_for_bit_identical_reruns(tmp_path, deterministic):
    train.main(['-c', str(REPO / 'tests' / 'tiny.yaml'), '--output-dir', str(tmp_path / 'run'), '--set',
                f'deterministic={str(deterministic).lower()}'])
    assert torch.backends.cudnn.deterministic is deterministic
    assert torch.backends.cudnn.benchmark is not deterministic
