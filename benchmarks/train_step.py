"""Benchmark: one compatibility training step against a plain timm classification step.

    python benchmarks/train_step.py                                    # CPU, all three backbones
    python benchmarks/train_step.py --threads 1                        # a CPU shared with other jobs
    python benchmarks/train_step.py --threads 1 --backbones resnet56_cifar --rp-norm shared --breakdown --profile
    python benchmarks/train_step.py --device cuda --channels-last --bf16 --batch-size 128
    python benchmarks/train_step.py --threads 1 --rp-rotations all one                # also the cheap RP form
    python benchmarks/train_step.py --threads 1 --rp-norm shared                      # the step of the older figures

For each backbone, both steps train two networks with one optimizer, through the same ``Accelerator``:

* plain: two ``timm.create_model(name, num_classes=10)`` classifiers, cross-entropy, summed (like two independent
  runs sharing one optimizer step);
* compatibility: a :class:`~timm_compat.joint.JointModel` of two ``make_compatible`` networks on one
  ``Interface(width=64, rp=True, dcc_classes=<9 common classes>)`` with ``methods_for(interface)``, i.e. RP + DCC.

The FLOP-ideal ratio is (FLOPs of one compatibility forward+backward) / (FLOPs of one plain forward+backward),
counted with ``torch.utils.flop_counter.FlopCounterMode``. RP runs each extractor on the 4 rotations of the batch
(4N images), the head on the 0-degree copy (N) and the aux heads on 4N (RP) and N (DCC) feature maps. Under
``--rp-norm separate`` (train.py's default) the task loss gets an upright extractor pass of its own (N more
images), so a step costs about ``(5 E + H + A) / (E + H)`` times a plain one; under ``--rp-norm shared`` (the
measurements before 2026-12-05) the upright rows of the rotated batch are reused, ``(4 E + H + A) / (E + H)``. E, H
and A are the extractor's, head's and aux heads' FLOPs per image; the script prints them. The target is
``measured ratio <= 1.15 x FLOP-ideal ratio``: the compatibility machinery (rotation, concatenation, label
mapping, extra small kernels) may add at most 15 % on top of the arithmetic it must do. With ``--rp-rotations
one`` (RP's cheap form, ``interface.rp_rotations: one``: the upright image plus one random rotation) the extractor
and the RP head see 2N images instead of 4N, and
the row is named ``<backbone> (rp one)``.

Timing is interleaved: after a warmup, blocks of ``--steps`` plain steps and ``--steps`` compatibility steps
alternate (a-b, b-a, a-b, ...), and the measured ratio is the median over repeats of compat/plain of adjacent
blocks. A machine shared with other jobs slows both blocks of a pair alike, so the ratio stays meaningful even
when the absolute milliseconds do not. On CPU the process CPU time of each block is recorded too: it does not
count the time this process spends waiting for a core, so its ratio is a cross-check on a busy machine (with one
thread; with more, a thread spinning at an OpenMP barrier counts as busy).
"""
import argparse
import statistics
import time
from typing import Callable, Dict, List, Tuple

import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

import timm_compat
from timm_compat.classes import common_classes
from timm_compat.config import InterfaceConfig
from timm_compat.methods import (
    RP_NORMS, RP_ROTATIONS, RotationPrediction, compatibility_loss, methods_for, rotate_batch)
from timm_compat.joint import JointModel
from timm_compat.optim import make_optimizer
from common import interleaved, load_average, setup  # benchmarks/ is on sys.path

