"""From a run config to objects: task data, the interface, the networks and the joint model of each phase.

Everything a run trains is built here, and so validated, before the run touches its output folder: an unknown
split point, a frozen interface of the wrong width or datasets without common classes refuse the run while an
earlier run in the folder is still intact.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from accelerate.utils import set_seed

from .classes import canonical_class_name, common_classes, same_classes
from .compatible import CompatibleModel, make_compatible, recombine
from .components import Extractor, Head
from .config import InterfaceConfig, NetworkConfig, RunConfig
from .data import ImageData, load_image_data, local_source, steps_per_epoch
from .streaming import default_workers, memory_budget_gb
from .interface import DEFAULT_WIDTH, Interface, normalise_spec
from .joint import JointModel
from .methods import init_seed, methods_for
from .optim import check_config_optim, phase_steps
from .validation import split_holdout
from .whitening import init_run_whitening

__all__ = ['Phase', 'load_task_data', 'build_interface', 'build_network', 'start_from', 'load_network', 'build_phase',
           'build_phases', 'check_phase_length']


def load_task_data(net: NetworkConfig, cfg: RunConfig, processes: int = 1,
                   device: Optional[torch.device] = None) -> Tuple[ImageData, ImageData]:
    """The (train, test) data of one network's task, as its dataset config describes them.

    A Hub id is read from its local Parquet copy in ``cfg.data_dir`` when that is set (:func:`local_source`).
    Every network's copy is checked on each call (a few file lookups), so that a missing one refuses the run before
    minutes are spent decoding another network's data. A split is streamed as ``cfg.data_storage`` says, decoded by
    ``cfg.loader_workers`` processes (default: :func:`~timm_compat.streaming.default_workers` of ``processes``),
    and ``auto`` streams a split larger than ``cfg.data_memory_gb`` (default:
    :func:`~timm_compat.streaming.memory_budget_gb` of ``processes`` and ``device``).

    Args:
        net: The network whose task it is.
        cfg: The run's config.
        processes: The run's processes on this machine (:func:`~timm_compat._hardware.local_processes`).
        device: Where training runs.

    Raises:
        FileNotFoundError: ``cfg.data_dir`` is set but lacks the local copy of some network's Hub dataset.
    """
    for other in cfg.networks:
        local_source(other.dataset.source, cfg.data_dir, (other.dataset.train_split, other.dataset.test_split))
    d = net.dataset
    workers = default_workers(processes) if cfg.loader_workers is None else cfg.loader_workers
    source = local_source(d.source, cfg.data_dir, (d.train_split, d.test_split))
    common = dict(image_size=cfg.image_size, image_column=d.image_column, label_column=d.label_column,
                  class_names=d.class_names, classes=d.classes, shift=d.shift, seed=cfg.seed,
                  storage=cfg.data_storage, workers=workers,
                  memory_budget_gb=(memory_budget_gb(processes, device) if cfg.data_memory_gb is None
                                    else cfg.data_memory_gb))
    train = load_image_data(source, d.train_split, limit=d.train_limit, shard=d.train_shard,
                            synthetic_per_class=d.synthetic_per_class, **common)
    test = load_image_data(source, d.test_split, limit=d.test_limit,
                           synthetic_per_class=d.synthetic_test_per_class, **common)
    return train, test


def build_interface(cfg: RunConfig, class_lists: Sequence[Sequence[str]]) -> Optional[Interface]:
    """A new interface for joint training, the frozen one that incremental training fits, or None.

    None for networks that share nothing (no aux heads, no identical initial weights): independent networks must
    not claim an interface, or their components would be tagged as fitting each other.

    Raises:
        ValueError: The frozen interface's width is not the configured one, or DCC finds no common classes.
    """
    icfg = cfg.interface
    if not (icfg.load or icfg.rp or icfg.dcc or cfg.iiw):
        return None
    if icfg.load:
        interface = Interface.from_pretrained(icfg.load).freeze()
        if icfg.width is not None and icfg.width != interface.width:
            raise ValueError(f'The frozen interface {icfg.load} has width {interface.width}, but the config asks for '
                             f'width {icfg.width}. Set interface.width to {interface.width} (or drop it).')
        _check_loaded(icfg, interface)
        return interface
    dcc_classes = None
    if icfg.dcc:
        common = common_classes(class_lists)
        dcc_classes = icfg.dcc_classes or common
        if not dcc_classes:
            raise ValueError(f'DCC needs common classes, but the datasets share none ({class_lists}). Give '
                             f'interface.dcc_classes or set interface.dcc=false.')
        if outside := [c for c in dcc_classes if canonical_class_name(c) not in common]:
            raise ValueError(f'interface.dcc_classes {", ".join(map(repr, outside))} are not common to the tasks, '
                             f'whose common classes are {common}: eq. 2 discriminates classes every task has. '
                             f'Choose interface.dcc_classes among them, or drop it for all of them.')
    return Interface(width=icfg.width or DEFAULT_WIDTH, rp=icfg.rp, dcc_classes=dcc_classes, aux_head=icfg.aux_head,
                     rp_head=icfg.rp_head, dcc_head=icfg.dcc_head)


def _check_loaded(icfg: InterfaceConfig, interface: Interface) -> None:
    """Refuse keys that describe an interface other than the loaded one: its heads and DCC classes are fixed.

    A key at its default asks for nothing (the loaded interface decides); ``interface.rp``/``dcc: false`` are
    honoured by training that method not at all (:func:`build_phase`).
    """
    asked = icfg.dcc_classes and [canonical_class_name(c) for c in icfg.dcc_classes]
    if asked is not None and asked != [canonical_class_name(c) for c in interface.dcc_classes or []]:
        _refuse_loaded(icfg, 'dcc_classes', icfg.dcc_classes, f'DCC classes {interface.dcc_classes}')
    default = InterfaceConfig.model_fields['aux_head'].default
    for head in ('rp', 'dcc'):
        key = f'{head}_head' if getattr(icfg, f'{head}_head') is not None else 'aux_head'
        value = getattr(icfg, key)
        if key == 'aux_head' and (value == default or head not in interface.head_specs):
            continue
        if head not in interface.head_specs:
            _refuse_loaded(icfg, key, value, f'no {head.upper()} head')
        if normalise_spec(value) != interface.head_specs[head]:
            _refuse_loaded(icfg, key, value, f'{head.upper()} head {interface.head_specs[head]}')


def _refuse_loaded(icfg: InterfaceConfig, key: str, value, has: str) -> None:
    raise ValueError(f'interface.{key}={value!r} describes another interface than the loaded interface '
                     f'{icfg.load}, which has {has}; a loaded interface is trained against as it is: drop '
                     f'interface.{key}, or train a new interface (drop interface.load).')


def build_network(net: NetworkConfig, index: int, cfg: RunConfig, interface: Optional[Interface],
                  class_names: List[str]) -> CompatibleModel:
    """Network ``index`` of the run: loaded from its saved components, or made from its timm backbone.

    Raises:
        ValueError: A loaded network fits another interface or has a head of other classes than its dataset's, or
            ``head: dcc`` with classes other than DCC's.
    """
    if net.load:
        model = load_network(net, cfg, Path(net.load).parent)
        fits = {model.extractor.interface_id, model.head.interface_id}
        expected = None if interface is None else interface.id  # an independent network fits no interface
        if fits != {expected}:
            uses = 'shares no interface' if interface is None else f'uses interface {interface.id}'
            raise ValueError(f'Network {net.name!r} ({net.load}) fits interface '
                             f'{" and ".join(sorted(map(str, fits)))}, but this run {uses}: load the interface it '
                             f'was trained with (interface.load) or train the network anew (drop '
                             f'networks.{index}.load).')
        # Labels index the head's outputs: checked here, before training, not only by the evaluation after it.
        if not same_classes(model.head.class_names, class_names):
            raise ValueError(f'Network {net.name!r} ({net.load}): its head\'s classes {list(model.head.class_names)} '
                             f'are not its dataset\'s {list(class_names)}, in that order, so its labels would be '
                             f'scored against other classes. Set networks.{index}.dataset.classes to the head\'s '
                             f'classes, or train the network anew (drop networks.{index}.load).')
        return model
    head = net.head
    if head == 'dcc':
        # The network's own head is the shared DCC head (Sec. 5.2): one classifier for every extractor.
        canonical = [canonical_class_name(c) for c in class_names]
        if interface.dcc is None or canonical != [canonical_class_name(c) for c in interface.dcc_classes]:
            raise ValueError(f'Network {net.name!r} has head: dcc, so its classes {class_names} must be the '
                             f'interface\'s DCC classes {interface.dcc_classes}, in that order.')
        head = interface.dcc
        # Built inside the interface, the DCC head is bound to none yet, and would not fit this network's extractor.
        head.__dict__['interface'] = interface
    model = make_compatible(
        net.backbone, split=net.split, interface=interface, num_classes=len(class_names), head=head,
        head_split=net.head_split, class_names=class_names, pretrained=net.pretrained, image_size=cfg.image_size,
        init_seed=init_seed(cfg.init_seed, index, identical=cfg.iiw),
        width=None if interface is not None else cfg.interface.width or DEFAULT_WIDTH, **net.model_args)
    if net.init:
        start_from(model.extractor, net.init, f'networks.{index}.init')
    return model


def start_from(extractor: Extractor, source: str, key: str = 'init') -> None:
    """Copy the weights of the extractor component at ``source`` (folder or Hub id) into ``extractor``.

    Only weights move: ``extractor`` keeps its interface. The architecture must match (backbone, split, width,
    model arguments), as the error names when it does not.
    """
    given = Extractor.from_pretrained(source)
    keys = ('backbone', 'split', 'width', 'model_args')
    want, have = extractor.component_config(), given.component_config()
    if differ := [k for k in keys if want.get(k) != have.get(k)]:
        raise ValueError(f'{key}: {source} is an extractor of ' + ', '.join(f'{k} {have.get(k)!r}' for k in differ)
                         + ', but this network\'s has ' + ', '.join(f'{k} {want.get(k)!r}' for k in differ)
                         + '; give an extractor of the same architecture.')
    extractor.load_state_dict(given.state_dict())



def load_network(net: NetworkConfig, cfg: RunConfig, components: Path) -> CompatibleModel:
    """Network ``net`` of a finished run, from the components it saved in ``components`` (a phase's folder).

    Its ``extractor`` with its ``head``, or with the interface's DCC head for ``head: dcc``; a loaded network from
    its ``load:`` folder. Joined with ``force``: an independent run's networks have no interface to check.
    """
    folder = Path(net.load) if net.load else components / net.name
    extractor = Extractor.from_pretrained(folder / 'extractor')
    if net.head != 'dcc':
        return recombine(extractor, Head.from_pretrained(folder / 'head'), force=True)
    interface = Interface.from_pretrained(cfg.interface.load or components / 'interface')
    classes = interface.dcc_classes
    head = Head(interface.dcc, interface.width, interface.width, len(classes), classes)  # as make_compatible wraps it
    head.__dict__['interface'] = interface
    return recombine(extractor, head, force=True)


@dataclass
class Phase:
    """One training phase (``main`` or its ``independent`` baseline), built and checked before anything runs.

    Attributes:
        tag: The phase's name, also its folder in the run's output directory.
        cfg: The phase's config (the baseline's is ``cfg.independent()``).
        interface: The shared interface, or None for networks that share nothing.
        models: Every network of the phase by name, loaded ones included.
        joint: The networks this phase trains, their interface and methods as one module.
        data: (train, test) data of every network by name; with validation on, the training sets exclude
            ``holdout``.
        holdout: Validation examples of every network by name, held out of its training set, or its test set
            with ``validation.data='test'`` (empty when ``cfg.validation.every`` is None; see
            :mod:`timm_compat.validation`).
    """
    tag: str
    cfg: RunConfig
    interface: Optional[Interface]
    models: Dict[str, CompatibleModel]
    joint: JointModel
    data: Dict[str, Tuple[ImageData, ImageData]]
    holdout: Dict[str, ImageData] = field(default_factory=dict)
    steps: int = 0  # of its training, as fit_phase counts them (check_phase_length); a resume checks them first

    @property
    def trained(self) -> List[str]:
        """Names of the networks this phase trains (loaded networks are only evaluated)."""
        return list(self.joint.networks)


def build_phase(tag: str, cfg: RunConfig, data: Dict[str, Tuple[ImageData, ImageData]],
                device: torch.device, processes: int = 1) -> Phase:
    """Interface, networks and joint model of a phase; every backbone, split and head is built (and so checked),
    and every trained network's training set holds a batch on each of ``processes`` (:func:`check_phase_length`)."""
    set_seed(cfg.seed)
    holdout = {}
    if cfg.validation.every is not None and cfg.validation.data == 'test':
        holdout = {name: test for name, (_, test) in data.items()}
    elif cfg.validation.every is not None:  # a loaded network's training set trained it: none of it is held out
        kept, holdout = split_holdout({n.name: data[n.name] for n in cfg.networks if not n.load},
                                      cfg.validation.examples, cfg.seed)
        data = {**data, **kept}
    interface = build_interface(cfg, [train.class_names for train, _ in data.values()])
    models = {n.name: build_network(n, i, cfg, interface, data[n.name][0].class_names).to(device)
              for i, n in enumerate(cfg.networks)}
    init_run_whitening(cfg, models, data)  # after the holdout split: never from validation examples
    if interface is not None:
        interface.to(device)  # a loaded, frozen interface is not prepared by Accelerate
    # rp/dcc false switch a method off, also against a loaded interface that has its head.
    icfg = cfg.interface
    methods = methods_for(interface, icfg.rp_weight * icfg.rp, icfg.dcc_weight * icfg.dcc, rp_norm=icfg.rp_norm,
                          rp_rotations=icfg.rp_rotations, seed=cfg.seed, dcc_reduction=icfg.dcc_reduction)
    joint = JointModel({n.name: models[n.name] for n in cfg.networks if not n.load}, interface, methods,
                       schedule=cfg.joint_schedule, label_smoothing=cfg.optim.label_smoothing,
                       task_weight=cfg.task_weight)
    if cfg.channels_last:
        joint = joint.to(memory_format=torch.channels_last)
    phase = Phase(tag, cfg, interface, models, joint, data, holdout)
    phase.steps = check_phase_length(phase, processes)
    return phase


