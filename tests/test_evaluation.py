"""Evaluation: independent of the stored order of the test set, per-component devices, both own accuracies.

The models are tiny hand-built networks whose every prediction is known: an extractor that is one BatchNorm layer
and a head that reads the sign of the normalised brightness. With batch statistics, a batch holding both classes
is classified perfectly, while a batch of one class is normalised by its own mean and classified at chance.
"""
import re

import pytest
import torch
from torch import nn
from tqdm.auto import tqdm

from timm_compat.data import ImageData, evaluation_batches
from timm_compat.evaluation import (
    _row_correct, accuracy, average_class_accuracy, format_matrix, per_class_accuracy, recombination_matrix)

CLASSES = ['dark', 'light']


class BrightnessExtractor(nn.Module):
    pretrained_cfg = {'mean': (0.5, 0.5, 0.5), 'std': (0.25, 0.25, 0.25)}

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x)


class BrightnessHead(nn.Module):
    """Logits ``[-z, z, *extra]`` for mean normalised brightness ``z``; ``extra`` are constant logits."""

    def __init__(self, class_names=CLASSES, extra=()):
        super().__init__()
        self.class_names = list(class_names)
        self.register_buffer('extra', torch.tensor(extra, dtype=torch.float32))

    def forward(self, features):
        z = features.mean((1, 2, 3))[:, None]
        return torch.cat([-z, z, self.extra.expand(len(z), -1)], 1)


class Net(nn.Module):
    def __init__(self, head=None):
        super().__init__()
        self.extractor, self.head = BrightnessExtractor(), head or BrightnessHead()

    def forward(self, x):
        return self.head(self.extractor(x))


def sorted_data(per_class=100, class_names=CLASSES):
    """Class 0 dark, class 1 light, stored sorted by class as imagefolder data is."""
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(-10, 11, (2 * per_class, 1, 1, 1), generator=g)
    labels = torch.arange(2).repeat_interleave(per_class)
    images = (80 + 96 * labels.view(-1, 1, 1, 1) + noise).expand(-1, 3, 4, 4).to(torch.uint8)
    return ImageData(images.contiguous(), labels, list(class_names))


def shuffled(data, seed=5):
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return ImageData(data.images[order], data.labels[order], data.class_names)


def in_order_accuracy(model, data, batch_size):
    """What evaluation in stored order would score: the bias the seeded permutation removes."""
    model.eval()
    model.extractor.bn.train()  # batch statistics
    with torch.no_grad():
        correct = sum((model(((x.float() / 255 - 0.5) / 0.25)).argmax(1) == y).sum().item()
                      for x, y in zip(data.images.split(batch_size), data.labels.split(batch_size)))
    return correct / len(data)


def test_accuracy_does_not_depend_on_the_stored_order():
    model, data = Net(), sorted_data()
    assert in_order_accuracy(model, data, 40) < 0.75  # the stand-in is sensitive to class-homogeneous batches
    for seed in (0, 1, 2):
        assert accuracy(model, data, 40, seed=seed) == accuracy(model, shuffled(data), 40, seed=seed) == 1.0
    assert average_class_accuracy(model, data, 40) == 1.0
    assert per_class_accuracy(model, data, 40).tolist() == [1.0, 1.0]


def test_recombination_matrix_does_not_depend_on_the_stored_order():
    models, data = [Net(), Net()], sorted_data()
    matrix = recombination_matrix(models, [data, shuffled(data)], batch_size=40)
    assert matrix.tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_common_classes_are_matched_up_to_synonyms_and_a_missing_one_is_named():
    models, tests = [Net(), Net()], [sorted_data(), sorted_data()]
    assert recombination_matrix(models, tests, 40, common=['Dark', 'LIGHT']).tolist() == [[1.0, 1.0], [1.0, 1.0]]
    grey = sorted_data(class_names=['dark', 'grey'])  # network 1's test set has no 'light'
    with pytest.raises(ValueError, match=r"test set 1 lacks \['light'\]: pass common= classes that all"):
        recombination_matrix(models, [tests[0], grey], 40, common=['dark', 'light'])
    with pytest.raises(ValueError, match=r"head 1 lacks \['grey'\]"):  # a head that cannot predict a common class
        recombination_matrix([Net(BrightnessHead(['dark', 'grey'])), Net()], [grey, grey], 40)


def test_diagonal_is_common_class_accuracy_and_own_accuracy_is_all_class():
    # Network 0 has a third class that its head always predicts; network 1 knows only the common two.
    three = ['dark', 'light', 'grey']
    models = [Net(BrightnessHead(three, extra=(5.0,))), Net()]
    tests = [sorted_data(class_names=three), sorted_data()]
    matrix = recombination_matrix(models, tests, batch_size=40)
    own = [accuracy(m, d, 40) for m, d in zip(models, tests)]
    assert matrix[0, 0].item() == 1.0 and own == [0.0, 1.0]  # argmax among the common classes on the diagonal
    table = format_matrix(matrix, ['a', 'b'], own=own)
    rows = table.splitlines()
    assert 'own, all classes' in rows[0]
    assert rows[1].split() == ['a', '100.0', '100.0', '0.0'] and rows[2].split()[-1] == '100.0'
    assert 'mean own, common classes (diagonal): 100.0 %' in table and 'mean own, all classes: 50.0 %' in table
    with pytest.raises(ValueError, match='one per network'):
        format_matrix(matrix, ['a', 'b'], own=[1.0])


