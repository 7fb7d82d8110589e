"""Run configuration for ``train.py``: pydantic models read from YAML, with dotted command-line overrides.

Every key has a type and a range, checked before anything runs; :func:`load_config` reports every bad key at once
in one :class:`ConfigError`. The defaults are the offline demo: two ResNet-8 networks on the two synthetic
domains, trained jointly with IIW + RP + DCC, and the same pair trained independently as the baseline.
"""
import copy
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

from accelerate.utils import LoggerType
from pydantic import BeforeValidator, Field, ValidationError
from pydantic_core import PydanticCustomError
from typing_extensions import Annotated

from ._config_data import shard_problems, shift_problems, split_problems
from ._config_errors import REMOVED_PRESETS, ConfigError, describe
from ._config_help import keys_help
from ._config_resume import RESUME_MAY_CHANGE, config_changes
from ._config_resume import resume_conflicts as _resume_conflicts
from ._config_files import PRESET_DIR, read_config_file, set_dotted, split_preset
from ._config_types import (Count, Float, HeadSpec, ModelArg, ModelArgs, Seed, Shift, Split, _class_list, _exponents,
                            _must, _Section, _shard)
from ._config_unused import unused_key_problems
from .optim import SCHEDULES, check_config_optim, optimizer_names

__all__ = ['ConfigError', 'DatasetConfig', 'NetworkConfig', 'InterfaceConfig', 'OptimConfig', 'ValidationConfig',
           'RunConfig', 'load_config', 'config_help', 'config_changes', 'resume_conflicts', 'RESUME_MAY_CHANGE']


class DatasetConfig(_Section):
    """One task's data (:func:`timm_compat.data.load_image_data`; a Hub id is read from ``data_dir`` if set)."""
    source: str = Field('synthetic:A', min_length=1)
    train_split: str = 'train'
    test_split: str = 'test'
    image_column: Optional[str] = Field(None, examples=['img'])
    label_column: Optional[str] = Field(None, examples=['label'])
    class_names: Optional[List[str]] = Field(None, min_length=1, examples=[['cat', 'dog']],
                                             json_schema_extra=_class_list("the dataset's own"))
    classes: Optional[List[str]] = Field(None, min_length=1, examples=[['cat', 'dog']],
                                         json_schema_extra=_class_list("all of the dataset's classes"))
    train_limit: Optional[Count] = Field(None, examples=[1000])
    test_limit: Optional[Count] = Field(None, examples=[1000])
    # [index, count]: a disjoint part of the training split
    train_shard: Annotated[Optional[List[int]], BeforeValidator(_shard)] = Field(
        None, min_length=2, max_length=2, examples=[[0, 2]],
        json_schema_extra=_must('[index, count] with 0 <= index < count'))
    shift: Optional[Shift] = Field(None, examples=[['defocus_blur:2']])  # fixed corruptions of this domain
    synthetic_per_class: Count = 400
    synthetic_test_per_class: Count = 100


class NetworkConfig(_Section):
    """One network: a timm backbone split into extractor and head, and its task."""
    # A plain name, never a path: it names folders under the output directory.
    name: str = Field('a', pattern=r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$', json_schema_extra=_must(
        'a plain name: up to 64 letters, digits, "_", "." or "-", starting with a letter or digit'))
    backbone: str = Field('resnet8_cifar', min_length=1)
    split: Split = 'layer2'
    head: str = Field('tail', min_length=1)  # 'tail', a timm model name (its tail after head_split), or 'dcc'
    head_split: Optional[Split] = Field(None, examples=['layer3'])
    model_args: ModelArgs = Field(default_factory=dict)  # which keys are allowed: timm_compat.components
    pretrained: bool = False
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, examples=[{'source': 'synthetic:A'}])
    # A trained network: evaluated only. "" is refused, not taken for no load: the network would be trained anew.
    load: Optional[str] = Field(None, min_length=1, examples=['runs/x/main/components/a'])
    # An extractor component (folder or Hub id) whose weights the extractor starts from, then trains: a pre-training
    init: Optional[str] = Field(None, min_length=1, examples=['runs/pretrain/main/components/a/extractor'])


