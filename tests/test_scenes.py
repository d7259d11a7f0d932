"""gfgp_cli.datasets.scenes: the digit-scene generator (determinism, disjoint sources, the image is
the recorded digits drawn, masks and boxes consistent with them, the overlap bound) and its
datasets and ``--data scenes`` forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from gfgp_cli.datasets.cluttered import _paste
from gfgp_cli.datasets.scenes import DEFAULTS, EDGE, IGNORE, INK, NUM_CLASSES, cached_digit_scenes, make_digit_scenes
from gfgp_cli.errors import BadInputError

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(n_train=150, n_val=60)


@pytest.fixture(scope="module")
def small():
    return make_digit_scenes(0, **SMALL)


@pytest.fixture(scope="module")
def sklearn_digits():
    d = load_digits()
    return torch.from_numpy(d.images).float() / 16, torch.from_numpy(d.target).long()


def _tensors(split):
    return [split.images, split.masks, split.instances, split.boxes, split.labels, split.placements, split.sources]


def _layers(split, i, digits):
    """Every digit of scene ``i`` pasted alone, from the recorded placements and scikit-learn's
    images (the cluttered set's grid_sample paste): ``Tensor[count, S, S]``."""
    slots = (split.sources[i] >= 0).nonzero()[:, 0]
    p = split.placements[i, slots]
    size = split.images.shape[-1]
    return _paste(digits[split.sources[i, slots]], p[:, 0], p[:, 1], p[:, 2], size).clamp(0, 1), slots


# --- determinism ---------------------------------------------------------------------------------


def test_same_seed_gives_identical_tensors(small):
    again = make_digit_scenes(0, **SMALL)
    for split in ("train", "val"):
        for x, y in zip(_tensors(getattr(small, split)), _tensors(getattr(again, split))):
            assert torch.equal(x, y)


def test_different_seeds_give_different_sets(small):
    other = make_digit_scenes(1, **SMALL)
    assert not torch.equal(small.train.images, other.train.images)
    assert not torch.equal(small.val.masks, other.val.masks)


def test_validation_set_does_not_depend_on_the_training_size(small):
    bigger = make_digit_scenes(0, n_train=200, n_val=60)
    for x, y in zip(_tensors(small.val), _tensors(bigger.val)):
        assert torch.equal(x, y)


def test_the_cache_returns_the_same_set():
    assert cached_digit_scenes(3, n_train=10, n_val=5) is cached_digit_scenes(3, n_train=10, n_val=5)


# --- what is drawn -------------------------------------------------------------------------------


def test_train_and_val_come_from_disjoint_source_digits(small, sklearn_digits):
    train = set(small.train.sources[small.train.sources >= 0].tolist())
    val = set(small.val.sources[small.val.sources >= 0].tolist())
    assert train and val and train.isdisjoint(val)
    # every label is its source's digit + 1 (where the digit has pixels of its own)
    _, target = sklearn_digits
    for split in (small.train, small.val):
        shown = split.labels > 0
        assert torch.equal(split.labels[shown], target[split.sources[shown]] + 1)


def test_counts_scales_positions_and_overlap_stay_in_their_ranges(small):
    size, (low, high), bound = DEFAULTS["size"], DEFAULTS["digit_scale"], DEFAULTS["max_overlap"]
    counts = (small.train.sources >= 0).sum(1)
    assert counts.min() >= 1 and counts.max() <= DEFAULTS["digits"][1]
    assert set(counts.tolist()) >= {2, 3, 4}  # several per image, varied
    for i in range(len(small.train)):
        squares = small.train.placements[i, small.train.sources[i] >= 0].tolist()
        for j, (x0, y0, side) in enumerate(squares):
            assert size * low - 1e-4 <= side <= size * high + 1e-4
            assert x0 >= 0 and y0 >= 0 and x0 + side <= size + 1e-4 and y0 + side <= size + 1e-4  # wholly inside
            for (x1, y1, other) in squares[:j]:
                w = max(0.0, min(x0 + side, x1 + other) - max(x0, x1))
                h = max(0.0, min(y0 + side, y1 + other) - max(y0, y1))
                assert w * h <= bound * min(side, other) ** 2 + 1e-3


def test_the_image_is_the_recorded_digits_drawn(small, sklearn_digits):
    digits, _ = sklearn_digits
    for split in (small.train, small.val):
        for i in range(0, len(split), 7):
            layers, _ = _layers(split, i, digits)
            torch.testing.assert_close(split.images[i], layers.max(0).values, atol=1e-6, rtol=0)


def test_masks_follow_the_brightest_digit_and_the_ink_thresholds(small, sklearn_digits):
    digits, target = sklearn_digits
    split = small.train
    for i in range(0, len(split), 5):
        layers, slots = _layers(split, i, digits)
        canvas = split.images[i]
        mask, inst = split.masks[i].long(), split.instances[i].long()
        assert torch.equal(mask == 0, canvas <= EDGE) and torch.equal(inst == 0, canvas <= EDGE)
        rim = (canvas > EDGE) & (canvas < INK)
        assert torch.equal(mask == IGNORE, rim) and torch.equal(inst == IGNORE, rim)
        ink = canvas >= INK
        # by slow, obvious code: each ink pixel's class is that of the digit drawn brightest there
        for y, x in ink.nonzero().tolist():
            k = int(layers[:, y, x].argmax())
            assert layers[k, y, x] == canvas[y, x]
            assert int(inst[y, x]) == int(slots[k]) + 1
            assert int(mask[y, x]) == int(target[split.sources[i, slots[k]]]) + 1


def test_boxes_are_the_tight_boxes_of_each_digits_pixels(small):
    for split in (small.train, small.val):
        for i in range(len(split)):
            inst, mask = split.instances[i].long(), split.masks[i].long()
            for k in range(split.labels.shape[1]):
                pixels = (inst == k + 1).nonzero()  # (y, x)
                if len(pixels) == 0:
                    assert split.labels[i, k] == 0 and not split.boxes[i, k].any()
                    continue
                ys, xs = pixels[:, 0], pixels[:, 1]
                want = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
                assert torch.equal(split.boxes[i, k], want)
                # the class of the digit's pixels is its label
                assert set(mask[ys, xs].tolist()) == {int(split.labels[i, k])}
    shown = (small.train.labels > 0).sum(1)
    assert shown.float().mean() > 2.5  # nearly every digit drawn keeps pixels of its own


# --- datasets ------------------------------------------------------------------------------------


def test_segmentation_samples(small):
    train, val = small.datasets("segmentation")
    x, mask = train[4]
    assert x.shape == (3, 64, 64) and mask.shape == (64, 64) and mask.dtype == torch.int64
    torch.testing.assert_close(x[0], small.train.images[4] * 2 - 1)
    assert torch.equal(mask, small.train.masks[4].long()) and len(val) == 60
    assert train.classes[0] == "background" and len(train.classes) == NUM_CLASSES == 11
    x, mask = small.datasets("segmentation", image_size=128)[1][2]
    assert x.shape == (3, 128, 128)
    # nearest-neighbour doubling: each pixel becomes a 2x2 block
    assert torch.equal(mask[::2, ::2], small.val.masks[2].long()) and torch.equal(mask[1::2, 1::2], mask[::2, ::2])
    want = F.interpolate(small.val.images[2][None, None], size=(128, 128), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(x[1], want * 2 - 1)


def test_detection_samples(small):
    train, _ = small.datasets("detection", image_size=96)
    for i in range(10):
        x, target = train[i]
        keep = small.train.labels[i] > 0
        assert x.shape == (3, 96, 96) and x.min() >= 0 and x.max() <= 1
        assert torch.equal(target["labels"], small.train.labels[i][keep])
        torch.testing.assert_close(target["boxes"], small.train.boxes[i][keep] * 1.5)
        b = target["boxes"]
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()  # valid boxes for torchvision


@pytest.mark.parametrize("options, message", [
    (dict(digits=(0, 2)), "digits must be integers"),
    (dict(digits=(3, 2)), "digits must be integers"),
    (dict(max_overlap=1.5), "max_overlap must be in"),
    (dict(n_train=0), "n_train must be a positive integer"),
    (dict(digit_scale=(0.5, 1.2)), "digit_scale"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(BadInputError, match=message):
        make_digit_scenes(0, **{**SMALL, **options})


# --- --data scenes -------------------------------------------------------------------------------


def test_the_data_spec_parses_names_and_serves_both_tasks():
    from gfgp_cli.train.data import data_tasks, load_data, parse_data_spec, scenes_options

    assert parse_data_spec("scenes") == ("scenes", None) and parse_data_spec("scenes:3:val=5") == ("scenes", "3:val=5")
    assert scenes_options("2:val=7:train=9") == {"seed": 2, "n_train": 9, "n_val": 7}
    assert scenes_options(None) == {"seed": 0, "n_train": 2000, "n_val": 500}
    assert data_tasks("scenes:1") == ("segmentation", "detection")
    seg = load_data("scenes:0:train=150:val=60", 48, task="segmentation")
    det = load_data("scenes:0:train=150:val=60", 48, task="detection")
    assert seg.name == det.name == "scenes:0:train=150:val=60" and seg.num_classes == det.num_classes == 11
    assert (seg.task, det.task) == ("segmentation", "detection")
    assert seg.train[0][1].shape == (48, 48) and set(det.train[0][1]) == {"boxes", "labels"}
    # the standard set's name shows the seed only
    assert load_data("scenes:4:train=2000:val=500", 64, task="detection").name == "scenes:4"


@pytest.mark.parametrize("spec, message", [
    ("scenes:x", "needs a seed that is an integer"),
    ("scenes:1:frames=3", "unknown scenes option 'frames'"),
    ("scenes:1:val=0", "val= needs a positive integer"),
    ("scenes:1:val=2:val=3", "val= is given twice"),
])
def test_bad_data_specs_are_one_line_errors(spec, message):
    from gfgp_cli.train.data import parse_data_spec

    with pytest.raises(BadInputError, match=message):
        parse_data_spec(spec)
