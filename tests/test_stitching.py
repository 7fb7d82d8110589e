"""A stitch fitted on independent components (no interface) is bound to them: their ids are None, so without the
weights' digest any other independent extractor or head of the same width passed for them."""
import pytest
import torch

from timm_compat.stitching import Stitch, StitchedModel, fit_stitch

from .test_applications import network, task_data


@pytest.fixture(scope='module')
def independent():
    torch.manual_seed(0)
    return [network(None, seed=s, width=16) for s in (4, 5)]


def test_a_stitch_between_independent_components_serves_only_those(independent, tmp_path):
    a, b = independent
    fitted = fit_stitch(a.extractor, a.head, task_data('train', 2), steps=1, batch_size=8)
    fitted.stitch.save_pretrained(tmp_path / 'stitch')
    loaded = Stitch.from_pretrained(tmp_path / 'stitch')
    for stitch in (fitted.stitch, loaded):
        StitchedModel(a.extractor, stitch, a.head)  # the components it was fitted on
        with pytest.raises(ValueError, match='fitted for another independent extractor'):
            StitchedModel(b.extractor, stitch, a.head)
        with pytest.raises(ValueError, match='fitted for another independent head'):
            StitchedModel(a.extractor, stitch, b.head)
        StitchedModel(b.extractor, stitch, a.head, force=True)  # asked for: e.g. an adapted extractor
    # Moved to another dtype, the extractor is still the one the stitch was fitted on.
    StitchedModel(a.extractor.to(torch.float64), fitted.stitch, a.head)
    a.extractor.to(torch.float32)