class InterfaceConfig(_Section):
    """The shared interface. ``load`` (folder or Hub repo) makes the run incremental against a frozen one."""
    width: Optional[Count] = Field(None, examples=[64])  # None: interface.DEFAULT_WIDTH, or the loaded one's
    rp: bool = True
    rp_weight: Float = Field(1.0, ge=0)
    dcc: bool = True
    dcc_weight: Float = Field(1.0, ge=0)
    # 'common': DCC's loss is the mean over the batch's common-class examples; 'batch': eq. (2)'s sum over them per
    # batch example (the Sec. 4 configs; the same when every class is common). methods/dcc.py's card.
    dcc_reduction: Literal['common', 'batch'] = 'common'
    dcc_classes: Optional[List[str]] = Field(None, min_length=1, examples=[['cat', 'dog']],
                                             json_schema_extra=_class_list('the classes common to all tasks'))
    aux_head: HeadSpec = 'conv'
    rp_head: Optional[HeadSpec] = Field(None, examples=['conv'])  # overrides aux_head for the RP head
    dcc_head: Optional[HeadSpec] = Field(None, examples=['conv'])  # overrides aux_head for the DCC head
    # "" is refused, not taken for no load: `--interface ""` (an unset variable) would make the run joint.
    load: Optional[str] = Field(None, min_length=1, examples=['runs/x/main/components/interface'])
    # How the extractor's BatchNorm sees the rotated batch under RP: 'separate' (default) an extra upright pass for
    # the task, as eq. (1)'s separate task term; 'per_rotation' each rotation chunk its own batch statistics;
    # 'shared' statistics over all four rotations (before issue 12; measured in docs/training.md).
    rp_norm: Literal['shared', 'per_rotation', 'separate'] = 'separate'
    # RP's rotations per image: 'all' four, eq. (1) (what reproduction configs use); 'one' the upright image plus one
    # random rotation, 2 extractor images per image instead of 4, same loss in expectation (methods/rp.py's card).
    rp_rotations: Literal['all', 'one'] = 'all'


def _optimizer(value: Any) -> Any:
    """A timm optimiser name (``timm.optim.list_optimizers()``, optionally ``lookahead_``-prefixed)."""
    if isinstance(value, str) and not any(value.lower() in (n, f'lookahead_{n}') for n in optimizer_names()):
        must = f'a timm optimizer, or lookahead_<optimizer>: {", ".join(optimizer_names())}'
        raise PydanticCustomError('config', '{must}', {'must': must})
    return value


def _schedule(value: Any) -> Any:
    if isinstance(value, str) and value not in SCHEDULES:
        raise PydanticCustomError('config', '{must}', {'must': f'a timm schedule: {", ".join(SCHEDULES)}'})
    return value


# Keyword arguments of timm's factories, checked by building them once (RunConfig.validate).
_FactoryArgs = Annotated[Dict[str, ModelArg], BeforeValidator(_exponents), Field(examples=[{'eps': 1e-6}])]