# The split points the README and the paper use.
BACKBONES: Dict[str, str] = {'resnet56_cifar': 'layer2', 'mobilenetv2_100': 'blocks.4.0', 'resnet18': 'layer2'}
# Two tasks like CIFAR-10 and STL-10: 10 classes each, 9 in common under different names and orders, so the DCC
# label mapping does real work.
CLASS_NAMES = [
    ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'],
    ['airplane', 'bird', 'car', 'cat', 'deer', 'dog', 'horse', 'monkey', 'ship', 'truck'],
]
IMAGE_SIZE = 32
# train.py's default: the step a default run takes.
RP_NORM = InterfaceConfig.model_fields['rp_norm'].default


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--backbones', nargs='+', default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument('--batch-size', type=int, default=64, help='images per network per step')
    parser.add_argument('--width', type=int, default=64, help='interface width')
    parser.add_argument('--repeats', type=int, default=5, help='timed (plain, compat) block pairs per backbone')
    parser.add_argument('--steps', type=int, default=1, help='steps per timed block')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps of each kind first')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument('--channels-last', action='store_true', help='models and inputs in channels_last')
    parser.add_argument('--bf16', action='store_true', help="Accelerator(mixed_precision='bf16'): bf16 autocast")
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the prepared model, as train.py does with the config key compile')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: the cores we may use)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--rp-rotations', nargs='+', default=['all'], choices=list(RP_ROTATIONS),
                        help="RP's rotations per image, one table row per backbone and choice: 'all' (eq. 1) or "
                             "'one' (the upright image plus one random rotation)")
    parser.add_argument('--rp-norm', default=RP_NORM, choices=list(RP_NORMS),
                        help=f"how the extractor's BatchNorm sees RP's rotations (interface.rp_norm); default "
                             f"{RP_NORM!r}, train.py's; 'shared' is the mode of the figures before 2026-12-05")
    parser.add_argument('--default-malloc', action='store_true',
                        help="on CPU, skip train.py's keep_freed_memory() and use glibc's defaults")
    parser.add_argument('--breakdown', action='store_true',
                        help='also time the parts of one network (extractor on N and 4N, head, aux heads) to see '
                             'where a ratio above the FLOP ideal comes from (four-rotation rows of --rp-norm '
                             'shared only)')
    parser.add_argument('--profile', action='store_true', help='also print a torch.profiler op table, plain vs compat')
    args = parser.parse_args(argv)
    if args.breakdown and (args.rp_norm != 'shared' or 'all' not in args.rp_rotations):
        parser.error(f'--breakdown times the parts of the four-rotation step under --rp-norm shared, which this run '
                     f'(--rp-norm {args.rp_norm} --rp-rotations {" ".join(args.rp_rotations)}) does not take: add '
                     f'--rp-norm shared --rp-rotations all, or drop --breakdown.')
    return args


