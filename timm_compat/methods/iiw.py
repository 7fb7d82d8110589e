"""Compatibility through identical initial weights (IIW), Gygli et al. 2021, Sec. 3.3.

METHOD CARD
    What: every network starts training from the same initial weights (same architecture, same initialisation
        seed, or the same pre-trained weights). Resetting a trained layer to its initial weights costs little
        accuracy (Zhang, Bengio and Singer 2019), so the initialisation acts as a set of random projections that
        shape the trained feature space; shared projections make the features of different networks alike. It adds
        no loss and no head; it only decides each network's initialisation seed.
    Equation: none; Phi_a(0) = Phi_b(0) (and Theta_a(0) = Theta_b(0) where the heads have the same shape).
        Without IIW, network ``index`` starts from seed ``init_seed + 1000 * (index + 1)``: different weights.
    Hyperparameters (config key: default): ``iiw``: true (the offline demo; the paper's method configs set it
        per method); ``init_seed``: 0.
    Paper's numbers (recombination accuracy, CIFAR-10 + STL-10, ResNet-56 split after stage 2, 10 runs, Fig. 2):
        IIW alone 25.1 % from identical random weights (independent: 10.6 %); IIW+RP+DCC 76.7 %. From identical
        pre-trained weights: IIW 74.3 %, IIW+DCC 82.7 % (Sec. 4). Feature cross-correlation (Fig. 3): RP with
        random IIW 0.38, pre-trained IIW 0.69-0.76, against 0.34 for independent networks aligned post hoc.
        Incremental training starts the new network from IIW too (72.7 %, Sec. 4).
    Functional form: :func:`init_seed`, passed to :func:`~timm_compat.make_compatible` as ``init_seed``.
    Class form: :class:`IdenticalInitialWeights`.
"""

__all__ = ['init_seed', 'IdenticalInitialWeights']

# Without IIW, network seeds start at init_seed + 1000: for init_seeds below 1000 (every recipe's), no network's own
# seed is another run's init_seed, so a baseline never starts from the weights of an IIW run by accident.
_SEED_STRIDE = 1000


def init_seed(seed: int, index: int, identical: bool) -> int:
    """The initialisation seed of network ``index`` (0-based) in a run whose networks start from ``seed``.

    Args:
        seed: The run's ``init_seed``.
        index: The network's position in the run.
        identical: IIW: every network gets ``seed``; else each gets its own, ``seed + 1000 * (index + 1)``.
    """
    return seed if identical else seed + _SEED_STRIDE * (index + 1)


class IdenticalInitialWeights:
    """IIW as an object: hands each network of a run its initialisation seed.

    Unlike RP and DCC it trains nothing, so it is no :class:`~timm_compat.methods.CompatibilityMethod`: a builder
    asks it for seeds before the networks exist.

    Args:
        seed: The run's ``init_seed``.
        identical: False gives each network different initial weights (the independent baseline).
    """
    name = 'iiw'

    def __init__(self, seed: int = 0, identical: bool = True):
        self.seed = seed
        self.identical = identical

    def init_seed(self, index: int) -> int:
        """The initialisation seed of network ``index``; see :func:`init_seed`."""
        return init_seed(self.seed, index, self.identical)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(seed={self.seed}, identical={self.identical})'
