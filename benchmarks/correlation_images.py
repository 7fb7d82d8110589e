"""Fig. 3's feature correlation on the first 1000 test images of each task, as recipes/sec4_methods.py records it,
against all of them, as the paper measures it, for finished Sec. 4 runs.

    python benchmarks/correlation_images.py runs/sec4_fast_dv2/dcc_seed3 [RUN ...]

Each run folder is a finished two-network run of the recipe (its config.yaml and main/components); the test sets
are read as the run read them (pass the same data: a run made with --data-dir resolves its copy from config.yaml).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / 'recipes')]

import timm_compat  # noqa: E402
from timm_compat._hardware import hardware  # noqa: E402
from timm_compat.data import ImageData  # noqa: E402
from sec4_methods import run_networks  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='+', help='finished two-network run folders of recipes/sec4_methods.py')
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args(argv)
    missing = [r for r in args.runs if not (Path(r) / 'main' / 'components').is_dir()]
    if missing:
        parser.error(f'no main/components in {", ".join(missing)}: give finished runs of recipes/sec4_methods.py.')
    torch.set_num_threads(args.threads)
    print(hardware())
    for run in args.runs:
        _, models, tests = run_networks([run])
        for limit in (1000, None):
            start = time.time()
            images = ImageData(torch.cat([t.images[:limit] for t in tests]),
                               torch.cat([t.labels[:limit] for t in tests]), tests[0].class_names)
            cmp = timm_compat.compare_extractors(models[0].extractor, models[1].extractor, images)
            print(f'{Path(run).name}: {len(images)} images: direct {cmp.direct:.3f}, permuted {cmp.permuted:.3f}, '
                  f'CKA {cmp.cka:.3f} ({time.time() - start:.0f} s)', flush=True)


if __name__ == '__main__':
    main()
