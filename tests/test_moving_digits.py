"""gfgp_cli.datasets.moving: the moving-digits clip generator (determinism, disjoint sources, shapes
and ranges, the digit drawn is the labelled one, the motion and its bounces) and its ``--data``
forms (parsing, names, one-line errors)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from gfgp_cli.datasets import MovingDigitsDataset, cached_moving_digits, make_moving_digits
from gfgp_cli.datasets.cluttered import _paste
from gfgp_cli.datasets.moving import DEFAULTS, bounce
from gfgp_cli.errors import BadInputError
from gfgp_cli.train.data import data_frames, load_data, moving_digits_options, parse_data_spec

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(n_train=120, n_val=60, frames=10)


@pytest.fixture(scope="module")
def small():
    return make_moving_digits(0, **SMALL)


def _tensors(d):
    return [d.train_clips, d.train_labels, d.train_sources, d.train_sides, d.train_positions,
            d.val_clips, d.val_labels, d.val_sources, d.val_sides, d.val_positions]


def _centre_of_mass(frames):
    """(x, y) ink centre of mass of ``Tensor[..., H, W]`` frames, in pixel-centre coordinates."""
    h, w = frames.shape[-2:]
    total = frames.sum((-2, -1))
    x = (frames.sum(-2) * (torch.arange(w) + 0.5)).sum(-1) / total
    y = (frames.sum(-1) * (torch.arange(h) + 0.5)).sum(-1) / total
    return torch.stack([x, y], dim=-1)


# --- determinism ---------------------------------------------------------------------------------


def test_same_seed_gives_identical_tensors(small):
    again = make_moving_digits(0, **SMALL)
    for x, y in zip(_tensors(small), _tensors(again)):
        assert torch.equal(x, y)


def test_different_seeds_give_different_sets(small):
    other = make_moving_digits(1, **SMALL)
    assert not torch.equal(small.train_clips, other.train_clips)
    assert not torch.equal(small.val_clips, other.val_clips)
    assert not torch.equal(small.train_sources, other.train_sources)


def test_validation_set_does_not_depend_on_the_training_size():
    a = make_moving_digits(0, n_train=50, n_val=40, frames=4)
    b = make_moving_digits(0, n_train=90, n_val=40, frames=4)
    assert torch.equal(a.val_clips, b.val_clips) and torch.equal(a.val_sources, b.val_sources)


def test_the_cache_returns_the_same_set():
    assert cached_moving_digits(2, frames=3, n_train=20, n_val=10) is cached_moving_digits(2, frames=3, n_train=20, n_val=10)


# --- splits, shapes, ranges ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 7])
def test_train_and_val_come_from_disjoint_source_digits(seed):
    d = make_moving_digits(seed, n_train=2000, n_val=500, frames=1)
    train, val = set(d.train_sources.tolist()), set(d.val_sources.tolist())
    assert train.isdisjoint(val)
    # Every source of each pool is used, evenly: 2000 clips over 1438 sources, 500 over 359.
    assert len(train) == 1438 and len(val) == 359
    assert torch.bincount(d.val_sources).max() <= 2


def test_labels_are_the_sources_digits_and_every_class_appears(small):
    target = torch.from_numpy(load_digits().target)
    assert torch.equal(small.train_labels, target[small.train_sources])
    assert torch.equal(small.val_labels, target[small.val_sources])
    assert set(small.train_labels.tolist()) == set(range(10)) == set(small.val_labels.tolist())
    assert small.train_labels.dtype == torch.int64


def test_shapes_and_value_range(small):
    assert small.train_clips.shape == (120, 10, 32, 32) and small.val_clips.shape == (60, 10, 32, 32)
    assert small.train_positions.shape == (120, 10, 2) and small.train_sides.shape == (120,)
    assert small.train_clips.dtype == torch.float32
    assert small.train_clips.min() >= 0 and small.train_clips.max() <= 1
    assert small.train_clips.amax((1, 2, 3)).min() > 0.5  # every clip shows its digit
    low, high = DEFAULTS["digit_scale"]
    assert (small.train_sides >= 32 * low).all() and (small.train_sides <= 32 * high).all()


def test_standard_set_sizes_and_generation_time():
    start = time.perf_counter()
    d = make_moving_digits(5)
    seconds = time.perf_counter() - start
    assert d.train_clips.shape == (2000, 16, 32, 32) and d.val_clips.shape == (500, 16, 32, 32)
    assert seconds < 10, f"the standard set took {seconds:.1f} s to generate"  # ~0.5 s on an idle core


def test_dataset_gives_three_channel_clips_in_minus_one_one(small):
    train, val = small.datasets()
    x, y = train[3]
    assert x.shape == (3, 10, 32, 32) and isinstance(y, int) and y == int(small.train_labels[3])
    torch.testing.assert_close(x[0], small.train_clips[3] * 2 - 1)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert x.min() >= -1 and x.max() <= 1
    assert train.frames == 10 and len(val) == 60 and train.classes == [str(d) for d in range(10)]


def test_dataset_resizes_every_frame_and_tensors_match_getitem(small):
    _, val = small.datasets(image_size=48)
    x, _ = val[5]
    assert x.shape == (3, 10, 48, 48)
    want = F.interpolate(small.val_clips[5][:, None], size=(48, 48), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(x[2], want * 2 - 1)
    clips, labels = MovingDigitsDataset(small.val_clips[:4], small.val_labels[:4], 48).tensors()
    assert clips.shape == (4, 3, 10, 48, 48) and torch.equal(labels, small.val_labels[:4])
    for i in range(4):
        assert torch.equal(clips[i], MovingDigitsDataset(small.val_clips[:4], small.val_labels[:4], 48)[i][0])


def test_dataset_refuses_images():
    with pytest.raises(ValueError, match="Tensor\\[N, T, H, W\\]"):
        MovingDigitsDataset(torch.zeros(3, 8, 8), torch.zeros(3, dtype=torch.long), 8)


# --- the digit drawn is the labelled one ---------------------------------------------------------


def test_every_frame_is_the_source_digit_pasted_at_its_recorded_place(small):
    # An independent rendering: the cluttered set's grid_sample paste of the recorded source at
    # the recorded side and position, frame by frame.
    d = load_digits()
    digits = torch.from_numpy(d.images).float() / 16
    n, t = 30, small.val_clips.shape[1]
    src = digits[small.val_sources[:n]][:, None].expand(n, t, 8, 8).reshape(n * t, 8, 8)
    pos = small.val_positions[:n].reshape(n * t, 2)
    side = small.val_sides[:n, None].expand(n, t).reshape(-1)
    want = _paste(src, pos[:, 0], pos[:, 1], side, 32).reshape(n, t, 32, 32)
    torch.testing.assert_close(small.val_clips[:n], want, atol=1e-5, rtol=0)


def test_the_digit_read_back_from_a_frame_is_nearest_to_its_source(small):
    # Sample each clip's first and last frames back onto the 8x8 source grid at the recorded
    # place; the nearest of scikit-learn's 1,797 digits is (nearly always) the labelled source.
    d = load_digits()
    digits = torch.from_numpy(d.images).float().reshape(-1, 64) / 16
    for frame in (0, -1):
        clips, pos, side = small.val_clips[:, frame], small.val_positions[:, frame], small.val_sides
        centres = (torch.arange(8) + 0.5)[None, :] * side[:, None] / 8  # source pixel centres, canvas px
        gx = 2 * (pos[:, 0:1] + centres) / 32 - 1
        gy = 2 * (pos[:, 1:2] + centres) / 32 - 1
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        read = F.grid_sample(clips[:, None], grid, mode="bilinear", align_corners=False)[:, 0].reshape(-1, 64)
        nearest = torch.cdist(read, digits).argmin(1)
        assert (nearest == small.val_sources).float().mean() >= 0.9
        assert (torch.from_numpy(d.target)[nearest] == small.val_labels).float().mean() >= 0.95


# --- the motion ----------------------------------------------------------------------------------


def test_frames_differ_and_the_centre_of_mass_moves(small):
    clips = small.train_clips
    assert ((clips[:, 1:] - clips[:, :-1]).abs().amax((2, 3)) > 0.05).float().mean() > 0.95
    com = _centre_of_mass(clips)  # [N, T, 2]
    travelled = (com[:, 1:] - com[:, :-1]).norm(dim=-1).sum(1)
    assert travelled.min() > 0.03 * 32 * 9 * 0.8  # the slowest allowed speed, over 9 steps (less rounding)
    # ... and follows the recorded positions (the ink moves with the pasted digit)
    shift = com - com[:, :1]
    torch.testing.assert_close(shift, small.train_positions - small.train_positions[:, :1], atol=0.35, rtol=0)


def test_digits_stay_inside_and_bounce_off_the_borders(small):
    pos, side = small.train_positions, small.train_sides
    assert (pos >= 0).all() and (pos <= (32 - side)[:, None, None] + 1e-4).all()
    step = pos[:, 1:] - pos[:, :-1]
    reversed_ = (step[:, 1:] * step[:, :-1] < 0).any(-1).any(-1)
    assert reversed_.float().mean() > 0.5  # over 10 frames, most digits bounce at least once
    # Constant speed: a step away from a border has the clip's speed, drawn in DEFAULTS["speed"]
    # (a step in which the digit bounces is shorter: part of it is folded back).
    length = step.norm(dim=-1)
    speed = length.max(1).values
    low, high = DEFAULTS["speed"]
    assert (speed >= 32 * low - 1e-3).all() and (speed <= 32 * high + 1e-3).all()
    assert ((length - speed[:, None]).abs() < 1e-3).float().mean() > 0.7


def test_bounce_is_a_triangle_wave():
    t = torch.arange(9.0)
    got = bounce(torch.tensor(1.0), torch.tensor(1.0), t, torch.tensor(3.0))
    assert got.tolist() == [1, 2, 3, 2, 1, 0, 1, 2, 3]
    got = bounce(torch.tensor(0.5), torch.tensor(-2.0), t[:4], torch.tensor(3.0))
    assert got.tolist() == [0.5, 1.5, 2.5, 0.5]
    assert bounce(torch.tensor(0.0), torch.tensor(1.0), t, torch.tensor(0.0)).tolist() == [0.0] * 9


def test_zero_speed_gives_still_clips():
    d = make_moving_digits(0, n_train=4, n_val=2, frames=5, speed=(0.0, 0.0))
    assert torch.equal(d.train_clips[:, 1:], d.train_clips[:, :1].expand(-1, 4, -1, -1))


@pytest.mark.parametrize("options, match", [
    (dict(seed=-1), "seed"), (dict(size=4), "size"), (dict(frames=0), "frames"), (dict(n_train=0), "n_train"),
    (dict(n_val=2.5), "n_val"), (dict(digit_scale=(0.5, 1.2)), "digit_scale"), (dict(speed=(0.2, 0.1)), "speed"),
    (dict(speed=(-0.1, 0.1)), "speed"), (dict(val_fraction=1.0), "val_fraction"),
])
def test_bad_arguments_are_one_line_errors(options, match):
    seed = options.pop("seed", 0)
    with pytest.raises(BadInputError, match=match) as e:
        make_moving_digits(seed, **options)
    assert "\n" not in str(e.value)


# --- the --data forms ----------------------------------------------------------------------------


def test_data_spec_forms_parse():
    assert parse_data_spec("moving-digits") == ("moving-digits", None)
    assert parse_data_spec("moving-digits:5") == ("moving-digits", "5")
    assert parse_data_spec(" moving-digits:5:frames=8 ") == ("moving-digits", "5:frames=8")
    assert moving_digits_options(None) == {"seed": 0, "frames": 16, "n_train": 2000, "n_val": 500}
    assert moving_digits_options("3:val=7:frames=4:train=9") == {"seed": 3, "frames": 4, "n_train": 9, "n_val": 7}
    assert moving_digits_options("train=9") == {"seed": 0, "frames": 16, "n_train": 9, "n_val": 500}
    assert data_frames("moving-digits:1:frames=12") == 12 and data_frames("moving-digits") == 16
    for images in ("digits", "cluttered:2", "fake:3", "cifar10:data"):
        assert data_frames(images) is None and data_frames(images, 8) is None
    # Without frames=T the clips follow the model's clip length (its spec's frames), when it has one.
    assert data_frames("moving-digits", 8) == 8 and data_frames("moving-digits:2:frames=4", 8) == 4
    assert moving_digits_options("1:train=3", frames=8) == {"seed": 1, "frames": 8, "n_train": 3, "n_val": 500}


@pytest.mark.parametrize("spec, match", [
    ("moving-digits:x", "needs a seed"), ("moving-digits:-1", "needs a seed"), ("moving-digits:1:2", "KEY=VALUE"),
    ("moving-digits:1:fps=3", "unknown moving-digits option 'fps'"), ("moving-digits:frames=0", "positive integer"),
    ("moving-digits:train=x", "positive integer"), ("moving-digits:val=2:val=3", "given twice"),
])
def test_bad_data_specs_are_one_line_errors(spec, match):
    with pytest.raises(BadInputError, match=match) as e:
        parse_data_spec(spec)
    assert "\n" not in str(e.value) and spec in str(e.value)


def test_load_data_gives_clips_at_the_image_size():
    b = load_data("moving-digits:3:frames=6:train=40:val=20", 24)
    assert (b.name, b.num_classes, b.frames, len(b.train), len(b.val)) == (
        "moving-digits:3:frames=6:train=40:val=20", 10, 6, 40, 20)
    x, y = b.val[0]
    assert x.shape == (3, 6, 24, 24) and 0 <= y < 10
    # the same set as the library call
    d = cached_moving_digits(3, frames=6, n_train=40, n_val=20)
    torch.testing.assert_close(b.train[7][0], d.datasets(24)[0][7][0])
    # the standard set's name is its seed alone; options equal to the defaults are not repeated
    assert load_data("moving-digits:0:frames=16", 32).name == "moving-digits:0"
    # the model's clip length where the SPEC gives none; the name says it
    b = load_data("moving-digits:1:train=4:val=2", 16, frames=5)
    assert (b.frames, b.name, b.train[0][0].shape) == (5, "moving-digits:1:frames=5:train=4:val=2", (3, 5, 16, 16))