class OptimConfig(_Section):
    """Optimiser and learning-rate schedule, by timm name (``create_optimizer_v2``, ``create_scheduler_v2``).

    The schedule steps once per optimiser update; its ``*_epochs`` arguments in ``schedule_args`` count updates.
    """
    # sgd is Nesterov SGD (plain SGD at momentum 0); 'momentum' is classical-momentum SGD
    optimizer: Annotated[str, BeforeValidator(_optimizer)] = 'sgd'
    optimizer_args: _FactoryArgs = Field(default_factory=dict)  # e.g. {betas: [0.9, 0.99]}
    lr: Float = Field(0.05, gt=0)
    momentum: Float = Field(0.9, ge=0, lt=1)
    weight_decay: Float = Field(5e-4, ge=0)
    schedule: Annotated[str, BeforeValidator(_schedule)] = 'cosine'
    schedule_args: _FactoryArgs = Field(default_factory=dict)  # e.g. {min_lr: 1e-5, warmup_lr: 0.001}
    warmup_steps: int = Field(0, ge=0)  # linear warmup (from schedule_args.warmup_lr, 1e-5) before the schedule
    clip_grad_norm: Optional[Float] = Field(None, gt=0, examples=[2.0])  # max global gradient norm; None: off
    # The fast recipe's optimisation keys (configs/fast/recipe.yaml, timm_compat.optim.param_groups); the defaults
    # change nothing. Label smoothing of each network's task loss only, not of the interface's RP/DCC losses.
    label_smoothing: Float = Field(0.0, ge=0, lt=1)
    # lr and weight_decay given per this many examples, airbench's decoupled form (SGD only); None: as torch's
    lr_reference_batch: Optional[Count] = Field(None, examples=[1024])
    norm_bias_lr_scale: Float = Field(1.0, gt=0)  # norm-layer biases at this multiple of lr, weight decay / it
    warmup_fraction: Float = Field(0.0, ge=0, lt=1)  # warmup as a fraction of the updates, instead of warmup_steps
    # alpha of a lookahead_<name> optimiser: 'constant' (optimizer_args.lookahead_alpha), or 'airbench': ramped from
    # no pull to airbench94's weight averaging, the run ending on the slow weights (optim.airbench_lookahead_alpha)
    lookahead_schedule: Literal['constant', 'airbench'] = 'constant'


class ValidationConfig(_Section):
    """Evaluation during training on examples held out of each network's training set, keeping the components of
    the best step in ``OUT/<phase>/best/`` (:mod:`timm_compat.validation`). BN and TTA as ``eval_bn`` and
    ``eval_tta`` say."""
    every: Optional[Count] = Field(None, examples=[500])  # steps between validations (and the last step); None: off
    examples: Count = 1000  # held out of each network's training set (seeded): never trained on, never the test set
    # 'test': measure each network's test set instead, for learning curves and time to accuracy
    # (benchmarks/time_to_accuracy.py); nothing is held out and no best step is kept (chosen on the test set, its
    # numbers would be biased)
    data: Literal['holdout', 'test'] = 'holdout'
    # the best step by: 'mean' of the whole recombination matrix, 'own' accuracy, 'recombination' (off-diagonal)
    metric: Literal['mean', 'own', 'recombination'] = 'mean'


def _tracker(value: Any) -> Any:
    """An Accelerate tracker name (``accelerate.utils.LoggerType``)."""
    names = [t.value for t in LoggerType]
    if isinstance(value, str) and value not in names:
        raise PydanticCustomError('config', '{must}', {'must': f'an Accelerate tracker: {", ".join(names)}'})
    return value


def _demo_networks() -> List[NetworkConfig]:
    """The offline demo's two networks, one per synthetic domain."""
    return [NetworkConfig(name='a', dataset=DatasetConfig(source='synthetic:A')),
            NetworkConfig(name='b', dataset=DatasetConfig(source='synthetic:B'))]


# The demo's ResNet-8 trunks end in 32 channels: an interface that wide needs no adapter. A value of the demo, not
# the library's default width (interface.DEFAULT_WIDTH, what width: null means); the demo's numbers were taken at 32.
_DEMO_WIDTH = 32


def _precision(value: Any) -> Any:
    """``mixed_precision: no`` as meant: YAML 1.1 reads a bare ``no`` as false."""
    return 'no' if value is False else value


