"""Split one small model of every timm module (family) and check each split independently of split_model.

For each family the smallest-named model is created without pretrained weights and split at up to three points
(its ``feature_info`` levels first). A split that ``split_model`` returns is then re-checked here: two eval
forwards of ``tail(trunk(x))`` are identical and equal to the model's, a seeded train-mode forward equals the
model's with the same seed, and at a ``feature_info`` level the trunk emits ``(N, num_chs, H, W)`` (channels in
dim 1: no channels-last features taken as channels-first). A split it refuses must say why (a ValueError).

Run from the repository root::

    nice -n 10 python benchmarks/split_sweep.py [--families resnet swin_transformer ...] [--points 3]
"""
import argparse
import collections
import gc
import re
import signal
import time

import timm
import torch
from torch import fx

import timm_compat  # noqa: F401  (registers the CIFAR models; the sweep uses timm's own families only)
from timm_compat._hardware import hardware
from timm_compat._split_probe import _flatten
from common import load_average  # benchmarks/ is on sys.path

_SMALL_WORDS = ('atto', 'femto', 'pico', 'nano', 'tiny', 'mini', 'small', 'lite', 'light')
_SMALL_TOKENS = ('xxs', 'xs', 's', 't', 'b0')
_MAX_BYTES = 2 * 1024 ** 3


def pick_model(module: str) -> str:
    """The family's model whose name marks it smallest: a size word (atto before tiny before small) or token, then
    the smallest depth number in the name, then the shortest name."""
    def rank(name):
        parts = re.split(r'[_.]', name)
        words = [i for i, k in enumerate(_SMALL_WORDS) if any(p.startswith(k) for p in parts)]
        tokens = [len(_SMALL_WORDS) + i for i, k in enumerate(_SMALL_TOKENS)
                  if any(p == k or re.fullmatch(k + r'\d+', p) for p in parts)]
        number = re.search(r'\d+', name)
        return min(words + tokens, default=99), int(number.group()) if number else 0, len(name), name
    return min(timm.list_models(module=module), key=rank)


def parameter_bytes(name: str):
    with torch.device('meta'):
        model = timm.create_model(name)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def probe_size(model):
    """Smallest of (64 px, pretrained_cfg size, patch-embedding size) at which the model runs."""
    cfg = tuple(model.pretrained_cfg.get('input_size', (3, 224, 224)))
    sizes = [(cfg[0], min(cfg[1], 64), min(cfg[2], 64)), cfg]
    img = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if isinstance(img, (tuple, list)) and len(img) == 2:
        sizes.append((cfg[0], *img))
    for size in dict.fromkeys(sizes):
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(2, *size))
            return size
        except Exception:  # not this size
            continue
    return None


