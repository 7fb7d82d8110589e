"""What ``make_compatible`` and ``recombine`` accept where a component goes: the component itself, a local component
folder or a Hub repo id (loaded and verified through :func:`~timm_compat.load_component`), or for a head a timm
model name.
"""
from pathlib import Path
from typing import Optional, Union

import timm
from torch import nn

from .component import Component, load_component
from .components import Head
from .interface import DEFAULT_WIDTH, Interface

__all__ = ['FRESH_INTERFACE', 'as_component', 'as_head', 'as_interface']

Reference = Union[str, Path]


class _FreshInterface:
    """The ``interface`` default of ``make_compatible``: a new ``Interface(width, rp=True)``."""

    def __repr__(self) -> str:
        return f'Interface(width={DEFAULT_WIDTH}, rp=True)'


FRESH_INTERFACE = _FreshInterface()


def _is_component_path(ref: Reference) -> bool:
    """A folder, or ``org/name``: timm model names hold no slash (``hf-hub:`` names are not allowed)."""
    return isinstance(ref, Path) or Path(ref).is_dir() or '/' in ref


def as_component(ref: Union[Component, Reference]) -> Component:
    """``ref`` itself, or the component its folder or Hub id holds."""
    return load_component(str(ref)) if isinstance(ref, (str, Path)) else ref


def as_head(head: Union[str, Path, nn.Module]) -> Union[str, nn.Module]:
    """``"tail"``, a timm model name or a module as given; a folder or Hub id loaded as a :class:`Head`."""
    if isinstance(head, str) and (head == 'tail' or timm.is_model(head)):
        return head
    if isinstance(head, (str, Path)) and _is_component_path(head):
        return Head.from_pretrained(str(head))
    return head  # a module, or an unknown name that timm_compat's create_backbone names close matches for


def as_interface(interface, head: Union[str, nn.Module], width: Optional[int]) -> Optional[Interface]:
    """The interface ``make_compatible`` binds to.

    A folder or Hub id is loaded and frozen: components of a published interface stay compatible only while its
    aux heads stay as published (incremental training, Gygli et al. 2021, Sec. 3.4). Not given: a trained
    :class:`Head`'s own interface, else a fresh ``Interface(width, rp=True)``.

    Raises:
        ValueError: Not given, with a head loaded from a folder or the Hub, whose interface it cannot name; or a
            ``width`` other than the interface's.
    """
    if interface is FRESH_INTERFACE:
        if isinstance(head, Head) and head.interface is not None:
            interface = head.interface
        elif isinstance(head, Head) and head.interface_id is not None:
            raise ValueError(f'The head was trained against interface {head.interface_id}: give that interface too, '
                             f'interface="ORG/NAME" (its folder or Hub id; `python -m timm_compat.hub list --interface '
                             f'{head.interface_id} --role interface` finds it).')
        else:
            return Interface(width=width or DEFAULT_WIDTH, rp=True)
    elif isinstance(interface, (str, Path)):
        interface = Interface.from_pretrained(str(interface)).freeze()
    elif interface is not None and not isinstance(interface, Interface):
        raise ValueError(f'interface must be an Interface, a folder or a Hub id, or None for an independent network; '
                         f'got {type(interface).__name__}.')
    if interface is not None and width is not None and width != interface.width:
        raise ValueError(f'width={width}, but the interface has width {interface.width}: drop width, or give an '
                         f'interface of width {width}.')
    return interface
