"""Evaluation views: centre crop, 10-crop, multi-scale, and scores averaged over views."""

from __future__ import annotations

import torch

from resnet.data.augment import AugmentConfig
from resnet.data.views import (
    ViewBatch,
    center_view,
    combine_views,
    make_views,
    multiscale,
    ten_crop,
    view_logits,
)


def test_center_view_sizes_and_content():
    x = torch.arange(2 * 1 * 8 * 12, dtype=torch.float32).view(2, 1, 8, 12)
    out = center_view(x, resize=8, crop=4)  # no resize needed: shorter side is already 8
    assert out.shape == (2, 1, 4, 4) and torch.equal(out, x[..., 2:6, 4:8])
    assert center_view(x, resize=4, crop=4).shape == (2, 1, 4, 4)  # resized to 4 x 6 first


def test_ten_crop_corners_centre_and_mirrors():
    x = torch.rand(3, 3, 6, 6)
    out = ten_crop(x, resize=6, crop=4)
    assert out.shape == (3, 10, 3, 4, 4)
    assert torch.equal(out[:, 0], x[..., :4, :4]) and torch.equal(out[:, 3], x[..., 2:, 2:])
    assert torch.equal(out[:, 4], x[..., 1:5, 1:5])
    assert torch.equal(out[:, 5:], out[:, :5].flip(-1))


def test_multiscale_keeps_aspect_and_flips():
    x = torch.rand(2, 3, 10, 20)
    outs = multiscale(x, scales=(5, 8), flip=True)
    assert [o.shape for o in outs] == [(2, 2, 3, 5, 10), (2, 2, 3, 8, 16)]
    assert torch.equal(outs[0][:, 1], outs[0][:, 0].flip(-1))


def test_view_logits_average_over_views():
    model = lambda v: v.mean(dim=(2, 3))  # noqa: E731 - a "model" whose logits are the channel means
    x = torch.rand(4, 3, 6, 6)
    assert torch.equal(view_logits(model, make_views(x, "full")), model(x))
    ten = make_views(x, "10crop")
    assert isinstance(ten, ViewBatch)
    # 10-crop averages softmax scores: its combined logits are the log of the averaged probabilities.
    expect = ten_crop(x).flatten(0, 1).mean(dim=(2, 3)).view(4, 10, 3).softmax(2).mean(1).log()
    assert torch.allclose(view_logits(model, ten), expect, atol=1e-6)
    # Groups of different sizes and owners: per-image averages over every view it owns.
    vb = ViewBatch(
        [(torch.ones(2, 1, 2, 2), torch.tensor([0, 1])), (torch.full((1, 1, 3, 3), 3.0), torch.tensor([0]))],
        2,
    )
    assert view_logits(model, vb).flatten().tolist() == [2.0, 1.0]


def test_flip_view_averages_the_image_and_its_mirror():
    model = lambda v: v[..., :, :1].mean(dim=(2, 3))  # noqa: E731 - left column only: mirror-sensitive
    x = torch.rand(3, 2, 5, 5)
    flip = make_views(x, "flip")
    assert isinstance(flip, ViewBatch) and flip.n == 3 and flip.groups[0][0].shape == (6, 2, 5, 5)
    expect = (model(x) + model(x.flip(-1))) / 2
    assert torch.allclose(view_logits(model, flip), expect, atol=1e-6)
    assert not torch.allclose(expect, model(x))
    assert torch.equal(make_views(x, "full+flip").groups[0][0], flip.groups[0][0])


def test_the_papers_multi_view_protocols_average_probabilities_and_flip_averages_logits():
    """Three views of one image: one very sure of class 0, two fairly sure of class 1. Averaged logits pick
    class 0; averaged softmax scores (10-crop and multi-scale, as Krizhevsky et al. and VGG) pick class 1."""
    out = torch.tensor([[10.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    one_image = [(torch.zeros(3, 1, 1, 1), torch.zeros(3, dtype=torch.long))]
    as_logits = view_logits(lambda v: out, ViewBatch(one_image, 1))
    as_probs = view_logits(lambda v: out, ViewBatch(one_image, 1, probs=True))
    assert as_logits.argmax(1).item() == 0 and as_probs.argmax(1).item() == 1
    assert torch.allclose(as_probs.softmax(1), out.softmax(1).mean(0, keepdim=True))
    # The same rules for one image's views in `resnet predict`, by the model's evaluation view.
    assert torch.allclose(combine_views(out, "10crop"), as_probs[0])
    assert torch.allclose(combine_views(out, "multiscale"), as_probs[0])
    assert torch.equal(combine_views(out, "flip"), as_logits[0])
    cfg = AugmentConfig(resize=6, crop=4, scales=(4, 6))
    x = torch.rand(2, 3, 8, 8)
    assert make_views(x, "10crop", cfg).probs and make_views(x, "multiscale", cfg).probs
    assert not make_views(x, "flip").probs
    # A probability that underflows to zero stays finite in the log.
    far = view_logits(lambda v: torch.tensor([[0.0, -200.0]] * 3), ViewBatch(one_image, 1, probs=True))
    assert torch.isfinite(far).all()
