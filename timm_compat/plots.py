"""Figures of the paper's analyses as PNG files, and a markdown report that embeds them.

Figures are drawn on :class:`matplotlib.figure.Figure` objects rather than through ``pyplot``: saving a PNG then
uses the Agg renderer directly, needs no display, and leaves the caller's global matplotlib backend alone.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .analysis import sort_correlation

__all__ = ['plot_recombination_matrix', 'plot_correlation_blocks', 'plot_accuracy_curves', 'plot_bars',
           'plot_loss_curves', 'plot_phase', 'ReportTable',
           'ReportFigure', 'matrix_table', 'write_report']

PathLike = Union[str, os.PathLike]


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != '.png':
        raise ValueError(f'Figures are written as PNG: give a path ending in .png, got {str(path)!r}.')
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    return path


def plot_recombination_matrix(matrix: torch.Tensor, names: Sequence[str], path: PathLike, title: str = '',
                              head_names: Optional[Sequence[str]] = None) -> Path:
    """Heatmap of a recombination matrix, annotated in percent.

    Args:
        matrix: ``(N, M)`` accuracies in ``[0, 1]``; rows are extractors, columns heads (as returned by
            :func:`~timm_compat.evaluation.recombination_matrix`).
        names: Extractor (row) names.
        path: Output ``.png``.
        title: Figure title.
        head_names: Head (column) names; default ``names``.

    Returns:
        ``path``.
    """
    values = 100 * torch.as_tensor(matrix, dtype=torch.float64).cpu()
    head_names = list(names if head_names is None else head_names)
    if values.dim() != 2 or values.shape != (len(names), len(head_names)):
        raise ValueError(f'The matrix has shape {tuple(values.shape)} but there are {len(names)} extractor names '
                         f'and {len(head_names)} head names.')
    rows, cols = values.shape
    fig = Figure(figsize=(1.0 + 1.1 * cols, 0.8 + 0.8 * rows))
    ax = fig.subplots()
    image = ax.imshow(values.numpy(), cmap='viridis', vmin=0, vmax=100)
    for i in range(rows):
        for j in range(cols):
            # Dark text on the light (high) end of viridis, light text on the dark end.
            ax.text(j, i, f'{values[i, j]:.1f}', ha='center', va='center',
                    color='black' if values[i, j] > 60 else 'white')
    ax.set_xticks(range(cols), head_names, rotation=30, ha='right')
    ax.set_yticks(range(rows), names)
    ax.set_xlabel('head')
    ax.set_ylabel('extractor')
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label='accuracy (%)')
    return _save(fig, path)


def plot_correlation_blocks(blocks: Mapping[str, Tuple[torch.Tensor, str]], path: PathLike,
                            title: str = '') -> Path:
    """Per-channel cross-correlation blocks in the style of the paper's Fig. 3, side by side.

    Each block is the channel correlation matrix reordered by :func:`~timm_compat.analysis.sort_correlation`:
    strongest pairs top-left, titled with the mean correlation of the pairs on its diagonal.

    Args:
        blocks: Label -> ``(correlation, mode)``, with ``mode`` ``'direct'`` (compatible networks, channel ``i``
            with channel ``i``) or ``'permuted'`` (after the optimal channel matching, "permuted independent").
        path: Output ``.png``.
        title: Figure title.

    Returns:
        ``path``.
    """
    if not blocks:
        raise ValueError('No correlation blocks to plot: pass {label: (correlation, "direct" | "permuted")}.')
    fig = Figure(figsize=(2.6 * len(blocks) + 0.8, 3.2))
    axes = fig.subplots(1, len(blocks), squeeze=False)[0]
    for ax, (label, (corr, mode)) in zip(axes, blocks.items()):
        ordered, mean = sort_correlation(corr, mode)
        image = ax.imshow(ordered.cpu().numpy(), cmap='RdBu_r', vmin=-1, vmax=1, interpolation='nearest')
        ax.set_title(f'{label}\n{mean:.2f}', fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_ylabel('channels of A')
    for ax in axes:
        ax.set_xlabel('channels of B')
    fig.colorbar(image, ax=list(axes), label='correlation', shrink=0.8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_accuracy_curves(curves: Mapping[str, Tuple[Sequence[float], Sequence[float]]], path: PathLike,
                         title: str = '', annotate_steps: Sequence[float] = (),
                         xlabel: str = 'fine-tuning steps', log_x: bool = True,
                         marks: Optional[Mapping[str, float]] = None) -> Path:
    """Accuracy against fine-tuning steps on a log x axis, like the paper's Fig. 5 (or a linear one).

    Step 0 (directly after recombination) has no place on a log axis, so the axis is symmetric-log: linear on
    ``[0, 1]`` and logarithmic above, with the gap from step 0 to step 1 as wide as the decade from 1 to 10.

    Args:
        curves: Label -> ``(steps, accuracies)``, accuracies in ``[0, 1]`` (shown in percent).
        path: Output ``.png``.
        title: Figure title.
        annotate_steps: Steps whose accuracies are written next to the points (the paper overlays the values
            directly after recombination and after one epoch).
        xlabel: x-axis label.
        log_x: The symmetric-log axis above; False for a plain linear axis (a curve sampled at even steps).
        marks: Label -> step, drawn as a dotted vertical line with its label (the paper marks one epoch).

    Returns:
        ``path``.
    """
    if not curves:
        raise ValueError('No curves to plot: pass {label: (steps, accuracies)}.')
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    for label, (steps, accuracies) in curves.items():
        steps, accuracies = [float(s) for s in steps], [100 * float(a) for a in accuracies]
        if len(steps) != len(accuracies):
            raise ValueError(f'Curve {label!r} has {len(steps)} steps but {len(accuracies)} accuracies.')
        if any(s < 0 for s in steps):
            raise ValueError(f'Curve {label!r} has negative steps; steps count fine-tuning updates from 0.')
        line, = ax.plot(steps, accuracies, marker='o', markersize=3, label=label)
        for step, acc in zip(steps, accuracies):
            if step in annotate_steps:
                ax.annotate(f'{acc:.1f}', (step, acc), textcoords='offset points', xytext=(0, 5), ha='center',
                            fontsize=8, color=line.get_color())
    for label, step in (marks or {}).items():
        ax.axvline(step, color='grey', linestyle=':', linewidth=1)
        ax.annotate(label, (step, 0), xycoords=('data', 'axes fraction'), xytext=(3, 4), textcoords='offset points',
                    fontsize=8, color='grey')
    if log_x:
        # matplotlib stretches the linear part by 1 / (1 - 1/base): linscale 0.9 makes [0, 1] exactly one decade.
        ax.set_xscale('symlog', linthresh=1.0, linscale=0.9)
        ax.set_xlim(left=-0.2)  # keeps the step-0 markers off the frame
        ax.xaxis.set_major_formatter(FuncFormatter(lambda step, _: f'{step:g}'))
    ax.set_xlabel(xlabel)
    ax.set_ylabel('accuracy (%)')
    ax.grid(True, which='major', alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_bars(bars: Mapping[str, Sequence[float]], path: PathLike, title: str = '',
              paper: Optional[Mapping[str, float]] = None, ylabel: str = 'recombination accuracy (%)') -> Path:
    """Mean over seeds as bars with a one-std error bar and each seed as a dot, like the paper's Fig. 2 and 4.

    Args:
        bars: Label -> the values of its seeds, in percent; bars are drawn in this order.
        path: Output ``.png``.
        title: Figure title.
        paper: Label -> the paper's value (%), drawn as a black tick over the bar; labels it lacks get none.
        ylabel: y-axis label.

    Returns:
        ``path``.
    """
    return _save(_bars_figure(bars, title, paper, ylabel), path)


def _bars_figure(bars: Mapping[str, Sequence[float]], title: str, paper: Optional[Mapping[str, float]],
                 ylabel: str) -> Figure:
    if not bars or any(len(v) == 0 for v in bars.values()):
        raise ValueError('Every bar needs at least one value: pass {label: [value of each seed, ...]}.')
    labels = list(bars)
    values = [torch.tensor([float(v) for v in bars[k]], dtype=torch.float64) for k in labels]
    means = [float(v.mean()) for v in values]
    stds = [float(v.std()) if len(v) > 1 else 0.0 for v in values]  # one seed: no spread to show
    fig = Figure(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 4.0))
    ax = fig.subplots()
    ax.bar(range(len(labels)), means, yerr=stds, capsize=4, color='#8fb8de', edgecolor='#2a5d8a')
    for i, v in enumerate(values):
        ax.plot([i] * len(v), v.tolist(), 'o', markersize=3, color='#2a5d8a')
        ax.annotate(f'{means[i]:.1f}', (i, means[i] + stds[i]), textcoords='offset points', xytext=(0, 3),
                    ha='center', fontsize=8)
    marked = [(i, paper[k]) for i, k in enumerate(labels) if paper and k in paper]
    for n, (i, value) in enumerate(marked):
        ax.plot([i - 0.4, i + 0.4], [value, value], color='black', linewidth=2, label='paper' if n == 0 else None)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30 if len(labels) > 4 else 0, ha='right' if len(labels) > 4 else 'center')
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.grid(True, axis='y', alpha=0.3)
    if marked:
        ax.legend()
    if title:
        ax.set_title(title)
    return fig


@dataclass
class ReportTable:
    """A markdown table for :func:`write_report`; float cells are printed with ``digits`` decimals."""
    header: Sequence[str]
    rows: Sequence[Sequence[object]]
    caption: str = ''
    digits: int = 1


@dataclass
class ReportFigure:
    """An image for :func:`write_report`, linked relative to the report."""
    path: PathLike
    caption: str = ''


def plot_loss_curves(rows: Sequence[Mapping[str, object]], path: PathLike, title: str = '') -> Path:
    """Each logged loss of ``metrics.csv`` rows against the step, the total ``loss`` drawn bold.

    Args:
        rows: ``{'step': s, 'loss': v, '<network>/<term>': v, ...}`` rows (``lr`` and ``time`` are not drawn).
        path: Output ``.png``.
        title: Figure title.

    Returns:
        ``path``.
    """
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ('step', 'lr', 'time')))
    if not keys:
        raise ValueError('No logged losses to plot.')
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    for key in keys:
        # Under the alternate schedule a network's columns are empty in the rows before its first turn.
        points = [(float(r['step']), float(r[key])) for r in rows if r.get(key) not in ('', None)]
        ax.plot(*zip(*points), label=key, linewidth=2.5 if key == 'loss' else 1.0)
    ax.set_xlabel('step')
    ax.set_ylabel('loss (mean per log interval)')
    ax.legend(fontsize='small', ncol=2)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_phase(folder: PathLike, summary: Mapping[str, object], rows: Sequence[Mapping[str, object]]
               ) -> Tuple[Path, Path]:
    """A phase folder's figures: ``recombination.png`` (its matrix) and ``loss.png`` (its ``metrics.csv``).

    Args:
        folder: The phase's output folder.
        summary: The phase's summary (``networks``, ``recombination_matrix``, ``phase``).
        rows: The phase's ``metrics.csv`` rows.
    """
    folder, tag = Path(folder), summary.get('phase', '')
    matrix = plot_recombination_matrix(torch.tensor(summary['recombination_matrix']), summary['networks'],
                                       folder / 'recombination.png', title=f'[{tag}] recombination accuracy')
    return matrix, plot_loss_curves(rows, folder / 'loss.png', title=f'[{tag}] training losses')


def matrix_table(matrix: torch.Tensor, names: Sequence[str], head_names: Optional[Sequence[str]] = None,
                 caption: str = '') -> ReportTable:
    """A recombination matrix (accuracies in ``[0, 1]``) as a :class:`ReportTable` in percent, extractors as rows."""
    head_names = list(names if head_names is None else head_names)
    values = torch.as_tensor(matrix, dtype=torch.float64).cpu()
    if values.shape != (len(names), len(head_names)):
        raise ValueError(f'The matrix has shape {tuple(values.shape)} but there are {len(names)} extractor names '
                         f'and {len(head_names)} head names.')
    rows = [[name, *(100 * values[i]).tolist()] for i, name in enumerate(names)]
    return ReportTable(['extractor \\ head', *head_names], rows, caption)


def _cell(value: object, digits: int) -> str:
    text = f'{value:.{digits}f}' if isinstance(value, float) else str(value)
    return text.replace('|', '\\|').replace('\n', ' ')


def _table_markdown(table: ReportTable) -> str:
    width = len(table.header)
    bad = [i for i, row in enumerate(table.rows) if len(row) != width]
    if bad:
        raise ValueError(f'Table rows {bad} do not have {width} cells like the header {list(table.header)}.')
    lines = ['| ' + ' | '.join(_cell(h, table.digits) for h in table.header) + ' |',
             '|' + '---|' * width]
    lines += ['| ' + ' | '.join(_cell(v, table.digits) for v in row) + ' |' for row in table.rows]
    if table.caption:
        lines += ['', f'*{table.caption}*']
    return '\n'.join(lines)


def _figure_markdown(figure: ReportFigure, out_dir: Path) -> str:
    path = Path(figure.path)
    if not path.is_file():
        raise FileNotFoundError(f'Figure {str(path)!r} does not exist: save the plot before writing the report.')
    # Relative links keep the report valid when the output folder is moved or uploaded as a whole.
    link = Path(os.path.relpath(path.resolve(), out_dir.resolve())).as_posix()
    text = f'![{figure.caption or path.stem}]({link})'
    return text + (f'\n\n*{figure.caption}*' if figure.caption else '')


ReportItem = Union[str, ReportTable, ReportFigure]


def write_report(out_dir: PathLike, title: str,
                 sections: Mapping[str, Union[ReportItem, Sequence[ReportItem]]]) -> Path:
    """Write ``out_dir/report.md``: a title, then one ``##`` section per entry of ``sections``.

    Args:
        out_dir: Folder of the report (created if needed); figures are linked relative to it.
        title: Report title.
        sections: Heading -> item or list of items, in order. An item is markdown text (``str``), a
            :class:`ReportTable` or a :class:`ReportFigure` (an existing image file).

    Returns:
        The path of ``report.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f'# {title}']
    for heading, items in sections.items():
        parts.append(f'## {heading}')
        for item in [items] if isinstance(items, (str, ReportTable, ReportFigure)) else items:
            if isinstance(item, str):
                parts.append(item)
            elif isinstance(item, ReportTable):
                parts.append(_table_markdown(item))
            elif isinstance(item, ReportFigure):
                parts.append(_figure_markdown(item, out_dir))
            else:
                raise TypeError(f'Section {heading!r} has an item of type {type(item).__name__}: use markdown '
                                f'text (str), ReportTable(...) or ReportFigure(path).')
    path = out_dir / 'report.md'
    path.write_text('\n\n'.join(parts) + '\n')
    return path
