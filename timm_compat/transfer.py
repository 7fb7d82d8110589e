"""Faster transfer learning by reusing a compatible target head (Gygli et al. 2021, Sec. 5.3).

Standard transfer learning puts a new, randomly initialised head on a source extractor and fine-tunes. When the
target model (extractor + head) and the candidate source extractors were all trained against one frozen RP
interface, the target head fits every source extractor directly: each source is worth something at step 0, before
any fine-tuning, and the step-0 accuracy ranks the candidates without fine-tuning each one.

:func:`transfer` swaps every source extractor under the target head and fine-tunes the recombined model, measuring
average class accuracy at the given steps (Fig. 5). Its baselines: a re-initialised head on the same extractor
(``reinit_head=True``), and components trained independently (a separate call with the independent target model and
sources and ``on_mismatch="force"``). Sources of another interface are refused unless stitched or forced.
"""
import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Sequence, Tuple

import torch.nn.functional as F

from ._hub import Component, ComponentError
from .evaluation import average_class_accuracy
from .compatible import CompatibleModel
from .components import Extractor, Head
from .data import EpochSampler, ImageData, augment as augment_batch, normalize
from .stitching import StitchedModel, check_task_data, fit_stitch
from .optim import make_optimizer

__all__ = ['TransferCurve', 'TransferResult', 'transfer', 'MISMATCH_POLICIES']

MISMATCH_POLICIES = ('error', 'stitch', 'force')
# Curve modes that keep the target head, the ones a ranking of sources is about.
_TARGET_HEAD_MODES = ('recombined', 'stitched')


@dataclass
class TransferCurve:
    """Accuracy of one source extractor on the target task along fine-tuning.

    Attributes:
        source: Name of the source extractor.
        mode: ``"recombined"`` (the target head, directly), ``"stitched"`` (the target head behind a fitted stitch;
            step 0 is after fitting it) or ``"reinit_head"`` (a freshly initialised head of the same architecture).
        compatible: Whether the source extractor shares the target head's interface.
        steps: Fine-tuning steps at which accuracy was measured.
        accuracy: Average class accuracy on the target test set at each of ``steps``, in ``[0, 1]``.
        seconds: Wall time of the curve: fine-tuning, evaluation and, for ``"stitched"``, fitting the stitch.
    """
    source: str
    mode: str
    compatible: bool
    steps: List[int]
    accuracy: List[float]
    seconds: float


@dataclass
class TransferResult:
    """Every curve of one :func:`transfer` call, and the ranking of its sources."""
    curves: List[TransferCurve] = field(default_factory=list)

    def curve(self, source: str, mode: str = 'recombined') -> TransferCurve:
        for c in self.curves:
            if (c.source, c.mode) == (source, mode):
                return c
        raise KeyError(f'No {mode!r} curve for source {source!r}; there are '
                       f'{[(c.source, c.mode) for c in self.curves]}.')

    def ranking(self, step: int = 0) -> List[Tuple[str, float]]:
        """Sources by accuracy with the target head at ``step`` (default: directly after recombination), best first.

        Raises:
            ValueError: ``step`` is not one of the measured steps.
        """
        ranked = []
        for c in self.curves:
            if c.mode in _TARGET_HEAD_MODES:
                if step not in c.steps:
                    raise ValueError(f'Step {step} was not measured; the curves have steps {c.steps}.')
                ranked.append((c.source, c.accuracy[c.steps.index(step)]))
        return sorted(ranked, key=lambda item: -item[1])

    def to_dict(self) -> Dict[str, object]:
        return {'curves': [asdict(c) for c in self.curves]}


def _copy(component: Component) -> Component:
    """A deep copy that keeps sharing the component's interface, a reference rather than part of its weights."""
    interface = component.__dict__.get('interface')
    return copy.deepcopy(component, memo={id(interface): interface} if interface is not None else None)


def _fresh_head(head: Head) -> Head:
    """A head of the same architecture with new initial weights, on the same device."""
    device = next(head.parameters()).device
    try:
        return type(head).from_config(head.component_config()).to(device)
    except ComponentError:  # a custom head module: no config rebuilds it, so reset every layer in place
        fresh = _copy(head)
        for module in fresh.modules():
            if hasattr(module, 'reset_parameters'):
                module.reset_parameters()
        return fresh


def _check_steps(steps: Sequence[int]) -> List[int]:
    steps = sorted(set(int(s) for s in steps))
    if not steps or steps[0] < 0:
        raise ValueError(f'steps must be non-negative fine-tuning step counts such as (0, 10, 100), got {steps}.')
    return steps


def _check_sources(sources: Mapping[str, Extractor], head: Head, on_mismatch: str) -> Dict[str, bool]:
    """Whether each source shares the head's interface; refuses mismatches the policy does not allow."""
    if on_mismatch not in MISMATCH_POLICIES:
        raise ValueError(f'Unknown on_mismatch {on_mismatch!r}: use one of {MISMATCH_POLICIES}.')
    if not sources:
        raise ValueError('No source extractors: pass sources={"name": extractor, ...}.')
    shared = {name: head.interface_id is not None and e.interface_id == head.interface_id
              for name, e in sources.items()}
    others = {name: sources[name].interface_id for name, ok in shared.items() if not ok}
    if others and on_mismatch == 'error':
        shared_with = (f'the target head\'s interface {head.interface_id}' if head.interface_id is not None else
                       'an interface with the target head, which was trained without one')
        raise ValueError(
            f'Sources {others} (name: interface id) do not share {shared_with}, so the head is not known to fit '
            f'them. Pass on_mismatch="stitch" to fit a 1x1-conv stitch for each first, or on_mismatch="force" to '
            f'recombine them anyway (the baseline of independently trained components).')
    if on_mismatch == 'force':
        narrow = {name: sources[name].width for name in others if sources[name].width != head.width}
        if narrow:
            raise ValueError(f'Sources {narrow} (name: width) emit another width than the head\'s {head.width}, '
                             f'so they cannot be recombined even by force: use on_mismatch="stitch".')
    return shared


