"""Run configuration for ``train.py``: dataclasses read from YAML, with dotted command-line overrides.

The defaults are the offline demo: two ResNet-8 networks on the two synthetic domains, trained jointly with
IIW + RP + DCC, and the same pair trained independently as the baseline.
"""
import copy
import dataclasses
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml

__all__ = ['DatasetConfig', 'NetworkConfig', 'InterfaceConfig', 'OptimConfig', 'RunConfig', 'load_config']


@dataclass
class DatasetConfig:
    """One task's data (see :func:`timm_compat.data.load_image_data`). ``{data_dir}`` in ``source`` is filled in."""
    source: str = 'synthetic:A'
    train_split: str = 'train'
    test_split: str = 'test'
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    class_names: Optional[List[str]] = None
    classes: Optional[List[str]] = None
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    train_shard: Optional[List[int]] = None  # [index, count]: a disjoint part of the training split
    shift: Optional[List[str]] = None  # fixed corruptions of this domain, e.g. ["defocus_blur:2"]
    synthetic_per_class: int = 400
    synthetic_test_per_class: int = 100


@dataclass
class NetworkConfig:
    """One network: a timm backbone split into extractor and head, and its task."""
    name: str = 'a'
    backbone: str = 'resnet8_cifar'
    split: Union[str, int] = 'layer2'
    head: str = 'tail'  # 'tail', a timm model name (its tail after head_split), or 'dcc': the shared DCC head
    head_split: Union[str, int, None] = None
    model_args: Dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    load: Optional[str] = None  # folder of an already trained network (extractor/ + head/): evaluated, not trained


@dataclass
class InterfaceConfig:
    """The shared interface. ``load`` (folder or Hub repo) makes the run incremental against a frozen one."""
    width: Optional[int] = None  # default 64, or the loaded interface's width
    rp: bool = True
    rp_weight: float = 1.0
    dcc: bool = True
    dcc_weight: float = 1.0
    dcc_classes: Optional[List[str]] = None  # default: the classes common to all datasets, by name
    aux_head: Any = 'conv'
    rp_head: Any = None  # overrides aux_head for the RP head
    dcc_head: Any = None  # overrides aux_head for the DCC head, e.g. a MobileNetV2 tail (Sec. 5.2)
    load: Optional[str] = None


@dataclass
class OptimConfig:
    optimizer: str = 'sgd'
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = 'cosine'
    warmup_steps: int = 0
    clip_grad_norm: Optional[float] = None  # max global gradient norm (accelerator.clip_grad_norm_); None: off


def _demo_networks() -> List[NetworkConfig]:
    return [NetworkConfig(name='a', dataset=DatasetConfig(source='synthetic:A')),
            NetworkConfig(name='b', dataset=DatasetConfig(source='synthetic:B'))]