def points_of(model, limit: int):
    names = timm_compat.split_points(model)
    info = [i['module'] for i in getattr(model, 'feature_info', []) if i['module'] in names]
    rest = [n for n in names if n not in info]
    if len(info) < limit and rest:
        step = max(1, len(rest) // (limit - len(info)))
        info += rest[::step][:limit - len(info)]
    if len(info) > limit:
        info = [info[round(i * (len(info) - 1) / (limit - 1))] for i in range(limit)] if limit > 1 else info[-1:]
    return info


def _seeded(fn, x):
    torch.manual_seed(0)
    with torch.no_grad():
        return _flatten(fn(x))


def _close(a, b):
    return a is not None and b is not None and len(a) == len(b) and all(
        p.shape == q.shape and torch.allclose(p, q, rtol=1e-5, atol=1e-5) for p, q in zip(a, b))


def verify(model, trunk, tail, x, channels):
    """Independent check of an accepted split: a list of problems (empty when exact) and the feature layout."""
    problems = []
    with torch.no_grad():
        expected = _flatten(model.eval()(x))
        features = trunk.eval()(x)
        first, second = _flatten(tail.eval()(features)), _flatten(tail(trunk(x)))
    if not _close(first, second):
        problems.append('eval not deterministic')
    if not _close(first, expected):
        problems.append('eval differs from model')
    model.train(), trunk.train(), tail.train()
    if not _close(_seeded(lambda v: tail(trunk(v)), x), _seeded(model, x)):
        problems.append('train differs from model')
    model.eval(), trunk.eval(), tail.eval()
    out = next(n for n in trunk.graph.nodes if n.op == 'output').args[0]
    permuted = isinstance(out, fx.Node) and out.target == 'permute' and tuple(out.args[1:]) == (0, 3, 1, 2)
    layout = 'tokens' if features.dim() != 4 else ('NHWC->NCHW' if permuted else 'NCHW')
    if features.dim() == 4 and channels is not None and features.shape[1] != channels:
        problems.append(f'NHWC misuse: feature_info says {channels} channels, trunk gives {tuple(features.shape)}')
    return problems, layout


def sweep_family(module: str, limit: int, stats: collections.Counter, reasons: collections.Counter):
    name = pick_model(module)
    size = parameter_bytes(name)
    if size > _MAX_BYTES:
        stats['skipped'] += 1
        return f'{module:28s} {name}: SKIPPED, parameters need {size / 2 ** 30:.1f} GB (> 2 GB)'
    try:  # 64 px where the architecture takes an img_size: the sweep must fit in minutes on two cores
        model = timm.create_model(name, img_size=64)
    except TypeError:
        model = timm.create_model(name)
    input_size = probe_size(model)
    if input_size is None:
        model = timm.create_model(name)
        input_size = probe_size(model)
    if input_size is None:
        stats['no_input_size'] += 1
        return f'{module:28s} {name}: model does not run at 64 px or its pretrained_cfg size'
    x = torch.randn(2, *input_size)
    channels = {i['module']: i.get('num_chs') for i in getattr(model, 'feature_info', [])}
    model.train()  # split as make_compatible does
    cells, usable = [], 0
    for at in points_of(model, limit):
        try:
            trunk, tail = timm_compat.split_model(model, at, input_size=input_size)
        except ValueError as e:
            reason = re.sub(r'\s+', ' ', str(e))
            kind = next((k for k in ('skip connection', 'returns a', 'different code in train and eval',
                                     'Cannot trace', 'times in forward', 'fail in', 'does not reproduce',
                                     'not called') if k in reason), 'other')
            stats['refused'] += 1
            reasons[kind] += 1
            cells.append(f'{at}: refused ({kind}: {reason[:150]})')
            continue
        except Exception as e:  # a raw error is itself a finding: refusals must be ValueErrors with a reason
            stats['raw_error'] += 1
            cells.append(f'{at}: RAW {type(e).__name__}: {str(e)[:80]}')
            continue
        problems, layout = verify(model, trunk, tail, x, channels.get(at))
        stats['accepted'] += 1
        stats['inexact'] += any('misuse' not in p for p in problems)
        stats['nhwc_misuse'] += any('misuse' in p for p in problems)
        stats['nhwc_adapted'] += layout == 'NHWC->NCHW'
        usable += not problems and layout != 'tokens'
        cells.append(f'{at}: {"exact" if not problems else "; ".join(problems)} [{layout}]')
    stats['usable_families'] += usable > 0
    return f'{module:28s} {name} {tuple(input_size)}: ' + ', '.join(cells)


class FamilyTimeout(BaseException):
    """Not an Exception, so that split_model's own handlers cannot report it as a refusal."""


def _alarm(signum, frame):
    raise FamilyTimeout('family took over --family-seconds')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--families', nargs='*', help='timm modules to sweep (default: all)')
    parser.add_argument('--points', type=int, default=3, help='split points per family')
    parser.add_argument('--family-seconds', type=int, default=120,
                        help='time limit per family; raise it on a loaded machine (default: 120)')
    args = parser.parse_args(argv)
    if args.family_seconds < 1:
        parser.error(f'--family-seconds must be at least 1, got {args.family_seconds}.')
    # An unknown name has no models: swept, it would count as a family error and the sweep would still exit 0.
    unknown = [m for m in args.families or [] if m not in timm.list_modules()]
    if unknown:
        parser.error(f'--families: no timm module named {", ".join(unknown)}; give names from timm.list_modules(), '
                     f'e.g. resnet, vision_transformer.')
    torch.set_num_threads(2)
    # timm's own families only: importing timm_compat also registers its CIFAR models with timm.
    families = args.families or [m for m in timm.list_modules() if timm.models.model_entrypoint(
        timm.list_models(module=m)[0]).__module__.startswith('timm.')]
    print(f"{hardware(torch.device('cpu'))}; {load_average()}", flush=True)
    stats, reasons, start = collections.Counter(), collections.Counter(), time.time()
    signal.signal(signal.SIGALRM, _alarm)
    for module in families:
        signal.alarm(args.family_seconds)
        try:
            print(sweep_family(module, args.points, stats, reasons), flush=True)
        except (Exception, FamilyTimeout) as e:  # creation failures and timeouts are reported; the sweep goes on
            stats['family_error'] += 1
            print(f'{module:28s} ERROR {type(e).__name__}: {str(e)[:120]}', flush=True)
        finally:
            signal.alarm(0)
            gc.collect()
    swept = len(families) - stats['skipped']
    print(f'\nSummary ({time.time() - start:.0f} s, {len(families)} timm families, one model each):')
    print(f'  splits accepted: {stats["accepted"]}, of which inexact in train or eval mode: {stats["inexact"]}')
    print(f'  splits refused with a reason: {stats["refused"]} ({dict(reasons)})')
    print(f'  raw (unexplained) errors: {stats["raw_error"]}; family errors/timeouts: {stats["family_error"]}')
    print(f'  channels-last features adapted to NCHW: {stats["nhwc_adapted"]}; '
          f'silent NHWC misuse: {stats["nhwc_misuse"]}')
    print(f'  families with at least one usable (exact, NCHW) split: {stats["usable_families"]} of {swept}'
          f' (skipped for memory: {stats["skipped"]})')


if __name__ == '__main__':
    main()