def check_phase_length(phase: Phase, processes: int = 1) -> int:
    """Refuse a phase that training would refuse only once started (after ``--overwrite`` deleted the earlier
    run): a trained network whose training set, less its validation holdout, holds less than one batch per process,
    or, for a run in ``epochs``, a schedule that does not fit the updates they make (``steps`` were checked with
    the config).

    Returns:
        The phase's micro-batch steps, as :func:`~timm_compat.engine.fit_phase` counts them.

    Raises:
        ValueError: Naming the network or the schedule's key, and the fix.
    """
    cfg, per_epoch = phase.cfg, []
    held_out = cfg.validation.data == 'holdout'  # validation.data='test' takes nothing from training
    for name in phase.trained:
        held = f' less the {len(phase.holdout[name])} validation examples' if held_out and name in phase.holdout else ''
        per_epoch.append(steps_per_epoch(len(phase.data[name][0]), cfg.batch_size, processes,
                                         f'[{phase.tag}] the training set of network {name!r}{held}'))
    steps = phase_steps(cfg, max(per_epoch), len(per_epoch))  # as fit_phase counts them
    if not cfg.steps:
        try:
            check_config_optim(cfg, math.ceil(steps / cfg.gradient_accumulation_steps))
        except ValueError as e:
            raise ValueError(f'[{phase.tag}] epochs={cfg.epochs} make {steps} steps; optim: {e}') from None
    return steps


def build_phases(cfg: RunConfig, data: Dict[str, Tuple[ImageData, ImageData]], device: torch.device,
                 processes: int = 1) -> List[Phase]:
    """The run's ``main`` phase and, when ``cfg.baseline`` asks for it, its ``independent`` baseline, each checked
    for training on ``processes`` processes (:func:`build_phase`)."""
    main = build_phase('main', cfg, data, device, processes)
    if not cfg.baseline:
        return [main]
    baseline = cfg.independent()
    if main.interface is not None:  # a loaded interface sets main's width: the baseline's networks are the same
        baseline.interface.width = main.interface.width
    return [main, build_phase('independent', baseline, data, device, processes)]