class RunConfig(_Section):
    """Everything a run describes. It trains incrementally, against a frozen interface, iff ``interface.load``."""
    output_dir: str = Field('runs/demo', min_length=1)
    seed: Seed = 0
    iiw: bool = True  # identical initial weights (timm_compat.methods.iiw): every network starts from init_seed
    init_seed: Seed = 0
    # Sec. 3.4: each step sums all networks' losses or alternates networks (the paper's; `epochs`: each network's)
    joint_schedule: Literal['sum', 'alternate'] = 'sum'
    task_weight: Float = Field(1.0, ge=0)  # of each network's task loss; 0: no gradient from labels (RP pre-training)
    networks: List[NetworkConfig] = Field(default_factory=_demo_networks, min_length=1,
                                          examples=[[{'name': 'a', 'dataset': {'source': 'synthetic:A'}}]])
    interface: InterfaceConfig = Field(default_factory=lambda: InterfaceConfig(width=_DEMO_WIDTH),
                                       examples=[{'width': 64}])
    optim: OptimConfig = Field(default_factory=OptimConfig, examples=[{'lr': 0.1}])
    batch_size: Count = 64  # per process: with N processes an update sees N x batch_size examples
    epochs: Float = Field(5.0, gt=0)  # over the largest training set
    steps: Optional[Count] = Field(None, examples=[1000])  # overrides epochs
    image_size: int = Field(32, ge=8)
    augment: bool = True
    augment_translate: int = Field(4, ge=0)  # pad, then crop: random shifts of up to this many pixels
    augment_pad_mode: Literal['constant', 'reflect'] = 'constant'  # reflect: airbench94's translate
    augment_flip: Literal['random', 'alternating'] = 'random'  # alternating: airbench94's, from seed and epoch
    # airbench's whitening convs (timm_compat.whitening; no-op without): init from N training images; bias epochs
    whitening_init_examples: Optional[Count] = Field(5000, examples=[5000])
    whitening_bias_epochs: Optional[Float] = Field(None, gt=0, examples=[3])  # None: the bias trains throughout
    # None: what `accelerate launch` says; auto: bf16 where it is faster (_hardware.fast_bf16), else fp32
    mixed_precision: Annotated[Optional[Literal['no', 'fp16', 'bf16', 'auto']], BeforeValidator(_precision)] = Field(
        None, examples=['bf16'])
    gradient_accumulation_steps: Count = 1
    channels_last: bool = False
    compile: Union[bool, str] = Field(False, examples=[True, 'inductor'])  # true or a torch.compile backend
    sync_batchnorm: bool = False  # several processes: BN statistics of the global batch (timm's --sync-bn; CUDA)
    deterministic: bool = False  # CUDA: bit-identical reruns, no cuDNN autotuning or TF32 (_hardware.configure_cuda)
    cpu_threads: Optional[Count] = Field(None, examples=[4])  # None: this process's share of the usable cores
    log_every: Count = 25
    checkpoint_every: Count = 200
    keep_checkpoints: Count = 2
    # memory: each split decoded once into memory; stream: decoded batch by batch from disk by loader_workers
    # processes (timm_compat.streaming; same pixels and batches); auto: stream a split above data_memory_gb
    data_storage: Literal['auto', 'memory', 'stream'] = 'auto'
    data_memory_gb: Optional[Float] = Field(None, gt=0, examples=[64])  # None: a quarter of the RAM
    loader_workers: Optional[Annotated[int, Field(ge=0)]] = Field(None, examples=[4])  # None: cores per process - 1
    eval_batch_size: Count = 250
    eval_bn: Literal['batch', 'running'] = 'batch'
    eval_tta: Literal['none', 'flip', 'flip_translate'] = 'none'  # none: the paper's; timm_compat.tta
    validation: ValidationConfig = Field(default_factory=ValidationConfig, examples=[{'every': 500}])
    # also train the same networks independently, for comparison
    baseline: Optional[Literal['independent']] = 'independent'
    save_components: Optional[str] = Field(None, min_length=1, examples=['components'])  # None: OUT/<phase>/...
    push_to_hub: Optional[str] = Field(  # ORG/PREFIX: push every component to ORG/PREFIX-<name>-<role>
        None, pattern=r'^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$', examples=['my-org/compat'],
        json_schema_extra=_must('ORG/PREFIX, e.g. my-org/compat'))
    data_dir: Optional[str] = Field(None, min_length=1, examples=['data'])  # local copies of Hub ids: DATA/NAME/
    # Accelerate trackers by name, each phase under its own prefix (main/loss); None: tensorboard when installed
    trackers: Optional[List[Annotated[str, BeforeValidator(_tracker)]]] = Field(None, examples=[['tensorboard']])

    def validate(self) -> 'RunConfig':
        """Check what no single key can, fill ``{data_dir}`` into dataset sources, and return ``self``.

        Raises:
            ConfigError: Listing every problem found.
        """
        problems = []
        names = [n.name for n in self.networks]
        if len(set(names)) != len(names):
            problems.append(f'Networks need distinct names, got {names}.')
        if all(n.load for n in self.networks):
            problems.append('Every network has load: set; nothing would be trained.')
        for i, n in enumerate(self.networks):
            if n.head_split is not None and n.head in ('tail', 'dcc'):
                problems.append(f'networks.{i}.head_split cuts a timm model named as head, but head is {n.head}: '
                                f'set networks.{i}.head to a timm model name, or drop head_split.')
            if n.head == 'dcc' and not self.interface.dcc and not self.interface.load:
                problems.append(f'networks.{i}.head is dcc (the shared DCC head), but interface.dcc is false; '
                                f'set interface.dcc=true or networks.{i}.head=tail.')
            if self.data_dir is not None:
                n.dataset.source = n.dataset.source.replace('{data_dir}', self.data_dir)
            if '{data_dir}' in n.dataset.source:
                problems.append(f'Network {n.name!r} reads {n.dataset.source!r}: pass --data-dir.')
        problems += (self._init_problems() + self._baseline_problems() + self._accumulation_problems()
                     + shard_problems(self.networks, self.data_dir) + split_problems(self.networks, self.data_dir)
                     + shift_problems(self.networks, self.data_storage) + unused_key_problems(self))
        if self.augment and self.augment_pad_mode == 'reflect' and self.augment_translate >= self.image_size:
            problems.append(f'augment_translate={self.augment_translate} reflect-pads more than the image '
                            f'({self.image_size} px) has; set augment_translate below image_size.')
        if self.validation.metric == 'recombination' and len(self.networks) < 2:
            problems.append('validation.metric is recombination, which needs two networks or more; set '
                            'validation.metric=mean or own.')
        try:
            check_config_optim(self)
        except ValueError as e:
            problems.append(f'optim: {e}.')
        if problems:
            raise ConfigError('\n'.join(problems))
        return self

    def _init_problems(self) -> List[str]:
        problems = [f'networks.{i}.init and networks.{i}.{key} both give its weights; keep one.'
                    for i, n in enumerate(self.networks) for key in ('load', 'pretrained')
                    if n.init and getattr(n, key)]
        inits = {n.init for n in self.networks if not n.load}
        if self.iiw and len(inits) > 1:
            problems.append(f'iiw is true (identical initial weights), but the trained networks start from different '
                            f'weights (init: {sorted(map(str, inits))}); give them one init, or set iiw=false.')
        built = [n for n in self.networks if not (n.load or n.init)]  # from the seed: IIW needs one architecture
        if self.iiw and len({n.backbone for n in built}) > 1:
            archs = ', '.join(f'{n.name}: {n.backbone}' for n in built)
            problems.append(f'iiw is true, but the trained networks have different backbones ({archs}): identical '
                            f'initial weights need one architecture (Sec. 3.3); set iiw=false.')
        if shared := self._shared_start():
            if not self.iiw:
                problems.append(f'iiw is false, but {shared} start from the same weights, which is identical '
                                f'initial weights: set iiw=true, or give each network its own init.')
            if self.baseline:
                problems.append(f'the independent baseline would start {shared} from the same weights, not from '
                                f'different ones: set baseline=null, and train independent networks in a run of '
                                f'their own, each from its own init.')
        if self.task_weight == 0 and not (self.interface.rp or self.interface.dcc):
            problems.append('task_weight is 0 and interface.rp and interface.dcc are off: no loss would train '
                            'anything; set interface.rp=true (RP pre-training) or task_weight above 0.')
        return problems

    def _shared_start(self) -> str:
        """'networks a and b' when trained networks of one backbone start from one ``init`` or from timm's
        pretrained weights (so from identical weights, whatever the seeds), else ''."""
        starts: Dict[tuple, List[str]] = {}
        for n in self.networks:
            if not n.load and (n.init or n.pretrained):
                starts.setdefault((n.backbone, n.init or 'pretrained'), []).append(n.name)
        shared = next((names for names in starts.values() if len(names) > 1), None)
        return f'networks {", ".join(shared[:-1])} and {shared[-1]}' if shared else ''

    def _accumulation_problems(self) -> List[str]:
        # Accelerate applies the gradients of gradient_accumulation_steps micro-batches at once: a run that ends or
        # checkpoints between them would drop the last ones (and a resume their gradients).
        accumulation, problems = self.gradient_accumulation_steps, []
        for key in ('steps', 'checkpoint_every'):
            value = getattr(self, key)
            if value and value % accumulation:
                problems.append(f'{key}={value} is not a multiple of gradient_accumulation_steps={accumulation}, so '
                                f'it would fall between the micro-batches of one update; set {key}='
                                f'{-(-value // accumulation) * accumulation}.')
        return problems

    def _baseline_problems(self) -> List[str]:
        # The baseline trains every network anew with nothing shared: a shared DCC head or a network trained
        # elsewhere has no such counterpart.
        shared = [f'networks.{i}.{key}' for i, n in enumerate(self.networks)
                  for key, used in (('head: dcc', n.head == 'dcc'), ('load', n.load)) if used]
        if self.baseline and self.task_weight == 0:  # it keeps task_weight and drops RP and DCC: no loss left
            return ['task_weight is 0, so the independent baseline (no RP, no DCC) would train nothing and report '
                    'chance: set baseline=null.']
        if not self.baseline or not shared:
            return []
        return [f'baseline is independent (the default), which trains every network anew and alone, but '
                f'{", ".join(shared)} has none to train: set baseline=null, and train the independent networks in '
                f'a run of their own (head: tail, no load).']

    def independent(self) -> 'RunConfig':
        """The same networks trained independently: no shared aux heads, different initial weights."""
        cfg = copy.deepcopy(self)
        cfg.iiw, cfg.baseline = False, None
        cfg.interface = InterfaceConfig(width=self.interface.width, rp=False, dcc=False)
        cfg.push_to_hub = None
        return cfg


