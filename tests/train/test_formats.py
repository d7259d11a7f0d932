"""Users' own segmentation and detection data (gfgp_cli.train.formats): a VOC-style folder and a
COCO-layout folder written here with PIL and json, read back exactly; bad files give one line
naming the file; one epoch of a converted LR-ASPP on the VOC folder end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from gfgp_cli.cli import cli
from gfgp_cli.errors import BadInputError
from gfgp_cli.train.data import IMAGENET_MEAN, IMAGENET_STD, UnreadableImageError, data_tasks, load_data, parse_data_spec

SIZE = 16


def _voc(root, n=6, classes=3):
    """A VOC-style folder of ``n`` 16x16 images with random class masks (255 on a border row)."""
    rng = np.random.RandomState(0)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    masks = {}
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"im{i}.png")
        mask = rng.randint(0, classes, (SIZE, SIZE)).astype(np.uint8)
        mask[0] = 255
        image = Image.fromarray(mask, mode="L").convert("P")  # a palette PNG, as VOC's
        image.save(root / "SegmentationClass" / f"im{i}.png")
        masks[f"im{i}"] = mask
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"im{i}\n" for i in range(n - 2)))
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text(f"im{n - 2}\nim{n - 1}\n")
    return masks


def _coco(root):
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / split).mkdir()
        Image.new("RGB", (40, 30), (10, 200, 30)).save(root / split / "a.jpg")
        Image.new("RGB", (20, 20)).save(root / split / "b.jpg")
        data = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
                "annotations": [{"id": 1, "image_id": 7, "bbox": [2, 3, 10, 5], "category_id": 4, "iscrowd": 0},
                                {"id": 2, "image_id": 7, "bbox": [1, 1, 30, 20], "category_id": 2, "iscrowd": 1},
                                {"id": 3, "image_id": 7, "bbox": [5, 5, 0, 4], "category_id": 3},
                                {"id": 4, "image_id": 9, "bbox": [0.5, 1.5, 4, 6], "category_id": 1}],
                "categories": [{"id": c} for c in range(1, 5)]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def test_the_specs_parse_and_name_their_task(tmp_path):
    assert parse_data_spec(f"voc:{tmp_path}") == ("voc", str(tmp_path))
    assert parse_data_spec(f"coco:{tmp_path}") == ("coco", str(tmp_path))
    assert data_tasks(f"voc:{tmp_path}") == ("segmentation",) and data_tasks(f"coco:{tmp_path}") == ("detection",)


def test_voc_folder_reads_back_its_images_and_masks(tmp_path):
    masks = _voc(tmp_path)
    bundle = load_data(f"voc:{tmp_path}", SIZE, num_classes=3)
    assert (bundle.task, bundle.num_classes, len(bundle.train), len(bundle.val)) == ("segmentation", 3, 4, 2)
    x, mask = bundle.val[1]
    assert torch.equal(mask, torch.from_numpy(masks["im5"].astype("int64")))
    raw = torch.from_numpy(np.array(Image.open(tmp_path / "JPEGImages" / "im5.png"))).permute(2, 0, 1).float() / 255
    want = (raw - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(x, want)
    x, mask = load_data(f"voc:{tmp_path}", 32, num_classes=3).train[0]
    assert x.shape == (3, 32, 32) and torch.equal(mask[::2, ::2], torch.from_numpy(masks["im0"].astype("int64")))


def test_coco_folder_reads_back_its_boxes(tmp_path):
    _coco(tmp_path)
    bundle = load_data(f"coco:{tmp_path}", SIZE, num_classes=5)
    assert (bundle.task, len(bundle.train), len(bundle.val)) == ("detection", 2, 2)
    x, target = bundle.train[0]
    assert x.shape == (3, 30, 40) and abs(float(x[1, 0, 0]) - 200 / 255) < 0.02  # native size, [0, 1]
    # the crowd box and the box without width are left out; [x, y, w, h] -> (x1, y1, x2, y2)
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 3.0, 12.0, 8.0]])) and target["labels"].tolist() == [4]
    assert torch.equal(bundle.val[1][1]["boxes"], torch.tensor([[0.5, 1.5, 4.5, 7.5]]))


@pytest.mark.parametrize("damage, match", [
    (lambda root: (root / "annotations" / "instances_val2017.json").write_text("{not json"),
     r"instances_val2017\.json is not valid JSON \(line 1"),
    (lambda root: (root / "annotations" / "instances_train2017.json").write_text('{"images": [{"id": 1}]}'),
     r"instances_train2017\.json is not a COCO annotation file \(missing key 'file_name'\)"),
    (lambda root: (root / "annotations" / "instances_val2017.json").unlink(), r"has no instances_val\*\.json"),
])
def test_bad_coco_files_are_one_line_errors_naming_them(tmp_path, damage, match):
    _coco(tmp_path)
    damage(tmp_path)
    with pytest.raises(BadInputError, match=match):
        load_data(f"coco:{tmp_path}", SIZE, num_classes=5)


def test_coco_category_beyond_the_model_and_unreadable_images(tmp_path):
    _coco(tmp_path)
    with pytest.raises(BadInputError, match=r"instances_train2017\.json: annotation 0 has category_id 4.*--num-classes 5"):
        load_data(f"coco:{tmp_path}", SIZE, num_classes=4)
    (tmp_path / "val2017" / "b.jpg").write_bytes(b"")
    with pytest.raises(UnreadableImageError, match=r"cannot read image .*val2017/b\.jpg: the file is empty"):
        load_data(f"coco:{tmp_path}", SIZE, num_classes=5).val[1]


def test_bad_voc_masks_are_one_line_errors_naming_them(tmp_path):
    _voc(tmp_path)
    bundle = load_data(f"voc:{tmp_path}", SIZE, num_classes=2)  # the masks hold class 2
    with pytest.raises(BadInputError, match=r"mask .*SegmentationClass/im0\.png holds class 2 but the model has 2"):
        bundle.train[0]
    (tmp_path / "SegmentationClass" / "im1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(BadInputError, match=r"cannot read mask .*SegmentationClass/im1\.png"):
        load_data(f"voc:{tmp_path}", SIZE, num_classes=3).train[1]
    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "SegmentationClass" / "im2.png")
    with pytest.raises(BadInputError, match=r"mask .*im2\.png is a RGB image"):
        load_data(f"voc:{tmp_path}", SIZE, num_classes=3).train[2]
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(BadInputError, match=r"ImageSets/Segmentation/val\.txt does not exist"):
        load_data(f"voc:{tmp_path}", SIZE, num_classes=3)


def test_a_segmentation_model_trains_on_a_voc_folder(tmp_path):
    from gfgp_cli import convert, save

    _voc(tmp_path / "voc", n=10)
    save(convert("lraspp_mobilenet_v3_large", num_classes=3, image_size=32, seed=0), tmp_path / "m.pt")
    result = CliRunner().invoke(cli, ["train", str(tmp_path / "m.pt"), "--data", f"voc:{tmp_path / 'voc'}", "--out",
                                      str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["task"] == "segmentation" and 0 <= report["final"]["val_miou"] <= 100
    # a classifier's data for it: one line
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "m.pt"), "--data", f"coco:{tmp_path}"])
    assert result.exit_code == 2 and "holds detection targets" in result.output, result.output