class PlainPair(nn.Module):
    """Two plain classifiers summed into one loss: the baseline, shaped like :class:`JointModel`."""

    def __init__(self, networks: Dict[str, nn.Module]):
        super().__init__()
        self.networks = nn.ModuleDict(networks)

    def forward(self, batches: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        total = 0
        for name, (images, labels) in batches.items():
            total = total + F.cross_entropy(self.networks[name](images), labels)
        return {'loss': total}


def build_plain(backbone: str, width: int, rp_rotations: str = 'all', rp_norm: str = RP_NORM) -> nn.Module:
    # Only ``backbone`` is used: a plain network has no interface. The signature matches build_compat.
    return PlainPair({name: timm.create_model(backbone, num_classes=len(names))
                      for name, names in zip('ab', CLASS_NAMES)})


def build_compat(backbone: str, width: int, rp_rotations: str = 'all', rp_norm: str = RP_NORM) -> nn.Module:
    interface = timm_compat.Interface(width=width, rp=True, dcc_classes=common_classes(CLASS_NAMES))
    networks = {name: timm_compat.make_compatible(backbone, split=BACKBONES[backbone], interface=interface,
                                                  num_classes=len(names), class_names=names)
                for name, names in zip('ab', CLASS_NAMES)}
    return JointModel(networks, interface, methods_for(interface, rp_norm=rp_norm, rp_rotations=rp_rotations))


def rp_copies(model: nn.Module) -> int:
    """Images the RP head sees per input image: 4 rotations, or upright + one (cheap form)."""
    return next((2 if m.rotations == 'one' else 4 for m in getattr(model, 'methods', ())
                 if isinstance(m, RotationPrediction)), 1)


def task_passes(model: nn.Module) -> int:
    """Extra upright extractor passes per input image: 1 under ``rp_norm: separate`` with four rotations."""
    return int(any(getattr(m, 'separate_task_pass', False) for m in getattr(model, 'methods', ())))


def conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                       output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: grad_input and grad_weight each cost what the forward costs.

    torch's own formula (2.15) counts grad_weight as ``conv(x^T, grad_out^T)`` without dividing by ``groups``, so it
    counts a depthwise conv's weight gradient ``channels`` times over: MobileNetV2's backward would look many times
    its forward and the FLOP-ideal ratio would mean nothing.
    """
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(fn: Callable[[], None]) -> FlopCounterMode:
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop})
    with counter:
        fn()
    return counter


def forward_breakdown(model: JointModel, images: torch.Tensor) -> Dict[str, float]:
    """Forward FLOPs per input image of one network's parts: E (extractor), H (head), A (aux heads, RP on 4N or
    2N).

    Counted on a forward pass only, because FlopCounterMode attributes forward FLOPs to modules reliably but not
    backward ones.
    """
    network = next(iter(model.networks.values()))
    n = images.shape[0]
    with torch.no_grad():
        features = network.extractor(images)
        parts = {'E': lambda: network.extractor(images), 'H': lambda: network.head(features)}
        for name, head in model.interface.aux_heads.items():
            # RP scores every rotated copy of each image; DCC only the 0-degree copy.
            rows = torch.cat([features] * rp_copies(model)) if name == 'rp' else features
            parts[name] = lambda h=head, x=rows: h(x)
        counts = {k: count_flops(fn).get_total_flops() / n for k, fn in parts.items()}
    counts['A'] = sum(v for k, v in counts.items() if k not in ('E', 'H'))
    return counts


def make_step(accelerator: Accelerator, model: nn.Module, batches, compile: bool = False
              ) -> Tuple[Callable[[], None], int]:
    """Prepare ``model`` and its optimizer; return a ``step`` closure and the FLOPs of one forward+backward.

    ``step`` is what train.py does per step, minus data loading and augmentation (the same for both kinds):
    forward, ``accelerator.backward``, optimizer step, zero_grad. The optimizer's element-wise FLOPs are left out
    of the count, as in any FLOP-per-step figure.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, 'sgd', lr=0.01, momentum=0.9, weight_decay=5e-4)
    # The cheap RP form seeds its draws each step, as train.py's loop does: that cost belongs to the step (the
    # same step every time: which rotations are drawn does not change the arithmetic).
    per_step = [m for m in getattr(model, 'methods', ()) if isinstance(m, RotationPrediction)]
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    def forward_backward():
        for method in per_step:
            method.set_step(0)
        accelerator.backward(model(batches)['loss'])

    def step():
        with accelerator.accumulate(model):
            forward_backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    flops = count_flops(forward_backward).get_total_flops()  # eagerly: compiling does not change the arithmetic
    optimizer.zero_grad(set_to_none=True)
    if compile:
        # Like train.py: compiled after accelerator.prepare. The closures above see the new binding of ``model``;
        # compilation happens on the first (warmup) step.
        model = torch.compile(model)
    return step, flops


