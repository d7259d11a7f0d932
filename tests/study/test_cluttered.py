"""gfgp_cli.datasets.cluttered: the cluttered-digits generator (determinism, disjoint sources,
shapes and ranges, exact placement)."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

from gfgp_cli.datasets import ClutteredDigitsDataset, make_cluttered_digits
from gfgp_cli.errors import BadInputError

SMALL = dict(n_train=120, n_val=60)


def _tensors(d):
    return [d.train_images, d.train_labels, d.train_sources, d.val_images, d.val_labels, d.val_sources]


def test_same_seed_gives_identical_tensors():
    a, b = make_cluttered_digits(3, **SMALL), make_cluttered_digits(3, **SMALL)
    for x, y in zip(_tensors(a), _tensors(b)):
        assert torch.equal(x, y)


def test_different_seeds_give_different_sets():
    a, b = make_cluttered_digits(0, **SMALL), make_cluttered_digits(1, **SMALL)
    assert not torch.equal(a.train_images, b.train_images)
    assert not torch.equal(a.val_images, b.val_images)
    assert not torch.equal(a.train_sources, b.train_sources)


def test_validation_set_does_not_depend_on_the_training_size():
    a = make_cluttered_digits(0, n_train=50, n_val=40)
    b = make_cluttered_digits(0, n_train=90, n_val=40)
    assert torch.equal(a.val_images, b.val_images) and torch.equal(a.val_sources, b.val_sources)


@pytest.mark.parametrize("seed", [0, 7])
def test_train_and_val_come_from_disjoint_source_digits(seed):
    d = make_cluttered_digits(seed, n_train=3000, n_val=800)  # every source used (both pools cycle fully)
    train, val = set(d.train_sources.flatten().tolist()), set(d.val_sources.flatten().tolist())
    assert train.isdisjoint(val)
    # The pools split all 1,797 sources, stratified: 20% of each digit (rounded) in validation.
    target = load_digits().target
    assert len(train | val) == len(target)
    for digit in range(10):
        n = int((target == digit).sum())
        assert sum(1 for i in val if target[i] == digit) == round(n * 0.2)


def test_shapes_dtypes_ranges_and_labels():
    d = make_cluttered_digits(0, size=24, n_train=200, n_val=100, fragments=2)
    target = torch.from_numpy(load_digits().target)
    for images, labels, sources, n in ((d.train_images, d.train_labels, d.train_sources, 200),
                                       (d.val_images, d.val_labels, d.val_sources, 100)):
        assert images.shape == (n, 24, 24) and images.dtype == torch.float32
        assert images.min() >= 0 and images.max() <= 1 and images.amax(dim=(1, 2)).min() > 0
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert sources.shape == (n, 3)
        assert torch.equal(labels, target[sources[:, 0]])  # the label is the target digit's
        assert set(labels.tolist()) == set(range(10))


def test_targets_cycle_through_their_pool_evenly():
    d = make_cluttered_digits(0, n_train=2 * 1438 + 5, n_val=10)  # 1,797 - 359 training sources
    counts = torch.bincount(d.train_sources[:, 0])
    used = counts[counts > 0]
    assert len(used) == 1438 and used.min() == 2 and used.max() == 3 and int((used == 3).sum()) == 5


def test_a_digit_at_scale_one_on_its_own_canvas_is_the_source_image():
    # size 8, side 8 and no clutter: the only placement is (0, 0) and bilinear sampling at the
    # pixel centres returns scikit-learn's pixels / 16 exactly.
    d = make_cluttered_digits(0, size=8, n_train=30, n_val=10, digit_scale=(1.0, 1.0), fragments=0)
    images = torch.from_numpy(load_digits().images).float() / 16
    torch.testing.assert_close(d.train_images, images[d.train_sources[:, 0]])
    torch.testing.assert_close(d.val_images, images[d.val_sources[:, 0]])


def test_a_shifted_digit_keeps_its_ink_so_it_lies_wholly_inside_the_canvas():
    # Side 8 on a 20-pixel canvas at a random sub-pixel position: linear interpolation moves ink
    # between neighbours without losing any, so the canvas holds exactly the source's ink only if
    # the whole digit landed inside it.
    d = make_cluttered_digits(1, size=20, n_train=100, n_val=10, digit_scale=(0.4, 0.4), fragments=0)
    images = torch.from_numpy(load_digits().images).float() / 16
    torch.testing.assert_close(d.train_images.sum(dim=(1, 2)), images[d.train_sources[:, 0]].sum(dim=(1, 2)))
    assert not torch.equal(d.train_images[0], d.train_images[1])


def test_every_layer_lands_wholly_inside_the_canvas_and_layers_combine_by_maximum():
    # Whole-digit fragments at scale one: each layer alone would carry its source's ink exactly
    # (see above); the pixel-wise maximum keeps at least the inkiest layer and at most the sum.
    d = make_cluttered_digits(2, n_train=200, n_val=10, digit_scale=(0.25, 0.25), fragments=3, fragment_pixels=(8, 8))
    ink = (torch.from_numpy(load_digits().images).float() / 16).sum(dim=(1, 2))[d.train_sources]  # Tensor[N, 4]
    total = d.train_images.sum(dim=(1, 2))
    assert (total >= ink.amax(dim=1) - 1e-3).all() and (total <= ink.sum(dim=1) + 1e-3).all()
    assert (total > ink[:, 0] + 1).float().mean() > 0.9  # the clutter adds ink to nearly every image


def test_dataset_items_are_three_channel_images_in_minus_one_to_one():
    d = make_cluttered_digits(0, n_train=40, n_val=20)
    train, val = d.datasets()
    assert (len(train), len(val)) == (40, 20)
    x, y = train[5]
    assert x.shape == (3, 32, 32) and isinstance(y, int) and y == int(d.train_labels[5])
    torch.testing.assert_close(x[1], d.train_images[5] * 2 - 1)
    xs, ys = train.tensors()
    assert torch.equal(xs[5], x) and torch.equal(ys, d.train_labels)
    big = ClutteredDigitsDataset(d.val_images, d.val_labels, 48)
    assert big[0][0].shape == (3, 48, 48) and big.tensors()[0].shape == (20, 3, 48, 48)


@pytest.mark.parametrize("kwargs,word", [
    (dict(seed=-1), "seed"), (dict(size=4), "size"), (dict(n_train=0), "n_train"), (dict(n_val=1.5), "n_val"),
    (dict(fragments=-1), "fragments"), (dict(digit_scale=(0.5, 1.2)), "digit_scale"),
    (dict(fragment_pixels=(0, 3)), "fragment_pixels"), (dict(val_fraction=1.0), "val_fraction"),
])
def test_bad_arguments_are_one_line_errors(kwargs, word):
    seed = kwargs.pop("seed", 0)
    with pytest.raises(BadInputError, match=word):
        make_cluttered_digits(seed, **kwargs)


def test_data_spec_cluttered_is_the_standard_set():
    from gfgp_cli.datasets import cached_cluttered_digits
    from gfgp_cli.train.data import load_data, parse_data_spec

    assert parse_data_spec("cluttered") == ("cluttered", None) and parse_data_spec("cluttered:5") == ("cluttered", "5")
    with pytest.raises(BadInputError, match="cluttered:SEED"):
        parse_data_spec("cluttered:x")
    bundle = load_data("cluttered:1", 48)
    standard = cached_cluttered_digits(1)
    assert (bundle.name, bundle.num_classes, len(bundle.train), len(bundle.val)) == ("cluttered:1", 10, 6000, 2000)
    assert torch.equal(bundle.val.images, standard.val_images)
    assert bundle.train[0][0].shape == (3, 48, 48) and bundle.train[0][1] == int(standard.train_labels[0])
