"""The model card of a saved recombined model: which call loads it, and what its BN statistics are good for."""
import json
from typing import Any, Dict, List

from huggingface_hub import ModelCard, ModelCardData

PAPER_URL = 'https://arxiv.org/abs/2004.03898'


def _loading(config: Dict[str, Any], repo_id: str) -> List[str]:
    arch = config['architecture']
    if arch != 'compatible_model':
        plain = config['loads_with'] == 'timm'
        return [
            f'The extractor and the head are both cut from `{arch}` at the same split with identity adapters, so '
            f'together they are a plain `{arch}`, saved as timm saves one: '
            + ('plain timm loads it, without timm-compat.' if plain else
               f'timm loads it once `import timm_compat` has registered `{arch}` with timm.'), '',
            '```python', 'import timm', *([] if plain else ['import timm_compat  # registers ' + arch]), '',
            f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True)',
            '# or, keeping the extractor / head split:',
            f'# import timm_compat; model = timm_compat.load_recombined("{repo_id}")', '```']
    return [
        'The components differ in backbone, split or adapters, so no plain timm architecture holds them. Its '
        'architecture is `compatible_model`, which `import timm_compat` registers with timm: plain timm without '
        'timm-compat cannot load it.', '',
        '```python', 'import timm', 'import timm_compat  # registers compatible_model with timm', '',
        f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True)',
        f'# or: model = timm_compat.load_recombined("{repo_id}")', '```']


def _bn_words(config: Dict[str, Any]) -> str:
    calibration = config.get('bn_calibration')
    if calibration and calibration.get('method') == 'no_bn':
        return ('The model has no BatchNorm layer (checked by `timm_compat.deploy`): its predictions do not depend on '
                'the rest of the batch, so `model.eval()` classifies single images as saved.')
    if calibration:
        return (f'BN running statistics were recalibrated on {calibration.get("images")} unlabelled target images '
                f'(AdaBN, `timm_compat.deploy`): `model.eval()` classifies single images.')
    return ('BN running statistics are those the two components were saved with (each network\'s own). Recombined '
            'components are evaluated with batch statistics (the paper\'s protocol, '
            '`timm_compat.eval_mode(model, "batch")`); to classify single images, recalibrate first: '
            '`model = timm_compat.deploy(model, unlabelled_images)`.')


def _pair_words(config: Dict[str, Any]) -> str:
    if config.get('interface_id'):
        return (f'An extractor and a head trained against one interface, so compatible ([Gygli et al., AAAI 2021]'
                f'({PAPER_URL})), joined and saved as one timm model.')
    ids = [config[role].get('interface_id') for role in ('extractor', 'head')]
    if any(ids):  # different interfaces, or one part without: only recombine(force=True) joins those
        return ('An extractor and a head that share no interface, joined with `force=True` and saved as one timm '
                'model: they were not trained to fit each other, so expect the accuracy measured for this pair, not '
                'their own.')
    # Neither was trained against an interface: one network saved whole, or parts of two joined with force=True.
    # Nothing saved tells these apart, so the card claims neither.
    return ('An extractor and a head that share no interface: both were trained without one (parts of independent '
            'networks), and are saved as one timm model. If they come from two networks, they were not trained to fit '
            'each other: expect the accuracy measured for this pair, not their own.')


def _licences(config: Dict[str, Any]) -> Dict[str, str]:
    """Each part's licence: that of the pretrained weights it started from (timm's ``license``), else apache-2.0."""
    return {role: config[role].get('pretrained_cfg', {}).get('license') or 'apache-2.0'
            for role in ('extractor', 'head')}


def _licence_words(licences: Dict[str, str]) -> List[str]:
    if len(set(licences.values())) == 1:
        return []
    return ['## Licence', '', 'The parts are under different licences (`license: other`), each that of the '
            'pretrained weights it started from: ' + ', '.join(f'the {role} `{name}`' for role, name in
                                                              licences.items()) + '. Both apply to this model.', '']


def model_card(config: Dict[str, Any], repo_id: str) -> str:
    """Card text: YAML front matter (library, tags), the two components, the one call that loads the model."""
    tags = ['timm-compat', 'timm-compat-recombined', 'image-classification']
    if config.get('interface_id'):
        tags.append(f'compat-interface-{config["interface_id"]}')
    licences = _licences(config)
    # The Hub asks a license_name of license: other; the section _licence_words writes says what it means.
    licence = ({'license': licences['extractor']} if len(set(licences.values())) == 1 else
               {'license': 'other', 'license_name': '-and-'.join(licences.values())})
    data = ModelCardData(library_name='timm' if config['loads_with'] == 'timm' else 'timm-compat',
                         **licence, tags=tags, pipeline_tag='image-classification')
    rows = [(role, config[role].get(k)) for role in ('extractor', 'head') for k in ('backbone', 'split')]
    body = [
        '# timm-compat recombined model', '',
        _pair_words(config), '',
        '| part | value |', '|---|---|',
        *[f'| {role} {key} | `{json.dumps(value)}` |' for (role, value), key in zip(rows, ['backbone', 'split'] * 2)],
        f'| interface | `{json.dumps(config.get("interface_id"))}` |',
        f'| num_classes | `{config["num_classes"]}` |',
        f'| loads with | `{config["loads_with"]}` |', '',
        '## Loading', '', *_loading(config, repo_id), '',
        '## BatchNorm', '', _bn_words(config), '',
        *_licence_words(licences),
    ]
    return str(ModelCard(f'---\n{data.to_yaml()}\n---\n\n' + '\n'.join(body) + '\n'))
