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
import contextlib
import copy
import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .compatible import CompatibleModel, fit_problems, mismatch_message
from .component import Component, ComponentError
from .components import Extractor, Head
from .batchnorm import BN_MODES
from .deployment import bn_accuracy_report
from .evaluation import average_class_accuracy
from .data import EpochSampler, ImageData, augment as augment_batch, normalize, steps_per_epoch
from .fit import ClassificationTask, check_mixed_precision, fit
from .stitching import StitchedModel, check_float32, check_task_data, fit_stitch
from .optim import make_optimizer
from .streaming import materialize

__all__ = ['TransferCurve', 'TransferResult', 'transfer', 'curve_seed', 'MISMATCH_POLICIES']

MISMATCH_POLICIES = ('error', 'stitch', 'force')
_MISMATCH_REMEDY = ('Pass on_mismatch="stitch" to fit a 1x1-conv stitch for each first, or on_mismatch="force" to '
                    'recombine them anyway (the baseline of independently trained components).')
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
        accuracy: Average class accuracy on the target test set at each of ``steps``, in ``[0, 1]``, with the BN
            statistics :func:`transfer` was asked for (``bn``, batch statistics by default).
        seconds: Wall time of the curve: fine-tuning, evaluation and, for ``"stitched"``, fitting the stitch.
        accuracy_by_bn: The same under each BN mode, ``{"batch": [...], "running": [...]}``: batch statistics are
            the paper's evaluation, running statistics what the fine-tuned model gets when deployed.
    """
    source: str
    mode: str
    compatible: bool
    steps: List[int]
    accuracy: List[float]
    seconds: float
    accuracy_by_bn: Dict[str, List[float]] = field(default_factory=dict)


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


def _fresh_head(head: Head, width: int) -> Head:
    """A head of the same architecture with new initial weights, reading features ``width`` channels wide (a
    stitched source's own), on the same device."""
    device = next(head.parameters()).device
    try:
        return type(head).from_config({**head.component_config(), 'width': width}).to(device)
    except ComponentError:  # a custom head module: no config rebuilds it, so reset every layer in place
        if width != head.width:
            raise ValueError(f'reinit_head: the head is a custom module that cannot be rebuilt for a source '
                             f'{width} channels wide (it reads {head.width}): give sources of its width.') from None
        fresh = _copy(head)
        for module in fresh.modules():
            if hasattr(module, 'reset_parameters'):
                module.reset_parameters()
        return fresh


def curve_seed(seed: int, source: str, mode: str) -> int:
    """The seed of the global RNG draws (augmentation, a fresh head's or a stitch's initial weights) of one curve.

    A function of ``(seed, source, mode)`` alone, hashed with SHA-256 rather than ``hash()`` (salted per process
    for strings), so that a curve is the same in every process whichever sources come before it.
    """
    digest = hashlib.sha256(f'{seed}\0{source}\0{mode}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') >> 1  # 63 bits: any torch.manual_seed takes it


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global CPU RNG (and ``device``'s, on CUDA) seeded with ``seed`` inside, restored to the caller's after."""
    cuda = [device] if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for d in cuda:  # only this device's generator: the caller's other GPUs keep their state
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        yield


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
    shared = {name: not fit_problems(e, head, probe=False) for name, e in sources.items()}
    if on_mismatch != 'stitch':
        # Forced sources are recombined anyway: only what force cannot join (another width) is refused.
        force = on_mismatch == 'force'
        refused = [f'source {name!r}: {"; ".join(problems)}' for name, e in sources.items()
                   if (problems := fit_problems(e, head, force=force, probe=False))]
        if refused:
            raise ValueError(mismatch_message(refused, 'Use on_mismatch="stitch": a stitch joins other widths.'
                                              if force else _MISMATCH_REMEDY))
    return shared


def _check_call(head: Head, sources: Mapping[str, Extractor], train_data: ImageData, test_data: ImageData,
                steps: Sequence[int], *, reinit_head: bool, on_mismatch: str, batch_size: int, bn: str,
                mixed_precision: str) -> Tuple[Dict[str, bool], List[int]]:
    """:func:`transfer`'s refusals, all before any curve's work: whether each source shares the head's interface
    (:func:`_check_sources`), and the sorted steps."""
    if bn not in BN_MODES:
        raise ValueError(f'Unknown bn {bn!r}: use one of {list(BN_MODES)}.')
    check_mixed_precision(mixed_precision)
    shared = _check_sources(sources, head, on_mismatch)
    steps = _check_steps(steps)
    stitches = on_mismatch == 'stitch' and not all(shared.values())
    if steps[-1] > 0 or stitches:  # what draws training batches, refused here rather than after a curve's work
        steps_per_epoch(len(train_data), batch_size, what='train_data')
    # Step 0 alone only evaluates, which takes bf16 components; anything that trains or builds a head needs float32.
    if steps[-1] > 0 or reinit_head or stitches:
        check_float32({'target head': head, **{f'source {name!r}': e for name, e in sources.items()}},
                      'transfer (fine-tuning, stitch fitting or a re-initialised head)')
    check_task_data(train_data, head, 'train_data')
    check_task_data(test_data, head, 'test_data')
    return shared, steps


def _finetune_curve(model: CompatibleModel, train: ImageData, test: ImageData, steps: List[int], *,
                    batch_size: int, lr: float, momentum: float, weight_decay: float, augment: bool,
                    eval_batch_size: int, seed: int, mixed_precision: str, desc: str) -> Dict[str, List[float]]:
    """Accuracy under each BN mode at each of ``steps`` while fine-tuning every parameter of ``model``.

    No optimiser exists until a step above 0 is asked for, so step 0 is the model exactly as given. The learning
    rate is constant, so that the accuracy at step ``k`` does not depend on how far the curve goes.
    """
    accuracies: Dict[str, List[float]] = {}

    def evaluate(done: int, losses=None) -> None:
        if done in steps:  # evaluation restores the train mode it finds
            report = bn_accuracy_report(model, test, batch_size=eval_batch_size, metric=average_class_accuracy)
            for bn, value in report.items():
                accuracies.setdefault(bn, []).append(value)

    evaluate(0)
    if steps[-1] == 0:
        return accuracies
    # model is built of copies: a component the caller froze (requires_grad=False) is fine-tuned here all the same,
    # as the other curves' components are, and the caller's own flags stay as they were.
    model.requires_grad_(True)
    optimizer = make_optimizer(list(model.parameters()), 'sgd', lr, momentum, weight_decay)
    sampler = EpochSampler(len(train), batch_size, seed)
    cfg = model.extractor.pretrained_cfg

    def batch_at(step: int):
        index = sampler.batch(step).to(train.images.device)
        batch = materialize(train.images[index], train.labels.device)  # decodes a streamed split's rows
        batch = augment_batch(batch) if augment else batch
        return normalize(batch, cfg['mean'], cfg['std']), train.labels[index]

    model.train()
    fit(ClassificationTask(model), batch_at, steps[-1], optimizer, mixed_precision=mixed_precision,
        on_step=evaluate, desc=desc)
    return accuracies


def _source_curves(name: str, source: Extractor, head: Head, mode: str, compatible: bool, *, reinit_head: bool,
                   train: ImageData, test: ImageData, steps: List[int], stitch_steps: int, bn: str,
                   options: Dict[str, object]) -> List[TransferCurve]:
    """The curve of a copy of ``source`` under a copy of ``head`` (``mode`` ``"recombined"`` or ``"stitched"``),
    then with a fresh head if ``reinit_head``; ``options`` are :func:`_finetune_curve`'s, ``bn`` the mode of each
    curve's ``accuracy``."""
    device = next(head.parameters()).device

    def curve(mode: str, build: Callable[[], CompatibleModel]) -> TransferCurve:
        start = time.time()  # building the model counts: it fits the stitch of a stitched curve
        # Augmentation and initial weights draw from the global RNG: seeded per curve, so that a curve does not
        # depend on the curves run before it.
        with _seeded(curve_seed(options['seed'], name, mode), device):
            by_bn = _finetune_curve(build(), train, test, steps, desc=f'transfer {name} ({mode})', **options)
        return TransferCurve(name, mode, compatible, steps, by_bn[bn], time.time() - start, by_bn)

    def reuse_head() -> CompatibleModel:
        extractor = _copy(source).to(device)
        if mode == 'recombined':
            return CompatibleModel(extractor, _copy(head))
        fitted = fit_stitch(extractor, head, train, stitch_steps, batch_size=options['batch_size'],
                            augment=options['augment'], seed=options['seed'],
                            mixed_precision=options['mixed_precision'])
        return StitchedModel(extractor, fitted.stitch, _copy(head))

    curves = [curve(mode, reuse_head)]
    if reinit_head:
        curves.append(curve('reinit_head', lambda: CompatibleModel(_copy(source).to(device),
                                                                   _fresh_head(head, source.width))))
    return curves


def transfer(target_model: CompatibleModel, sources: Mapping[str, Extractor], train_data: ImageData,
             test_data: ImageData, steps: Sequence[int] = (0, 10, 100, 1000), *, reinit_head: bool = False,
             on_mismatch: str = 'error', stitch_steps: int = 500, batch_size: int = 64, lr: float = 0.01,
             momentum: float = 0.9, weight_decay: float = 5e-4, augment: bool = True, eval_batch_size: int = 250,
             bn: str = 'batch', seed: int = 0, mixed_precision: str = 'no') -> TransferResult:
    """Swap each source extractor under the target head; measure accuracy at step 0 and along fine-tuning.

    Every curve fine-tunes its own copies of the components (extractor, head and any stitch, all trained, frozen or
    not), so the caller's components (``requires_grad`` included) never change nor the curves influence each other.
    Each curve's augmentation and new initial weights draw from the global RNG seeded by :func:`curve_seed`, so a
    source's curve is the same whatever sources come before it; the caller's RNG state is restored after it.

    Args:
        target_model: The target task's model; only its head is used.
        sources: Name -> candidate source extractor (loaded from disk or the Hub, or in memory).
        train_data: Labelled target training data, classes in the head's order.
        test_data: Labelled target test data, classes in the head's order.
        steps: Fine-tuning steps at which to measure accuracy; include 0 for the accuracy directly after
            recombination (before any optimiser exists), which ranks the sources.
        reinit_head: Also fine-tune each source with a new head of the target head's architecture, at the source's
            width (the standard transfer-learning baseline; the paper's runs it on independent sources).
        on_mismatch: For sources that do not share the target head's interface: ``"error"`` (refuse, before any
            work is done), ``"stitch"`` (fit a 1x1-conv stitch with :func:`~timm_compat.stitching.fit_stitch` for
            ``stitch_steps`` steps on ``train_data`` first) or ``"force"`` (recombine directly, as for the baseline of
            independently trained components).
        stitch_steps: Steps of stitch fitting, for ``on_mismatch="stitch"``.
        batch_size: Fine-tuning batch size.
        lr: Constant learning rate of SGD with Nesterov momentum.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        augment: Augment the training images as the paper did (zero-pad 4 px, random crop, fair-coin flip per image).
        eval_batch_size: Evaluation batch size (it matters with ``bn="batch"``).
        bn: BN statistics of each curve's ``accuracy`` and of the ranking: ``"batch"`` (test-time, the paper's
            choice for recombined components) or ``"running"``. Both are measured (``accuracy_by_bn``).
        seed: Seed of the order in which training images are drawn and, per curve (:func:`curve_seed`), of the
            augmentation and of the initial weights of a stitch or a fresh head.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"``: autocast of fine-tuning and stitch fitting (weights and
            optimiser state stay fp32). Accuracy is measured in fp32.

    Returns:
        A :class:`TransferResult`; ``result.ranking()`` orders the sources by step-0 accuracy.

    Raises:
        ValueError: Sources of another interface with ``on_mismatch="error"``, widths that only a stitch can join,
            data of another task, bad ``steps`` or an unknown ``mixed_precision``; and, when a curve trains (steps
            above 0, a stitch, or for float32 also ``reinit_head``), fewer training images than one batch or
            components that are not float32 (:func:`~timm_compat.stitching.check_float32`).
    """
    head = target_model.head
    shared, steps = _check_call(head, sources, train_data, test_data, steps, reinit_head=reinit_head,
                                on_mismatch=on_mismatch, batch_size=batch_size, bn=bn, mixed_precision=mixed_precision)
    train = train_data.to(next(head.parameters()).device)
    options = dict(batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay, augment=augment,
                   eval_batch_size=eval_batch_size, seed=seed, mixed_precision=mixed_precision)
    curves = []
    for name, source in tqdm(sources.items(), desc='transfer: sources', unit='source', leave=False):
        mode = 'recombined' if shared[name] or on_mismatch == 'force' else 'stitched'
        curves += _source_curves(name, source, head, mode, shared[name], reinit_head=reinit_head, train=train,
                                 test=test_data, steps=steps, stitch_steps=stitch_steps, bn=bn, options=options)
    return TransferResult(curves)
