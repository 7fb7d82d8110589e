"""Benchmark: does the streamed loader keep up with a compatibility step, and how many workers does a step need?

    python benchmarks/stream_loader.py                          # CPU: 64 and 128 px, data it writes itself
    python benchmarks/stream_loader.py --sizes 224 --batch-size 16 --workers 1
    python benchmarks/stream_loader.py --device cuda --bf16 --sizes 224 --batch-size 128 --workers 4 8

A split too large for memory is streamed (``data_storage: stream``, :mod:`timm_compat.streaming`): DataLoader
workers read rows of the memory-mapped Arrow table, decode and resize each JPEG (timm's evaluation transform) into
pinned ``uint8`` batches; the step then augments and normalises them on the device as for an in-memory split.

The data: ``--images`` JPEGs of ``--stored`` px (default 500 x 375, ImageNet's typical size, smooth random
content at quality 90, about ImageNet's bytes per image), written once as Parquet shards in the Hub's layout.
For each decoded size, with two networks of ``--backbone`` trained jointly with RP + DCC (train_step.py's
``build_compat``), three things are measured in one run:

* ``decode``: images per second that one process decodes (``StreamedImages.decode``, no workers);
* ``memory`` step: the step fed from batches already decoded and on the device, the loader's cost taken away;
* ``stream`` step with W workers: the same step fed by :func:`~timm_compat.streaming.stream_batches`.

The loader's share is ``1 - memory / stream``, interleaved blocks: the part of a streamed step spent waiting for
data. The workers a step needs are ``ceil(step images/s / decode images/s)``: on a GPU the step's rate is the
GPU's, so the same command with ``--device cuda`` answers it for that GPU. On a CPU the workers take cores from
the step they feed, so a share near 0 is not possible there with every core busy training.
"""
import argparse
import io
import math
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from timm_compat.data import EpochSampler, load_image_data, training_batch
from timm_compat.streaming import stream_batches
from common import interleaved, setup  # benchmarks/ is on sys.path
from train_step import BACKBONES, CLASS_NAMES, build_compat, make_step


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--backbone', default='mobilenetv2_100', choices=list(BACKBONES))
    parser.add_argument('--sizes', type=int, nargs='+', default=[64, 128], help='decoded image sizes (px)')
    parser.add_argument('--batch-size', type=int, default=32, help='images per network per step')
    parser.add_argument('--workers', type=int, nargs='+', default=[1], help='decoding workers to measure')
    parser.add_argument('--images', type=int, default=1024, help='JPEGs to write')
    parser.add_argument('--stored', type=int, nargs=2, default=[500, 375], metavar=('W', 'H'))
    parser.add_argument('--data', default=None, help='folder for the written Parquet shards (default: a temp dir)')
    parser.add_argument('--repeats', type=int, default=4, help='timed block pairs per configuration')
    parser.add_argument('--steps', type=int, default=3, help='steps per timed block')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument('--bf16', action='store_true', help="Accelerator(mixed_precision='bf16')")
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: the cores we may use)')
    parser.add_argument('--default-malloc', action='store_true', help="skip train.py's keep_freed_memory()")
    return parser.parse_args(argv)


def write_jpeg_parquet(root: Path, n: int, size, shards: int = 4) -> str:
    """``n`` smooth random JPEGs of ``size`` (W, H) px, 10 labels, as ``train-0000i-of-0000N.parquet``."""
    rng = np.random.default_rng(0)
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(num_classes=10)})
    images = []
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
        buffer = io.BytesIO()
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, format='JPEG', quality=90)
        images.append({'bytes': buffer.getvalue(), 'path': None})
    ds = datasets.Dataset.from_dict({'image': images, 'label': [i % 10 for i in range(n)]}, features=features)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        ds.shard(shards, i, contiguous=True).to_parquet(str(root / f'train-{i:05d}-of-{shards:05d}.parquet'))
    print(f'wrote {n} JPEGs of {size[0]} x {size[1]} px, {sum(len(x["bytes"]) for x in images) / n / 1e3:.0f} kB '
          f'each on average, to {root}')
    return f'parquet:{root}'