@dataclass
class RunConfig:
    """Everything a run describes. ``scheme`` is ``joint`` or ``incremental`` (``interface.load`` required)."""
    output_dir: str = 'runs/demo'
    seed: int = 0
    scheme: str = 'joint'
    iiw: bool = True  # identical initial weights: every network starts from init_seed
    init_seed: int = 0
    networks: List[NetworkConfig] = field(default_factory=_demo_networks)
    interface: InterfaceConfig = field(default_factory=lambda: InterfaceConfig(width=32))
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 64
    epochs: float = 5.0  # over the largest training set
    steps: Optional[int] = None  # overrides epochs
    image_size: int = 32
    augment: bool = True
    mixed_precision: Optional[str] = None  # no | fp16 | bf16; default: what `accelerate launch` says
    gradient_accumulation_steps: int = 1
    channels_last: bool = False
    compile: bool = False
    cpu_threads: Optional[int] = None  # on CPU; default: this process's share of the cores it may use
    log_every: int = 25
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    eval_batch_size: int = 250
    eval_bn: str = 'batch'
    baseline: Optional[str] = 'independent'  # also train the same networks independently, for comparison
    save_components: Optional[str] = None  # folder for the trained components; default OUTPUT/<phase>/components
    push_to_hub: Optional[str] = None  # ORG/PREFIX: push every component to ORG/PREFIX-<name>-<role>
    data_dir: Optional[str] = None

    def validate(self) -> 'RunConfig':
        if self.scheme not in ('joint', 'incremental'):
            raise ValueError(f'scheme must be "joint" or "incremental", got {self.scheme!r}.')
        if self.scheme == 'incremental' and not self.interface.load:
            raise ValueError('scheme: incremental trains against a frozen interface: set interface.load to its folder '
                             'or Hub repo (or --interface).')
        if self.baseline not in (None, 'independent'):
            raise ValueError(f'baseline must be "independent" or null, got {self.baseline!r}.')
        if self.mixed_precision is False:  # YAML 1.1 reads a bare `no` as false
            self.mixed_precision = 'no'
        if self.mixed_precision not in (None, 'no', 'fp16', 'bf16'):
            raise ValueError(f'mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.')
        names = [n.name for n in self.networks]
        if not names or len(set(names)) != len(names):
            raise ValueError(f'Networks need distinct names, got {names}.')
        if all(n.load for n in self.networks):
            raise ValueError('Every network has load: set; nothing would be trained.')
        for n in self.networks:
            if self.data_dir is not None:
                n.dataset.source = n.dataset.source.replace('{data_dir}', self.data_dir)
            if '{data_dir}' in n.dataset.source:
                raise ValueError(f'Network {n.name!r} reads {n.dataset.source!r}: pass --data-dir.')
        return self

    def independent(self) -> 'RunConfig':
        """The same networks trained independently: no shared aux heads, different initial weights."""
        cfg = copy.deepcopy(self)
        cfg.iiw, cfg.baseline, cfg.scheme = False, None, 'joint'
        cfg.interface = InterfaceConfig(width=self.interface.width, rp=False, dcc=False)
        cfg.push_to_hub = None
        return cfg

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _from_dict(cls, data: Dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ValueError(f'{where} must be a mapping, got {data!r}.')
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f'Unknown config key(s) {unknown} in {where}; valid keys: {sorted(fields)}.')
    kwargs = {}
    for name, value in data.items():
        sub = {'networks': NetworkConfig, 'dataset': DatasetConfig, 'interface': InterfaceConfig,
               'optim': OptimConfig}.get(name)
        if sub is NetworkConfig:
            value = [_from_dict(NetworkConfig, v, f'{where}.networks.{i}') for i, v in enumerate(value)]
        elif sub is not None and value is not None:
            value = _from_dict(sub, value, f'{where}.{name}')
        kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(data: Dict[str, Any], dotted: str) -> None:
    if '=' not in dotted:
        raise ValueError(f'Override {dotted!r} must look like key.path=value, e.g. interface.rp=false.')
    path, raw = dotted.split('=', 1)
    keys = path.split('.')
    node = data
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    last = keys[-1]
    value = yaml.safe_load(raw)
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """``update`` over ``base``; mappings merge key by key, anything else (lists too) is replaced."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(path: Path, seen: Sequence[Path] = ()) -> Dict[str, Any]:
    """A config file, merged over the file its ``base:`` key names (relative to it), recursively."""
    path = path.resolve()
    if path in seen:
        raise ValueError(f'Config files include each other in a loop: {[str(p) for p in seen]} -> {path}.')
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f'{path} must hold a YAML mapping of config keys.')
    base = data.pop('base', None)
    return _merge(_read_yaml(path.parent / base, [*seen, path]), data) if base else data


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (and its ``base:`` files), then ``key.path=value`` overrides.

    Override values are parsed as YAML: ``interface.rp=false``, ``networks.1.backbone=resnet56_cifar``.
    """
    data = RunConfig().to_dict()
    if path is not None:
        # Top-level keys of a file replace the demo's whole: its networks or interface must not leak in.
        data.update(_read_yaml(Path(path)))
    for dotted in overrides:
        _set_dotted(data, dotted)
    return _from_dict(RunConfig, data, 'config').validate()