def test_each_component_is_fed_on_its_own_device():
    """A head on another device than the extractor (here 'meta', the one second device a CPU has) gets the features
    moved to it, and the count of a head stays where the head is."""
    data, cpu_net, meta_head = sorted_data(), Net(), BrightnessHead().to('meta')
    counts = _row_correct(cpu_net, [meta_head, cpu_net.head], [[0, 1], [0, 1]], data, 40, 'batch', 0,
                          tqdm(disable=True))
    assert counts[0].device.type == 'meta' and counts[1].device.type == 'cpu'
    assert int(counts[1]) == len(data)



def test_a_matrix_shows_one_bar_counting_every_evaluation_batch(capsys):
    # 2 rows of 200 images in batches of 64: ceil(200 / 64) = 4 batches each, the total known from the start.
    data = sorted_data()
    recombination_matrix([Net(), Net()], [data, shuffled(data)], batch_size=64)
    bar = capsys.readouterr().err
    # The first display already shows the total; later ones depend on tqdm's refresh interval.
    assert 'recombination matrix (BN=batch)' in bar and ' 0/8 ' in bar

def test_models_without_weights_are_refused_by_name():
    on_meta = Net().to('meta')
    with pytest.raises(ValueError, match=r'Models \[1\] have tensors on the meta device.*load them first'):
        recombination_matrix([Net(), on_meta], [sorted_data(), sorted_data()], batch_size=40)
    with pytest.raises(ValueError, match='meta device'):
        accuracy(on_meta, sorted_data())


def test_data_whose_classes_the_head_orders_otherwise_is_refused_not_scored():
    # Labels index the head's outputs: STL-10 and CIFAR-10 list shared classes in other orders, so data of the
    # head's classes in another order would be scored against the wrong outputs (here every image, 0 %).
    model, data = Net(), sorted_data()
    assert accuracy(model, data, 50) == 1.0
    relabelled = ImageData(data.images, 1 - data.labels, ['light', 'dark'])  # the same images, classes swapped
    for score in (accuracy, per_class_accuracy, average_class_accuracy):
        with pytest.raises(ValueError, match=r"lists its classes as \['light', 'dark'\], the head as \['dark', "
                                             r"'light'\].*select_classes\(head.class_names\)"):
            score(model, relabelled, 50)
    synonyms = Net(BrightnessHead(['Dark', 'light']))  # canonical names match: scored as before
    assert accuracy(synonyms, data, 50) == 1.0


def test_a_small_test_set_is_one_batch_in_stored_order():
    assert [b.tolist() for b in evaluation_batches(5, 8)] == [[0, 1, 2, 3, 4]]
    assert evaluation_batches(0, 8) == []


@pytest.mark.parametrize('common', [['dark', 'dark'], ['dark', 'light', 'Dark']])
def test_recombination_refuses_a_class_named_twice_in_common(common):
    models, data = [Net(), Net()], sorted_data()
    with pytest.raises(ValueError, match=r"common names the class 'dark' twice"):
        recombination_matrix(models, [data, data], 40, common=common)


class ForwardOnly(nn.Module):
    """A model with an extractor and a forward but no ``head`` attribute, as the docstring of accuracy allows."""

    def __init__(self):
        super().__init__()
        self.extractor, self._head = BrightnessExtractor(), BrightnessHead()

    def forward(self, x):
        return self._head(self.extractor(x))


def test_accuracy_scores_a_model_that_has_no_head_attribute():
    assert accuracy(ForwardOnly(), sorted_data(), 40) == 1.0


def test_recombination_refuses_a_test_set_count_other_than_the_model_count():
    data = sorted_data()
    with pytest.raises(ValueError, match=r'3 models but 2 test sets'):
        recombination_matrix([Net(), Net(), Net()], [data, data], 40)


def test_recombination_refuses_a_test_set_without_images_of_the_common_classes():
    data = sorted_data()
    only_light = data.select_classes(['light'])
    two = ImageData(only_light.images, only_light.labels + 1, CLASSES)  # names both classes, holds only 'light'
    with pytest.raises(ValueError, match=r'test set 0 has no images of the common classes'):
        recombination_matrix([Net(), Net()], [two, data], 40, common=['dark'])


def test_accuracy_refuses_empty_data():
    empty = ImageData(torch.zeros(0, 3, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), CLASSES)
    with pytest.raises(ValueError, match=r'no images'):
        accuracy(Net(), empty, 40)


def test_format_matrix_refuses_a_matrix_of_another_size_than_names():
    with pytest.raises(ValueError, match=r'2 x 2 matrix for 1 names'):
        format_matrix(torch.eye(2), ['a'])


def test_format_matrix_aligns_long_names_with_their_columns():
    names = ['a_network_with_a_long_name', 'b']
    lines = format_matrix(torch.eye(2), names).splitlines()
    # Each value ends where its column's header ends: a name longer than the label column shifted its row right.
    header, row = lines[0], lines[1]
    ends = [header.index(n, len('extractor \\ head')) + len(n) for n in names]
    assert [m.end() for m in re.finditer(r'\d+\.\d', row[len(names[0]):])] == [e - len(names[0]) for e in ends]


def test_recombination_benchmark_runs_and_its_two_ways_agree(import_script):
    # benchmarks/recombination_eval.py scores its naive way through accuracy() on a model without a head attribute.
    result = import_script('benchmarks', 'recombination_eval').main(
        ['--networks', '2', '--per-class', '3', '--train-steps', '1', '--repeats', '1', '--batch-size', '8',
         '--threads', '1', '--device', 'cpu'])
    assert result['difference'] == 0.0 and result['ideal'] > 1.0
