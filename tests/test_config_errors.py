"""Bad configs: each error names the key, the value and a valid example, before anything runs."""
import pytest

from timm_compat.config import ConfigError, NetworkConfig, load_config


def test_bad_configs():
    with pytest.raises(ConfigError, match=r"Unknown config key\(s\) \['widht'\] in interface.*did you mean 'width'"):
        load_config(None, ['interface.widht=3'])
    with pytest.raises(ConfigError, match=r"Unknown config key\(s\) \['lr'\] at the top level.*did you mean optim.lr"):
        load_config(None, ['lr=0.1'])
    with pytest.raises(ConfigError, match='must look like key.path=value'):
        load_config(None, ['epochs'])
    with pytest.raises(ConfigError, match='^scheme is no longer a config key.*interface.load.*Delete the scheme'):
        load_config(None, ['scheme=incremental'])
    with pytest.raises(ConfigError, match='pass --data-dir'):
        load_config(None, ['networks.0.dataset.source=parquet:{data_dir}/x'])
    with pytest.raises(ConfigError, match='distinct names'):
        load_config(None, ['networks.1.name=a'])
    with pytest.raises(ConfigError, match='interface.dcc is false'):
        load_config(None, ['networks.0.head=dcc', 'interface.dcc=false', 'baseline=null'])
    # The independent baseline (on by default) crashed when it reached a shared DCC head or a loaded network.
    with pytest.raises(ConfigError, match=r'baseline is independent .* networks\.1\.head: dcc has none to train: '
                                          r'set baseline=null'):
        load_config(None, ['networks.1.head=dcc'])
    with pytest.raises(ConfigError, match=r'networks\.0\.load has none to train'):
        load_config(None, ['networks.0.load=runs/x/main/components/a'])
    assert load_config(None, ['networks.1.head=dcc', 'baseline=null']).networks[1].head == 'dcc'
    # A run ending or checkpointing between the micro-batches of one update dropped their gradients.
    with pytest.raises(ConfigError, match=r'steps=5 is not a multiple of gradient_accumulation_steps=2, .* set '
                                          r'steps=6\.'):
        load_config(None, ['gradient_accumulation_steps=2', 'steps=5', 'checkpoint_every=4'])
    with pytest.raises(ConfigError, match=r'checkpoint_every=3 .* set checkpoint_every=4\.'):
        load_config(None, ['gradient_accumulation_steps=2', 'steps=6', 'checkpoint_every=3'])
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize('override', ['networks.7.name=x', 'networks.x.name=x', 'batch_size.x=3', 'optim.lr=[1'])
def test_overrides_that_name_no_key(override):
    with pytest.raises(ConfigError, match=f"Override '{override[:8]}"):
        load_config(None, [override])


@pytest.mark.parametrize('overrides, message', [
    (['baseline.epochs=2'], r"'baseline' is null in this config, .* \(--set baseline=VALUE\)\.$"),
    (['interface.aux_head=conv', 'interface.aux_head.hidden=64'],
     r"'interface\.aux_head' is 'conv', not a section: 'interface\.aux_head\.hidden' names no config key"),
    (['batch_size.x=3'], r"'batch_size' is 16, not a section"),
])
def test_overrides_into_a_value_that_is_not_a_section_say_so(overrides, message):
    # The generic message suggested an unrelated key (networks.0.dataset.train_limit) for these.
    with pytest.raises(ConfigError, match=message):
        load_config('tests/tiny.yaml', overrides)


def test_loop_in_bases(tmp_path):
    (tmp_path / 'x.yaml').write_text('base: y.yaml\n')
    (tmp_path / 'y.yaml').write_text('base: x.yaml\n')
    with pytest.raises(ConfigError, match='loop'):
        load_config(str(tmp_path / 'x.yaml'))


