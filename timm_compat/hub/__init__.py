"""Find and inspect timm-compat components on the Hugging Face Hub, from Python or the command line.

::

    python -m timm_compat.hub list --interface 3f2a9c0d1b7e   # components of one interface, as a table
    python -m timm_compat.hub show ORG/NAME                    # card summary and interface of one component
    python -m timm_compat.hub check ORG/EXTRACTOR ORG/HEAD     # do they fit, and why not

``show`` and ``check`` also take local component folders. Exit status: 0 done (``check``: they fit), 1 they do
not fit, 2 an error (bad arguments, a component that cannot be found or loaded, or a crash such as a lost
connection, with its traceback). What a component is, and
loading one, live in :mod:`timm_compat.component`; whether two fit, in :func:`timm_compat.compatible.fit_problems`.

This is a package with a ``__main__`` rather than a module run with ``-m``, because ``timm_compat`` imports it:
running an already imported module as ``__main__`` makes Python warn and load it twice.
"""
import argparse
import re
import sys
import traceback
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Union

from huggingface_hub import HfApi, ModelCard, ModelInfo
from huggingface_hub.errors import OfflineModeIsEnabled

from ..compatible import fit_problems
from ..component import CARD_NAME, Component, ComponentError, load_component, pinned, read_verified, resolve_file
from ..interface import Interface

__all__ = ['component_tags', 'list_components', 'main']

_INTERFACE_ID = re.compile(r'[0-9a-f]{12}')


def _interface_id(interface: Union[str, Interface]) -> str:
    iid = interface.id if isinstance(interface, Interface) else interface
    if not isinstance(iid, str) or not _INTERFACE_ID.fullmatch(iid):
        raise ValueError(f'{interface!r} is not an interface id: give the 12 hex digits of Interface.id (shown by '
                         f'`python -m timm_compat.hub show REPO`), or an Interface.')
    return iid


def component_tags(interface: Union[str, Interface, None] = None, role: Optional[str] = None) -> List[str]:
    """The model-card tags that select components of ``interface`` (an id or an :class:`Interface`) and ``role``."""
    tags = ['timm-compat']
    if interface is not None:
        tags.append(f'compat-interface-{_interface_id(interface)}')
    if role is not None:
        if role not in Component.registry:
            raise ValueError(f'Unknown role {role!r}: use one of {sorted(Component.registry)}.')
        tags.append(f'compat-role-{role}')
    return tags


def list_components(interface: Union[str, Interface, None] = None, role: Optional[str] = None, *,
                    author: Optional[str] = None, limit: Optional[int] = None,
                    token: Union[str, bool, None] = None) -> Iterable[ModelInfo]:
    """Components on the Hub, found by their model-card tags through ``HfApi.list_models``.

    Args:
        interface: Interface id or :class:`Interface`; ``None`` for every interface.
        role: ``"extractor"``, ``"head"`` or ``"interface"``; ``None`` for every role.
        author: Only repos of this user or organisation.
        limit: At most this many results.
        token: Hub token, to include private repos.

    Returns:
        The ``huggingface_hub.ModelInfo`` of each matching repo, fetched page by page as iterated.

    Example:
        >>> heads = [m.id for m in timm_compat.list_components(interface=extractor.interface_id, role='head')]
    """
    return HfApi(token=token).list_models(filter=component_tags(interface, role), author=author, limit=limit)


def _tag(tags: Sequence[str], prefix: str) -> str:
    return next((t[len(prefix):] for t in tags if t.startswith(prefix)), '-')