def _parse(data: Dict[str, Any]) -> RunConfig:
    """Type- and range-check ``data`` into a :class:`RunConfig`, reporting every bad key at once."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError('\n'.join(describe(e.errors(), data, RunConfig))) from None


# --- reading ----------------------------------------------------------------------------------------------------

def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (its ``base:`` files and data preset), then ``key.path=value``.

    Override values are parsed as YAML: ``interface.rp=false``, ``networks.1.backbone=resnet56_cifar``;
    ``data=NAME`` chooses the file's data preset (see :mod:`timm_compat._config_files`).

    Raises:
        ConfigError: Naming every bad key, its value and a valid example, before anything runs.
    """
    data = RunConfig().to_dict()
    preset, overrides = split_preset(overrides)
    presets = Path(path or '.').resolve().parent / PRESET_DIR  # a user's own preset may have a removed one's name
    if path is not None and preset in REMOVED_PRESETS and not (presets / f'{preset}.yaml').is_file():
        raise ConfigError(REMOVED_PRESETS[preset])
    if path is not None:
        # Top-level keys of a file replace the demo's whole: its networks or interface must not leak in.
        data.update(read_config_file(Path(path), preset))
    elif preset is not None:
        raise ConfigError(f'data={preset} chooses a data preset of a config file; give the file too (-c CONFIG).')
    for dotted in overrides:
        if token := next((t for t in ('{data}', '{name}') if t in dotted), None):
            raise ConfigError(f'{dotted}: {token} is filled only in config files; write the '
                              f'{"preset" if token == "{data}" else "network"}\'s name itself in --set.')
        set_dotted(data, dotted)
    return _parse(data).validate()


def config_help() -> str:
    """Every config key with its type and default, one per line, generated from this schema (``--help``)."""
    return keys_help(RunConfig)


def resume_conflicts(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """The config changes a resumed run may not make; keys added to the schema since ``old`` take their defaults
    (see :mod:`timm_compat._config_resume`)."""
    defaults = RunConfig().to_dict()
    defaults['networks'] = [NetworkConfig().to_dict()]
    return _resume_conflicts(old, new, defaults)
