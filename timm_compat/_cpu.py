"""CPU-only memory tuning for training on glibc."""
import ctypes

__all__ = ['keep_freed_memory']


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the heap instead of returning it to the OS (CPU training).

    At batch 128 an RP batch holds 512 images, and each 16-channel 32x32 activation is 32 MiB: above glibc's
    largest mmap threshold, so every such buffer is a fresh mmap, unmapped when freed and faulted in again, zeroed,
    on the next step. That made resnet56_cifar's compatibility step 1.46x its FLOP ideal instead of 1.17x
    (docs/performance.md). Returns False, changing nothing, where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))