# (override, key named in the error, the bad value as the error shows it)
BAD = [
    ('interface.rp="no"', 'interface.rp', "'no'"), ('interface.dcc="false"', 'interface.dcc', "'false'"),
    ('iiw="False"', 'iiw', "'False'"), ('augment="false"', 'augment', "'false'"),
    ('networks.0.pretrained="yes"', 'networks.0.pretrained', "'yes'"), ('channels_last=1', 'channels_last', '1'),
    ('interface.width=0', 'interface.width', '0'), ('interface.width=1.5', 'interface.width', '1.5'),
    ('steps=-5', 'steps', '-5'), ('steps=0', 'steps', '0'), ('steps="1e3"', 'steps', "'1e3'"),
    ('epochs=0', 'epochs', '0'), ('epochs=.nan', 'epochs', 'nan'), ('batch_size=0', 'batch_size', '0'),
    ('batch_size=true', 'batch_size', 'True'), ('eval_batch_size=0', 'eval_batch_size', '0'),
    ('checkpoint_every=0', 'checkpoint_every', '0'), ('log_every=0', 'log_every', '0'),
    ('keep_checkpoints=0', 'keep_checkpoints', '0'), ('cpu_threads=0', 'cpu_threads', '0'),
    ('gradient_accumulation_steps=0', 'gradient_accumulation_steps', '0'),
    ('optim.lr=0', 'optim.lr', '0'), ('optim.lr=-0.1', 'optim.lr', '-0.1'), ('optim.lr=abc', 'optim.lr', "'abc'"),
    ('optim.momentum=1', 'optim.momentum', '1'), ('optim.momentum=-0.1', 'optim.momentum', '-0.1'),
    ('optim.weight_decay=-1e-4', 'optim.weight_decay', "'-1e-4'"),
    ('optim.warmup_steps=-1', 'optim.warmup_steps', '-1'), ('optim.clip_grad_norm=0', 'optim.clip_grad_norm', '0'),
    ('optim.clip_grad_norm=.inf', 'optim.clip_grad_norm', 'inf'),
    ('interface.rp_weight=-1', 'interface.rp_weight', '-1'), ('interface.dcc_weight=-1', 'interface.dcc_weight', '-1'),
    ('networks.0.dataset.synthetic_per_class=0', 'networks.0.dataset.synthetic_per_class', '0'),
    ('networks.1.dataset.synthetic_test_per_class=0', 'networks.1.dataset.synthetic_test_per_class', '0'),
    ('networks.1.dataset.train_limit=0', 'networks.1.dataset.train_limit', '0'),
    ('networks.1.dataset.test_limit=-3', 'networks.1.dataset.test_limit', '-3'),
    ('networks.0.dataset.train_shard=[2, 2]', 'networks.0.dataset.train_shard', '[2, 2]'),
    ('networks.0.dataset.train_shard=[-1, 2]', 'networks.0.dataset.train_shard', '[-1, 2]'),
    ('networks.0.dataset.train_shard=[0]', 'networks.0.dataset.train_shard', '[0]'),
    ('networks.1.dataset.shift=[gaussian_noise:6]', 'networks.1.dataset.shift', "['gaussian_noise:6']"),
    ('networks.1.dataset.shift=[defocus_blur:0]', 'networks.1.dataset.shift', "['defocus_blur:0']"),
    ('networks.1.dataset.shift=[fog:1]', 'networks.1.dataset.shift', "['fog:1']"),
    ('networks.1.dataset.shift=[contrast]', 'networks.1.dataset.shift', "['contrast']"),
    ('image_size=4', 'image_size', '4'), ('eval_bn=running_mean', 'eval_bn', "'running_mean'"),
    ('optim.optimizer=adamm', 'optim.optimizer', "'adamm'"), ('optim.schedule=steps', 'optim.schedule', "'steps'"),
    ('mixed_precision=fp32', 'mixed_precision', "'fp32'"), ('mixed_precision=yes', 'mixed_precision', 'True'),
    ('baseline=yes', 'baseline', 'True'),
    ('joint_schedule=round_robin', 'joint_schedule', "'round_robin'"),
    ('interface.rp_norm=batch', 'interface.rp_norm', "'batch'"),
    ('seed=-1', 'seed', '-1'), ('seed="0"', 'seed', "'0'"), ('init_seed=1.5', 'init_seed', '1.5'),
    ('networks.0.name=/tmp/x', 'networks.0.name', "'/tmp/x'"), ('networks.0.name=..', 'networks.0.name', "'..'"),
    ('networks.0.name=a/b', 'networks.0.name', "'a/b'"), ('networks.0.name=""', 'networks.0.name', "''"),
    ('networks.0.split=1.5', 'networks.0.split', '1.5'), ('networks.0.head=""', 'networks.0.head', "''"),
    ('networks.0.model_args=[1]', 'networks.0.model_args', '[1]'),
    ('networks.0.model_args={a: {b: 1}}', 'networks.0.model_args.a', "{'b': 1}"),
    ('interface.dcc_head={type: timm}', 'interface.dcc_head', "{'type': 'timm'}"),
    ('interface.aux_head=3', 'interface.aux_head', '3'), ('networks=[]', 'networks', '[]'),
    # An empty class list was taken for all classes (or, in dcc_classes, all common classes).
    ('networks.0.dataset.classes=[]', 'networks.0.dataset.classes', '[]'),
    ('networks.1.dataset.class_names=[]', 'networks.1.dataset.class_names', '[]'),
    ('interface.dcc_classes=[]', 'interface.dcc_classes', '[]'),
    ('optim=null', 'optim', 'None'), ('trackers=[tensorbord]', 'trackers.0', "'tensorbord'"), ('push_to_hub=/abs', 'push_to_hub', "'/abs'"),
]


