"""--data SPEC forms and the resumable, sharded sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from gfgp_cli.errors import BadInputError
from gfgp_cli.train.data import ResumableSampler, SeededSamples, ShardSampler, digits_split, load_data


def test_digits_split_is_fixed_disjoint_and_complete():
    b = load_data("digits", 32)
    assert (len(b.train), len(b.val), b.num_classes) == (1438, 359, 10)
    train_idx, val_idx = digits_split(1797)
    assert set(train_idx).isdisjoint(val_idx) and len(set(train_idx) | set(val_idx)) == 1797
    assert (train_idx, val_idx) == digits_split(1797)  # fixed
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert {b.val[i][1] for i in range(len(b.val))} == set(range(10))


def test_digits_are_the_real_sklearn_images():
    # At 8x8 the bilinear upsampling is the identity, so each image is sklearn's pixels / 16,
    # mapped to [-1, 1] and repeated over 3 channels.
    d = load_digits()
    _, val_idx = digits_split(1797)
    b = load_data("digits", 8)
    for k in (0, 17, len(val_idx) - 1):
        x, y = b.val[k]
        want = torch.from_numpy(d.images[val_idx[k]]).float() / 16 * 2 - 1
        assert y == d.target[val_idx[k]]
        for c in range(3):
            torch.testing.assert_close(x[c], want)


def test_fake_takes_the_models_class_count_unless_given():
    assert load_data("fake", 16, num_classes=7).num_classes == 7
    b = load_data("fake:3", 16, num_classes=7)
    assert (b.num_classes, len(b.train), len(b.val), b.train[0][0].shape) == (3, 256, 64, (3, 16, 16))


def _image_folder(root, classes=("cat", "dog"), splits=("train", "val"), n=2):
    rng = np.random.RandomState(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_image_folder_with_train_and_val(tmp_path):
    b = load_data(str(_image_folder(tmp_path)), 16)
    assert (b.num_classes, len(b.train), len(b.val)) == (2, 4, 4)
    assert b.train[0][0].shape == (3, 16, 16) and b.val[3][0].shape == (3, 16, 16) and b.val[3][1] == 1


def _no_val(p):
    return _image_folder(p, splits=("train",))


def _empty_splits(p):
    (p / "train").mkdir()
    (p / "val").mkdir()
    return p


def _class_mismatch(p):
    _image_folder(p, classes=("x",), splits=("train",))
    _image_folder(p, classes=("y",), splits=("val",))
    return p


def _a_file(p):
    (p / "f.txt").write_text("x")
    return p / "f.txt"


@pytest.mark.parametrize("make,needle", [
    (lambda p: p / "missing", "does not exist"),
    (_no_val, "no val/ subfolder"),
    (_empty_splits, "not in ImageFolder layout"),
    (_class_mismatch, "different class folders"),
    (_a_file, "not a folder"),
])
def test_malformed_image_folders_are_bad_input(tmp_path, make, needle):
    with pytest.raises(BadInputError, match=needle):
        load_data(str(make(tmp_path)), 16)


@pytest.mark.parametrize("spec,needle", [("", "empty"), ("fake:x", "fake:N"), ("fake:0", "fake:N"),
                                          ("cifar10:", "give the folder")])
def test_bad_specs(spec, needle):
    with pytest.raises(BadInputError, match=needle):
        load_data(spec, 16)


def test_missing_cifar_says_to_download(tmp_path):
    with pytest.raises(BadInputError, match="--download"):
        load_data(f"cifar10:{tmp_path}", 32)


def _batches(sampler, micro):
    items = list(sampler)
    return [[i for i, _ in items[k:k + micro]] for k in range(0, len(items), micro)]


def test_sampler_global_batch_is_the_same_images_for_any_world_size_and_accumulation():
    n, batch = 103, 12  # 8 full global batches, 7 images dropped
    single = _batches(ResumableSampler(n, batch, seed=5), 12)
    assert len(single) == 8 and all(len(b) == 12 for b in single)
    for world, accum in ((2, 1), (3, 2), (1, 4), (2, 3)):
        micro = batch // (world * accum)
        per_rank = [_batches(ResumableSampler(n, batch, world, r, accum, seed=5), micro) for r in range(world)]
        for step in range(8):
            # rank r's micro-batches of this step, in order, are chunks r*accum .. r*accum+accum-1
            chunks = [per_rank[r][step * accum + j] for r in range(world) for j in range(accum)]
            assert sum(chunks, []) == single[step]


def test_sampler_order_depends_on_seed_and_epoch_only_and_resumes_mid_epoch():
    s = ResumableSampler(50, 10, seed=1)
    s.set_epoch(3)
    full = list(s)
    again = ResumableSampler(50, 10, seed=1)
    again.set_epoch(3)
    assert list(again) == full
    again.set_start(2)
    assert list(again) == full[20:] and len(again) == 30
    other = ResumableSampler(50, 10, seed=1)
    other.set_epoch(4)
    assert [i for i, _ in other] != [i for i, _ in full]
    assert sorted(i for i, _ in full) == list(range(50))
    assert len({seed for _, seed in full}) == 50  # one seed per sample


def test_sampler_refuses_a_batch_that_does_not_split():
    with pytest.raises(BadInputError, match="not divisible"):
        ResumableSampler(100, 10, world_size=3)


def test_shard_sampler_covers_every_image_once():
    shards = [list(ShardSampler(11, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


def test_seeded_samples_make_augmentation_a_function_of_the_seed(tmp_path):
    b = load_data(str(_image_folder(tmp_path)), 16)
    ds = SeededSamples(b.train)  # RandomResizedCrop + flip
    torch.manual_seed(123)
    a = ds[(0, 7)][0]
    torch.rand(5)  # global generator state must not matter
    assert torch.equal(ds[(0, 7)][0], a)
    assert not torch.equal(ds[(0, 8)][0], a)
    state = torch.get_rng_state()
    ds[(1, 9)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