def decode_rate(data, batch_size: int, batches: int = 4) -> float:
    start = time.perf_counter()
    for i in range(batches):
        data.images[torch.arange(i * batch_size, (i + 1) * batch_size) % len(data)].decode()
    return batches * batch_size / (time.perf_counter() - start)


def streamed_sets(source: str, size: int, device) -> list:
    """Each network's streamed split, its labels on ``device`` as train.py puts them: a batch is gathered where
    its labels are, so labels left on the host would send a GPU model host tensors."""
    return [load_image_data(source, 'train', image_size=size, storage='stream', class_names=names).to(device)
            for names in CLASS_NAMES]


def measure(source: str, size: int, args, accelerator, device) -> list:
    sets = streamed_sets(source, size, device)
    rate = decode_rate(sets[0], args.batch_size)
    model = build_compat(args.backbone, 64).to(device)
    stats = [torch.tensor(model.networks['a'].pretrained_cfg[k], device=device) for k in ('mean', 'std')]
    samplers = [EpochSampler(len(s), args.batch_size, seed) for seed, s in enumerate(sets)]
    decoded = [s.images[torch.arange(len(s))].decode().to(device) for s in sets]  # the memory step's source
    batches = {name: training_batch(s, samplers[0].batch(0), *stats, images=decoded[0][samplers[0].batch(0)])
               for name, s in zip(model.networks, sets)}
    model_step, _ = make_step(accelerator, model, batches)
    counter = iter(range(10 ** 9))

    def memory():
        step = next(counter)
        batches.update({name: training_batch(s, sampler.batch(step), *stats, images=d[sampler.batch(step)])
                        for name, s, sampler, d in zip(model.networks, sets, samplers, decoded)})
        model_step()

    rows = []
    for workers in args.workers:
        for s in sets:
            s.images.workers = workers
        streams = [stream_batches(s.images, (sampler.batch(i) for i in range(10 ** 9)))
                   for s, sampler in zip(sets, samplers)]

        def stream(streams=streams):  # this loop's streams
            for name, s, it in zip(model.networks, sets, streams):
                index, images = next(it)
                batches[name] = training_batch(s, index, *stats, images=images)
            model_step()

        stream(), memory()  # warm up: workers started, first batches queued
        wall, _ = interleaved({'memory': memory, 'stream': stream}, args.repeats, args.steps, device)
        shares = [1 - m / s for m, s in zip(wall['memory'], wall['stream'])]
        step_rate = 2 * args.batch_size / statistics.median(wall['memory'])
        rows.append(dict(size=size, workers=workers, decode=rate, memory_ms=1e3 * statistics.median(wall['memory']),
                         stream_ms=1e3 * statistics.median(wall['stream']), share=statistics.median(shares),
                         needed=math.ceil(step_rate / rate), step_rate=step_rate))
        print(f'{size} px, {workers} worker(s): paired loader shares ' + ' '.join(f'{x:.3f}' for x in shares))
        del streams
    accelerator.free_memory()
    return rows


def main(argv=None) -> list:
    args = parse_args(argv)
    accelerator, device = setup(args)
    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix='stream_loader-'))
    source = write_jpeg_parquet(root, args.images, tuple(args.stored))
    print(f'{args.backbone} x 2 networks (RP + DCC), batch {args.batch_size} per network, mixed_precision='
          f'{accelerator.mixed_precision}; {args.repeats} x {args.steps} timed steps of each kind, interleaved')
    rows = [row for size in args.sizes for row in measure(source, size, args, accelerator, device)]
    print(f'\n{time.strftime("%Y-%m-%d %H:%M")}')
    print('| px | workers | decode img/s (one process) | step from memory ms | streamed step ms | loader share | '
          'step img/s | workers the step needs |')
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['size']} | {r['workers']} | {r['decode']:.0f} | {r['memory_ms']:.0f} | {r['stream_ms']:.0f} | "
              f"{100 * r['share']:.1f} % | {r['step_rate']:.0f} | {r['needed']} |")
    return rows


if __name__ == '__main__':
    main()