@pytest.mark.parametrize('override, key, shown', BAD, ids=[b[0] for b in BAD])
def test_bad_value_names_key_value_and_a_valid_example(override, key, shown):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    message = str(e.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f'{key} must be ') and f', got {shown} (' in message, message
    example = message.split('; write ' if '; write ' in message else '; e.g. ')[1]
    assert load_config(None, [example]), example  # the suggested value is itself valid


def test_boolean_words_suggest_what_they_mean():
    with pytest.raises(ConfigError, match=r"^interface.rp must be true or false, got 'no' \(a string\); "
                                          r"write interface.rp=false$"):
        load_config(None, ['interface.rp="no"'])
    with pytest.raises(ConfigError, match='write augment=true$'):
        load_config(None, ['augment="yes"'])


def test_every_bad_key_is_listed_one_per_line():
    with pytest.raises(ConfigError) as e:
        load_config(None, ['steps=0', 'interface.rp="no"', 'networks.1.dataset.train_limit=0', 'nope=1'])
    lines = str(e.value).splitlines()
    assert len(lines) == 4
    assert sorted(line.split()[0] for line in lines[:3]) == ['interface.rp', 'networks.1.dataset.train_limit',
                                                             'steps']
    assert "['nope']" in lines[3]


def test_assignment_is_checked_too():
    cfg = load_config()
    with pytest.raises(ValueError):
        cfg.interface.rp = 'no'
    with pytest.raises(ValueError):
        cfg.networks[0].name = '/etc'
    assert NetworkConfig(name='x').dataset.source == 'synthetic:A'


@pytest.mark.parametrize('override', ['data', 'data=', 'data=""'])
def test_a_data_override_without_a_preset_name_is_refused(override):
    with pytest.raises(ConfigError, match=r'names no data preset.*data=NAME'):
        load_config(None, [override])


@pytest.mark.parametrize('overrides, message', [
    # The independent baseline of an RP pre-training trained nothing (loss 0) and reported chance as its accuracy.
    (['task_weight=0'], r'task_weight is 0, .* the independent baseline .* set baseline=null'),
    # head_split cuts a timm model named as head; with the network's own tail it was silently ignored.
    (['networks.0.head_split=layer3'], r'networks\.0\.head_split .* head is tail'),
    # Placeholders were filled only in files: --set output_dir=runs/{data}/x wrote to a folder named {data}.
    (['output_dir=runs/{data}/x'], r'output_dir=runs/\{data\}/x: \{data\} is filled only in config files'),
])
def test_keys_that_would_be_ignored_or_train_nothing_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_bad_shift_is_refused_at_load_not_after_decoding():
    """docs/training.md: an out-of-range value is a ConfigError before anything runs; a bad shift was refused only
    by apply_shift, once the split was decoded."""
    shift = 'networks.1.dataset.shift=[defocus_blur:2, gray_contrast:2, gaussian_noise:6]'
    with pytest.raises(ConfigError, match=r"networks\.1\.dataset\.shift must be .*severity 1 to 5.*gaussian_noise.*"
                                          r"'gaussian_noise:6' is not"):
        load_config(None, [shift])
    from timm_compat.shifts import CORRUPTIONS
    load_config(None, [f'networks.1.dataset.shift={[f"{name}:{s}" for name in CORRUPTIONS for s in (1, 5)]}'])


def test_a_shift_of_a_streamed_split_is_refused_at_load():
    """Under data_storage: stream the shift was refused only when the split was loaded, after the config and
    possibly after other networks' data had been decoded. Synthetic sources are generated in memory: they may."""
    shift = 'networks.1.dataset.shift=[defocus_blur:2]'
    with pytest.raises(ConfigError, match=r'networks\.1\.dataset\.shift .* data_storage is stream.*'
                                          r'data_storage=memory'):
        load_config(None, [shift, 'data_storage=stream', 'networks.1.dataset.source=parquet:data/x'])
    load_config(None, [shift, 'data_storage=stream'])  # synthetic:B
    load_config(None, [shift, 'data_storage=auto', 'networks.1.dataset.source=parquet:data/x'])