def breakdown(backbone: str, args, batches, accelerator: Accelerator, memory_format) -> None:
    """Time the parts of one network, forward+backward, to split its compat/plain ratio into causes.

    Printed: ``time-ideal = (4 E(N) + H(N) + A) / plain(N)``, the ratio if every part ran as fast per image as in a
    plain step (it differs from the FLOP ideal where some layers are slower per FLOP than others, e.g. memory-bound
    BN/ReLU on wide, shallow feature maps); ``batch penalty = E(4N) / 4 E(N)``, how much slower per image the
    extractor runs on the 4N-image rotated batch; ``machinery = compat(N) / (E(4N) + H(N) + A)``, what
    ``compatibility_loss`` adds on top of its parts (rotation, concatenation, losses, label mapping). The parts run
    eagerly, also under ``--compile``.
    """
    device = accelerator.device
    torch.manual_seed(args.seed)
    images, labels = batches['a']
    plain = timm.create_model(backbone, num_classes=10).to(device=device, memory_format=memory_format).train()
    joint = build_compat(backbone, args.width).to(device=device, memory_format=memory_format).train()
    network, interface = joint.networks['a'], joint.interface
    rotated = rotate_batch(images)
    with torch.no_grad(), accelerator.autocast():
        features4 = network.extractor(rotated).float()
    features4.requires_grad_()
    features = features4[:images.shape[0]].detach().requires_grad_()

    def run(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def fn():
            with accelerator.autocast():
                loss = loss_fn()
            loss.float().backward()
            for module in (plain, joint, features, features4):
                if isinstance(module, nn.Module):
                    module.zero_grad(set_to_none=True)
                else:
                    module.grad = None
        return fn

    parts = {
        'plain(N)': run(lambda: F.cross_entropy(plain(images), labels)),
        'compat(N)': run(lambda: compatibility_loss(network, images, labels, joint.methods)['loss']),
        'E(N)': run(lambda: network.extractor(images).float().mean()),
        'E(4N)': run(lambda: network.extractor(rotated).float().mean()),
        'H(N)': run(lambda: network.head(features).float().mean()),
        'A': run(lambda: interface.rp(features4).float().mean() + interface.dcc(features).float().mean()),
    }
    for fn in parts.values():
        for _ in range(max(1, args.warmup)):
            fn()
    wall, cpu = interleaved(parts, args.repeats, args.steps, device)
    ms = {k: 1e3 * statistics.median(v) for k, v in wall.items()}
    cpu_ms = {k: 1e3 * statistics.median(v) for k, v in cpu.items()}
    print(f'{backbone}: one network, forward+backward, median ms (wall / process CPU): ' +
          ', '.join(f'{k} {ms[k]:.1f} / {cpu_ms[k]:.1f}' for k in parts))
    for name, t in (('wall', ms), ('CPU', cpu_ms)):
        print(f'{backbone} ({name}): compat/plain {t["compat(N)"] / t["plain(N)"]:.2f}, '
              f'time-ideal {(4 * t["E(N)"] + t["H(N)"] + t["A"]) / t["plain(N)"]:.2f}, '
              f'batch penalty {t["E(4N)"] / (4 * t["E(N)"]):.2f}, '
              f'machinery {t["compat(N)"] / (t["E(4N)"] + t["H(N)"] + t["A"]):.2f}')


def profile_ops(steps: Dict[str, Callable[[], None]], device: torch.device, iterations: int = 3, top: int = 15) -> None:
    """torch.profiler self time per op and step, plain vs compat, the ops where compat spends most first."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    per_op = {}
    for kind, step in steps.items():
        with profile(activities=activities) as prof:
            for _ in range(iterations):
                step()
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
        attr = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
        per_op[kind] = {e.key: getattr(e, attr) / iterations / 1e3 for e in prof.key_averages()}
    totals = {kind: sum(ops.values()) for kind, ops in per_op.items()}
    print(f'profiler self {"device" if device.type == "cuda" else "CPU"} ms/step: plain {totals["plain"]:.1f}, '
          f'compat {totals["compat"]:.1f}, ratio {totals["compat"] / totals["plain"]:.2f}')
    print(f'  {"op":42s} {"plain":>9s} {"compat":>9s} {"ratio":>6s} {"share of compat":>16s}')
    for op in sorted(per_op['compat'], key=lambda k: -per_op['compat'][k])[:top]:
        p, c = per_op['plain'].get(op, 0.0), per_op['compat'][op]
        ratio = c / p if p else float('inf')
        print(f'  {op[:42]:42s} {p:9.1f} {c:9.1f} {ratio:6.2f} {100 * c / totals["compat"]:15.1f}%')


def measure_backbone(backbone: str, args, accelerator: Accelerator, memory_format, rp_rotations: str = 'all'
                     ) -> dict:
    """The plain and compatible training steps of ``backbone``, timed interleaved; one row of the table."""
    device, label = accelerator.device, backbone if rp_rotations == 'all' else f'{backbone} (rp {rp_rotations})'
    torch.manual_seed(args.seed)
    # The same normalised float batches for both kinds, already on the device: data loading and augmentation
    # cost the same for both and are left out so that the ratio isolates the model step.
    batches = {name: (torch.randn(args.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
                      .contiguous(memory_format=memory_format),
                      torch.randint(0, len(names), (args.batch_size,), device=device))
               for name, names in zip('ab', CLASS_NAMES)}
    steps, flops = {}, {}
    for kind, build in (('plain', build_plain), ('compat', build_compat)):
        model = build(backbone, args.width, rp_rotations, args.rp_norm).to(device=device, memory_format=memory_format)
        if kind == 'compat':
            parts, copies, extra = forward_breakdown(model, batches['a'][0]), rp_copies(model), task_passes(model)
        steps[kind], flops[kind] = make_step(accelerator, model, batches, args.compile)
        for _ in range(args.warmup):
            steps[kind]()
    wall, cpu = interleaved(steps, args.repeats, args.steps, device)
    ratios = [c / p for c, p in zip(wall['compat'], wall['plain'])]
    cpu_ratios = [c / p for c, p in zip(cpu['compat'], cpu['plain'])]
    ideal = flops['compat'] / flops['plain']
    row = dict(backbone=label, plain_ms=1e3 * statistics.median(wall['plain']),
               compat_ms=1e3 * statistics.median(wall['compat']), measured=statistics.median(ratios),
               cpu_measured=statistics.median(cpu_ratios), ideal=ideal, parts=parts,
               # Other jobs only ever add time, so the ratio of the fastest blocks is a second estimate; the two
               # disagreeing, or a wide spread of paired ratios, says the machine was too busy to trust the row.
               min_ratio=min(wall['compat']) / min(wall['plain']),
               plain_gflops=flops['plain'] / statistics.median(wall['plain']) / 1e9,
               spread=(max(ratios) - min(ratios)) / statistics.median(ratios))
    row['over'] = row['measured'] / ideal
    row['noisy'] = row['spread'] > 0.2 or abs(row['min_ratio'] / row['measured'] - 1) > 0.1
    print(f'{label}: forward MFLOP/image E={parts["E"] / 1e6:.1f} H={parts["H"] / 1e6:.1f} '
          f'A={parts["A"] / 1e6:.1f} (rp on {copies} images per image + dcc; rp_norm {args.rp_norm}), forward '
          f'({copies + extra}E+H+A)/(E+H) = '
          f'{((copies + extra) * parts["E"] + parts["H"] + parts["A"]) / (parts["E"] + parts["H"]):.2f}')
    print(f'{label}: paired compat/plain ratios, wall ' + ' '.join(f'{x:.2f}' for x in ratios) +
          (', CPU time ' + ' '.join(f'{x:.2f}' for x in cpu_ratios) if device.type == 'cpu' else ''))
    if args.profile:
        profile_ops(steps, device)
    # The breakdown's parts are those of the four-rotation form that reuses the upright rows for the task loss.
    if args.breakdown and rp_rotations == 'all' and args.rp_norm == 'shared':
        breakdown(backbone, args, batches, accelerator, memory_format)
    return row


def print_table(rows: List[dict], batch_size: int, cpu_col: bool) -> None:
    """The Markdown table of docs/performance.md, one row per backbone, with its verdict."""
    print('| backbone | batch | plain ms/step | compat ms/step | measured ratio | FLOP-ideal ratio | '
          'measured / ideal (target <= 1.15) | min-time ratio / ideal |' +
          (' CPU-time ratio / ideal |' if cpu_col else '') + ' plain GFLOP/s |')
    print('|---|---|---|---|---|---|---|---|' + ('---|' if cpu_col else '') + '---|')
    for r in rows:
        verdict = ('ok' if r['over'] <= 1.15 else 'MISS') + (' (noisy: rerun)' if r['noisy'] else '')
        print(f"| {r['backbone']} | {batch_size} | {r['plain_ms']:.0f} | {r['compat_ms']:.0f} | "
              f"{r['measured']:.2f} | {r['ideal']:.2f} | {r['over']:.3f} {verdict} | "
              f"{r['min_ratio'] / r['ideal']:.2f} |" +
              (f" {r['cpu_measured'] / r['ideal']:.2f} |" if cpu_col else '') + f" {r['plain_gflops']:.1f} |")
    if any(r['noisy'] for r in rows):
        print('noisy: paired ratios spread over more than 20 % of their median, or the ratio of the fastest blocks '
              'differs from it by more than 10 %. On a shared CPU, --threads 1 and more --repeats help.')


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    accelerator, device = setup(args)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f'batch {args.batch_size} per network x 2 networks, {IMAGE_SIZE}x{IMAGE_SIZE}, width {args.width}, '
          f'mixed_precision={accelerator.mixed_precision}, channels_last={args.channels_last}, '
          f'compile={args.compile}; '
          f'{args.warmup} warmup + {args.repeats} x {args.steps} timed steps of each kind, interleaved')
    rows = []
    for backbone in args.backbones:
        for rp_rotations in args.rp_rotations:
            rows.append(measure_backbone(backbone, args, accelerator, memory_format, rp_rotations))
            accelerator.free_memory()
    print(f'\n{time.strftime("%Y-%m-%d %H:%M")}, {load_average()} at the end')
    print_table(rows, args.batch_size, device.type == 'cpu')
    return rows


if __name__ == '__main__':
    main()