def _table(rows: List[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return '\n'.join('  '.join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _cmd_list(args) -> int:
    tags = component_tags(args.interface, args.role)
    try:
        rows = [(m.id, _tag(m.tags or [], 'compat-role-'), _tag(m.tags or [], 'compat-interface-'),
                 _tag(m.tags or [], 'timm-backbone-'), m.last_modified.date().isoformat() if m.last_modified else '-')
                for m in list_components(args.interface, args.role, author=args.author, limit=args.limit)]
    except OfflineModeIsEnabled as e:
        raise ComponentError('Listing asks the Hub, but HF_HUB_OFFLINE is set: unset it to search the Hub. '
                             '(show and check work offline on cached components.)') from e
    if not rows:
        print(f'No components on the Hub tagged {tags}.')
        return 0
    print(_table([('REPO', 'ROLE', 'INTERFACE', 'BACKBONE', 'UPDATED'), *rows]))
    return 0


def _classes(names: Optional[Sequence[str]], n: Optional[int] = None) -> str:
    if names is None:
        return str(n) if n is not None else '-'
    shown = ', '.join(names[:8])
    return f'{len(names)}: {shown}' + (', ...' if len(names) > 8 else '')


def _cmd_show(args) -> int:
    # The config the weights were saved with, as loading checks it: an edited config.json is refused, not shown. The
    # card is read at the same commit, so a push landing meanwhile cannot show another version's license and tags.
    resolve = pinned(args.repo, {'revision': args.revision})
    config, _ = read_verified(args.repo, resolve)
    iid = config.get('interface_id')
    rows = [('repo', args.repo), ('role', config['role']),
            ('interface', iid or 'none: an independent network, compatible with nothing else')]
    if config['role'] == 'interface':
        rows += [('width', config['width']), ('rp head', config.get('rp_head') or 'no'),
                 ('dcc head', config.get('dcc_head') or 'no'), ('dcc classes', _classes(config.get('dcc_classes')))]
    elif config['role'] not in ('extractor', 'head'):  # a role defined elsewhere (a stitch): its own fields
        rows += [(k, v) for k, v in sorted(config.items())
                 if k not in ('role', 'interface_id', 'format_version', 'weights_sha256')]
    else:
        cfg = config.get('pretrained_cfg', {})
        rows += [('backbone', f'{config["backbone"]} {config.get("model_args") or ""}'.rstrip()),
                 ('split', config['split']), ('width', config['width'])]
        if config['role'] == 'extractor':
            rows.append(('input', f'{cfg.get("input_size")}, mean {cfg.get("mean")}, std {cfg.get("std")}'))
        else:
            rows.append(('classes', _classes(config.get('class_names'), config.get('num_classes'))))
    try:
        card = ModelCard.load(resolve_file(args.repo, CARD_NAME, **resolve)).data
        rows += [('license', card.license), ('base model', card.base_model or '-'),
                 ('tags', ', '.join(card.tags or []))]
    except ComponentError as e:
        rows.append(('card', f'missing ({e})'))
    print(_table([(f'{k}:', v) for k, v in rows]))
    if iid:
        print(f'\nComponents of this interface: python -m timm_compat.hub list --interface {iid}')
    return 0


def _cmd_check(args) -> int:
    extractor = load_component(args.extractor, revision=args.extractor_revision)
    head = load_component(args.head, revision=args.head_revision)
    for name, c in ((args.extractor, extractor), (args.head, head)):
        detail = (f', width {c.width}, {c.config["backbone"]} split {c.config["split"]}'
                  if c.role in ('extractor', 'head') else '')
        print(f'{c.role:<10} {name}: interface {c.interface_id}{detail}')
    problems = fit_problems(extractor, head)
    if problems:
        print('They do not fit:\n' + '\n'.join(f'  - {p}' for p in problems))
        if extractor.role == 'extractor' and extractor.interface_id:
            print(f'Heads of the extractor\'s interface: python -m timm_compat.hub list --interface '
                  f'{extractor.interface_id} --role head')
        return 1
    size = 'x'.join(map(str, extractor.pretrained_cfg.get('input_size', (3, 224, 224))))
    print(f'They fit: timm_compat.recombine(extractor, head) classifies {size} images into {head.num_classes} '
          f'classes (interface {extractor.interface_id}).')
    return 0


def _interface_arg(value: str) -> str:
    try:
        return _interface_id(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _positive(value: str) -> int:
    if not value.lstrip('-').isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f'{value} is not a positive integer')
    return int(value)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``python -m timm_compat.hub`` command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog='python -m timm_compat.hub',
                                     description='Find, inspect and check timm-compat components on the Hub.')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('list', help='components on the Hub, as a table')
    p.add_argument('--interface', type=_interface_arg, metavar='ID', help='only components of this interface id')
    p.add_argument('--role', choices=sorted(Component.registry), help='only components of this role')
    p.add_argument('--author', metavar='ORG', help='only repos of this user or organisation')
    p.add_argument('--limit', type=_positive, default=100, help='at most this many (default: %(default)s)')
    p = sub.add_parser('show', help='card summary and interface of one component (downloads and verifies it as '
                                    'loading does)')
    p.add_argument('repo', metavar='REPO_OR_DIR')
    p.add_argument('--revision', help='branch, tag or commit')
    p = sub.add_parser('check', help='whether an extractor and a head fit, and why not')
    p.add_argument('extractor', metavar='EXTRACTOR', help='repo id or folder')
    p.add_argument('head', metavar='HEAD', help='repo id or folder')
    p.add_argument('--extractor-revision', metavar='REV')
    p.add_argument('--head-revision', metavar='REV')
    args = parser.parse_args(argv)
    for flag, path in (('revision', 'repo'), ('extractor_revision', 'extractor'), ('head_revision', 'head')):
        if getattr(args, flag, None) and Path(getattr(args, path)).is_dir():
            parser.error(f'--{flag.replace("_", "-")} {getattr(args, flag)}: {getattr(args, path)} is a local '
                         f'folder, which has no revisions; drop the revision or give a Hub repo id.')
    try:
        return {'list': _cmd_list, 'show': _cmd_show, 'check': _cmd_check}[args.command](args)
    except ComponentError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except Exception:  # a crash (the network, a bug) is an error too, never "they do not fit" (1)
        traceback.print_exc()
        return 2
