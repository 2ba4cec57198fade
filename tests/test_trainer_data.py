"""Synthetic VOC writer, VOC reader, augmentation and the epoch sampler."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from trainer_helpers import synth_root  # noqa: F401 - fixture

from trainer.augment import letterbox, train_transform
from trainer.data import EpochBatchSampler, EvalDataset, TrainDataset, find_devkit, multiscale_sizes, read_voc
from trainer.synth import CLASSES, ensure_synthetic, main, make_image, write_dataset


def test_synth_is_deterministic_and_voc_shaped(tmp_path):
    assert main(["--out", str(tmp_path / "a"), "--images", "12", "--size", "64", "--seed", "4"]) == 0
    write_dataset(tmp_path / "b", 12, 64, 4)
    for rel in ("VOC2007/Annotations/000007.xml", "VOC2007/ImageSets/Main/test.txt",
                "VOC2007/JPEGImages/000003.jpg"):  # fmt: skip
        assert (tmp_path / "a/VOCdevkit" / rel).read_bytes() == (tmp_path / "b/VOCdevkit" / rel).read_bytes()
    main_dir = tmp_path / "a/VOCdevkit/VOC2007/ImageSets/Main"
    trainval = main_dir.joinpath("trainval.txt").read_text().split()
    test = main_dir.joinpath("test.txt").read_text().split()
    train, val = (main_dir / "train.txt").read_text().split(), (main_dir / "val.txt").read_text().split()
    assert not set(trainval) & set(test) and sorted(train + val) == sorted(trainval)
    assert len(trainval) + len(test) == 12
    assert main(["--out", str(tmp_path / "a"), "--images", "12"]) == 2  # refuses to overwrite


def test_synth_has_difficult_and_overlapping_objects():
    difficult, overlaps, classes = 0, 0, set()
    for i in range(200):
        _, objs = make_image(i, 96, 0)
        difficult += sum(d for _, _, d in objs)
        classes |= {c for c, _, _ in objs}
        boxes = [b for _, b, _ in objs]
        for j in range(len(boxes)):
            for k in range(j):
                a, b = boxes[j], boxes[k]
                overlaps += min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
    assert difficult > 5 and overlaps > 10 and classes == set(CLASSES)


def test_ensure_synthetic_races_produce_one_complete_set(tmp_path):
    errors = []

    def go():
        try:
            ensure_synthetic(tmp_path, 20, 64, 1)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(list((tmp_path / "VOCdevkit/VOC2007/JPEGImages").iterdir())) == 20
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".VOCdevkit.") and p.is_dir()]


def test_reader_keeps_annotations_in_numpy_arrays(synth_root):  # noqa: F811
    devkit = find_devkit(synth_root)
    assert devkit == synth_root / "VOCdevkit" and find_devkit(devkit) == devkit
    idx = read_voc(devkit, ["VOC2007/trainval", "VOC2012/trainval"], CLASSES)  # 2012 absent: skipped
    assert len(idx) == 48
    for arr in (idx.paths, idx.sizes, idx.offsets, idx.boxes, idx.labels, idx.difficult):
        assert isinstance(arr, np.ndarray) and arr.dtype != object
    assert idx.offsets[-1] == len(idx.boxes) == len(idx.labels)
    boxes, labels, diff = idx.objects(0)
    xml = (devkit / "VOC2007/Annotations/000000.xml").read_text()
    xmin = int(xml.split("<xmin>")[1].split("<")[0])
    assert boxes[0, 0] == xmin - 1  # 1-based inclusive -> continuous pixels
    assert idx.subset(5).offsets[-1] == idx.offsets[5]


def test_augmentation_keeps_boxes_on_the_object():
    img = torch.zeros(3, 90, 120, dtype=torch.uint8)
    img[:, 20:50, 70:110] = 255  # box [70, 20, 110, 50) continuous
    box = torch.tensor([[70.0, 20.0, 110.0, 50.0]])
    for seed in range(25):
        out, bx, lb = train_transform(img, box, torch.tensor([1]), 96, np.random.default_rng(seed), 1.0)
        assert out.shape == (3, 96, 96) and out.dtype == torch.uint8
        if not len(bx):
            continue  # cropped away
        x0, y0, x1, y1 = (int(round(v)) for v in bx[0].tolist())
        inside = out[:, y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].float().mean()
        mask = torch.ones(96, 96, dtype=torch.bool)
        mask[max(0, y0 - 2) : y1 + 2, max(0, x0 - 2) : x1 + 2] = False
        outside = out.float().mean(0)[mask].mean()
        assert inside > outside + 60, seed


def test_letterbox_maps_back():
    img = torch.zeros(3, 50, 100, dtype=torch.uint8)
    out, bx, lb = letterbox(img, torch.tensor([[10.0, 10.0, 30.0, 40.0]]), 64)
    assert out.shape == (3, 64, 64) and lb.scale == pytest.approx(0.64)
    assert lb.to_original(bx).tolist()[0] == pytest.approx([10.0, 10.0, 30.0, 40.0], abs=0.5)


def test_sampler_is_a_function_of_seed_and_epoch():
    def batches(seed, epoch, multiscale=True):
        s = EpochBatchSampler(40, 8, seed, 128, multiscale_sizes(4))
        s.set_epoch(epoch, multiscale)
        return list(s)

    assert batches(1, 3) == batches(1, 3)
    assert batches(1, 3) != batches(1, 4)
    assert batches(1, 3) != batches(2, 3)
    sizes = {b[0][1] for e in range(6) for b in batches(1, e)}
    assert len(sizes) > 1 and sizes <= set(multiscale_sizes(4))
    assert {b[0][1] for b in batches(1, 0, multiscale=False)} == {128}
    assert all(len({k[1] for k in b}) == 1 for b in batches(1, 0))  # one size per batch
    assert multiscale_sizes(13) == list(range(320, 609, 32))


def test_dataset_items_depend_only_on_their_key(synth_root):  # noqa: F811
    idx = read_voc(find_devkit(synth_root), ["VOC2007/trainval"], CLASSES)
    ds = TrainDataset(idx, 0.5)
    a, b = ds[(3, 64, 99)], ds[(3, 64, 99)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(ds[(3, 64, 100)][0], a[0])
    img, t, i, meta = EvalDataset(idx, 64)[3]
    assert img.shape == (3, 64, 64) and t.shape[1] == 5 and i == 3 and len(meta) == 3