def _finetune_curve(model: CompatibleModel, train: ImageData, test: ImageData, steps: List[int], *,
                    batch_size: int, lr: float, momentum: float, weight_decay: float, augment: bool,
                    eval_batch_size: int, bn: str, seed: int) -> List[float]:
    """Accuracy at each of ``steps`` while fine-tuning every parameter of ``model`` on the task loss.

    No optimiser exists until a step above 0 is asked for, so step 0 is the model exactly as given. The learning
    rate is constant, so that the accuracy at step ``k`` does not depend on how far the curve goes.
    """
    accuracies = [average_class_accuracy(model, test, eval_batch_size, bn)] if steps[0] == 0 else []
    if steps[-1] == 0:
        return accuracies
    params = list(model.parameters())
    optimizer = make_optimizer(params, 'sgd', lr, momentum, weight_decay)
    sampler = EpochSampler(len(train), batch_size, seed)
    cfg = model.extractor.pretrained_cfg
    step = 0
    for target in (s for s in steps if s > 0):
        model.train()
        while step < target:
            index = sampler.batch(step).to(train.images.device)
            batch = augment_batch(train.images[index]) if augment else train.images[index]
            loss = F.cross_entropy(model(normalize(batch, cfg['mean'], cfg['std'])), train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        accuracies.append(average_class_accuracy(model, test, eval_batch_size, bn))
    return accuracies


def transfer(target_model: CompatibleModel, sources: Mapping[str, Extractor], train_data: ImageData,
             test_data: ImageData, steps: Sequence[int] = (0, 10, 100, 1000), *, reinit_head: bool = False,
             on_mismatch: str = 'error', stitch_steps: int = 500, batch_size: int = 64, lr: float = 0.01,
             momentum: float = 0.9, weight_decay: float = 5e-4, augment: bool = True, eval_batch_size: int = 250,
             bn: str = 'batch', seed: int = 0) -> TransferResult:
    """Swap each source extractor under the target head; measure accuracy at step 0 and along fine-tuning.

    Every curve fine-tunes its own copies of the components (extractor, head and any stitch, all trained), so the
    caller's components never change and the curves do not influence each other. Step 0 is measured before any
    optimiser exists.

    Args:
        target_model: The target task's model; only its head is used.
        sources: Name -> candidate source extractor (loaded from disk or the Hub, or in memory).
        train_data: Labelled target training data, classes in the head's order.
        test_data: Labelled target test data, classes in the head's order.
        steps: Fine-tuning steps at which to measure accuracy; include 0 for the accuracy directly after
            recombination, which ranks the sources.
        reinit_head: Also fine-tune each source with a freshly initialised head of the target head's architecture
            (the standard transfer-learning baseline).
        on_mismatch: For sources that do not share the target head's interface: ``"error"`` (refuse, before any
            work is done), ``"stitch"`` (fit a 1x1-conv stitch with :func:`~timm_compat.stitching.fit_stitch` for
            ``stitch_steps`` steps on ``train_data`` first) or ``"force"`` (recombine directly, as for the baseline of
            independently trained components).
        stitch_steps: Steps of stitch fitting, for ``on_mismatch="stitch"``.
        batch_size: Fine-tuning batch size.
        lr: Constant learning rate of SGD with Nesterov momentum.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        augment: Pad-and-crop and flip the training images.
        eval_batch_size: Evaluation batch size (it matters with ``bn="batch"``).
        bn: BN statistics at evaluation: ``"batch"`` (test-time, the paper's choice for recombined components) or
            ``"running"``.
        seed: Seed of the order in which training images are drawn; augmentation uses the global RNG.

    Returns:
        A :class:`TransferResult`; ``result.ranking()`` orders the sources by step-0 accuracy.

    Raises:
        ValueError: Sources of another interface with ``on_mismatch="error"``, widths that only a stitch can join,
            data of another task, or bad ``steps``.
    """
    head = target_model.head
    shared = _check_sources(sources, head, on_mismatch)
    steps = _check_steps(steps)
    check_task_data(train_data, head, 'train_data')
    check_task_data(test_data, head, 'test_data')
    device = next(head.parameters()).device
    train = train_data.to(device)
    options = dict(batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay, augment=augment,
                   eval_batch_size=eval_batch_size, bn=bn, seed=seed)
    result = TransferResult()
    for name, source in sources.items():
        start = time.time()
        extractor = _copy(source).to(device)
        if shared[name] or on_mismatch == 'force':
            mode, model = 'recombined', CompatibleModel(extractor, _copy(head))
        else:
            mode = 'stitched'
            fitted = fit_stitch(extractor, head, train, stitch_steps, batch_size=batch_size, augment=augment,
                                seed=seed)
            model = StitchedModel(extractor, fitted.stitch, _copy(head))
        accuracy = _finetune_curve(model, train, test_data, steps, **options)
        result.curves.append(TransferCurve(name, mode, shared[name], steps, accuracy, time.time() - start))
        if reinit_head:
            start = time.time()
            model = CompatibleModel(_copy(source).to(device), _fresh_head(head))
            accuracy = _finetune_curve(model, train, test_data, steps, **options)
            result.curves.append(TransferCurve(name, 'reinit_head', shared[name], steps, accuracy,
                                               time.time() - start))
    return result
