"""PASCAL VOC reading, datasets and the epoch sampler.

Annotations live in a few numpy arrays (`VOCIndex`), not in per-sample Python objects: forked
DataLoader workers then share those pages instead of copying them one reference count at a time
(pytorch/pytorch#13246). Boxes are stored as continuous pixels: VOC's 1-based inclusive
(xmin, ymin, xmax, ymax) becomes (xmin - 1, ymin - 1, xmax, ymax).

The sampler makes each epoch's order, input sizes and augmentation seeds a function of
(seed, epoch) only, so a resumed run needs no iterator state and replays the same batches. With
several processes each one takes its own slice of every global batch: the global batches, and each
image's augmentation, are those of one process training with the same global batch.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.ops import box_convert
from torchvision.transforms.v2 import functional as F

from trainer.augment import test_transform, train_transform

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The data set cannot be read; the message names the path and the fix."""


@dataclass(frozen=True)
class VOCIndex:
    """All images and objects of a split as flat arrays; image i owns rows offsets[i]:offsets[i+1]."""

    paths: np.ndarray  # (n,) bytes, image file paths
    names: np.ndarray  # (n,) bytes, "VOC2007/000001"
    sizes: np.ndarray  # (n, 2) int32 (height, width)
    offsets: np.ndarray  # (n + 1,) int64
    boxes: np.ndarray  # (m, 4) float32 continuous xyxy pixels
    labels: np.ndarray  # (m,) int16 class index
    difficult: np.ndarray  # (m,) bool

    def __len__(self) -> int:
        return int(self.paths.shape[0])

    def objects(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s, e = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.boxes[s:e], self.labels[s:e], self.difficult[s:e]

    def subset(self, count: int) -> VOCIndex:
        """The first `count` images."""
        end = int(self.offsets[count])
        return VOCIndex(
            self.paths[:count], self.names[:count], self.sizes[:count], self.offsets[: count + 1],
            self.boxes[:end], self.labels[:end], self.difficult[:end],
        )  # fmt: skip


def find_devkit(root: Path) -> Path | None:
    """root/VOCdevkit, or root itself when it already holds VOC20xx folders."""
    if (root / "VOCdevkit").is_dir():
        return root / "VOCdevkit"
    if root.is_dir() and any(p.name.startswith("VOC20") for p in root.iterdir()):
        return root
    return None


def _parse(xml_path: Path, class_ids: dict[str, int], unknown: set[str]) -> tuple[int, int, list]:
    root = ET.parse(xml_path).getroot()
    size = root.find("size")
    h = int(float(size.findtext("height"))) if size is not None else 0
    w = int(float(size.findtext("width"))) if size is not None else 0
    objs = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in class_ids:
            unknown.add(name)
            continue
        bb = obj.find("bndbox")
        xmin, ymin, xmax, ymax = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        diff = (obj.findtext("difficult") or "0").strip() == "1"
        objs.append((xmin - 1.0, ymin - 1.0, xmax, ymax, class_ids[name], diff))
    return h, w, objs


def read_voc(devkit: Path, sets: Sequence[str], classes: Sequence[str]) -> VOCIndex:
    """Read the image sets ("VOC2007/trainval", ...) of a VOCdevkit; sets that are absent are skipped
    with a warning, and none at all is a DataError."""
    class_ids = {c: i for i, c in enumerate(classes)}
    paths, names, sizes, offsets = [], [], [], [0]
    rows: list[tuple] = []
    unknown: set[str] = set()
    found = []
    for spec in sets:
        year, _, split = spec.partition("/")
        listing = devkit / year / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            log.warning("data: %s not found, skipping %s", listing, spec)
            continue
        found.append(spec)
        for ident in listing.read_text().split():
            img = devkit / year / "JPEGImages" / f"{ident}.jpg"
            h, w, objs = _parse(devkit / year / "Annotations" / f"{ident}.xml", class_ids, unknown)
            if not h or not w:
                with Image.open(img) as im:
                    w, h = im.size
            paths.append(str(img))
            names.append(f"{year}/{ident}")
            sizes.append((h, w))
            rows.extend(objs)
            offsets.append(len(rows))
    if not found:
        raise DataError(
            f"none of the image sets {list(sets)} exist under {devkit}: check data_root and train_sets/test_sets"
        )
    if unknown:
        log.warning("data: objects of classes not in `classes` were skipped: %s", ", ".join(sorted(unknown)))
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    return VOCIndex(
        paths=np.asarray(paths, dtype=np.bytes_),
        names=np.asarray(names, dtype=np.bytes_),
        sizes=np.asarray(sizes, dtype=np.int32).reshape(-1, 2),
        offsets=np.asarray(offsets, dtype=np.int64),
        boxes=arr[:, :4].astype(np.float32),
        labels=arr[:, 4].astype(np.int16),
        difficult=arr[:, 5].astype(bool),
    )


def load_image(path: bytes) -> torch.Tensor:
    """uint8 (3, H, W) RGB."""
    with Image.open(path.decode()) as im:
        return F.pil_to_tensor(im.convert("RGB"))


def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    return box_convert(b.reshape(-1, 4), "xyxy", "cxcywh")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class TrainDataset(Dataset):
    """Keys are (image index, input size, augmentation seed); items (uint8 image, (k, 5) targets of
    rows [class, cx, cy, w, h] as input fractions). Difficult objects are not trained on."""

    def __init__(self, index: VOCIndex, random_ratio: float) -> None:
        self.index = index
        self.random_ratio = random_ratio

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, size, seed = key
        boxes, labels, diff = self.index.objects(i)
        keep = ~diff
        rng = np.random.default_rng(seed)
        img, bx, lb = train_transform(
            load_image(self.index.paths[i]),
            torch.from_numpy(boxes[keep].copy()),
            torch.from_numpy(labels[keep].astype(np.int64)),
            size,
            rng,
            self.random_ratio,
        )
        return img, torch.cat([lb[:, None].float(), xyxy_to_cxcywh(bx).float() / size], 1)


class EvalDataset(Dataset):
    """Items (letterboxed uint8 image, (k, 5) non-difficult targets, image index, letterbox)."""

    def __init__(self, index: VOCIndex, size: int) -> None:
        self.index = index
        self.size = size

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int, tuple[float, float, float]]:
        img, lb = test_transform(load_image(self.index.paths[i]), self.size)
        boxes, labels, diff = self.index.objects(i)
        b = torch.from_numpy(boxes[~diff].copy()) * lb.scale
        b[:, 0::2] += lb.pad_x
        b[:, 1::2] += lb.pad_y
        t = torch.cat([torch.from_numpy(labels[~diff].astype(np.float32))[:, None], xyxy_to_cxcywh(b) / self.size], 1)
        return img, t, i, (lb.scale, float(lb.pad_x), float(lb.pad_y))


def collate_train(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images; targets become (N, 6) rows [image index, class, cx, cy, w, h]."""
    imgs = torch.stack([b[0] for b in batch])
    rows = [torch.cat([torch.full((b[1].shape[0], 1), float(i)), b[1]], 1) for i, b in enumerate(batch)]
    return imgs, torch.cat(rows) if rows else torch.zeros(0, 6)


def collate_eval(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[int], list[tuple[float, float, float]]]:
    imgs, gt = collate_train([(b[0], b[1]) for b in batch])
    return imgs, gt, [b[2] for b in batch], [b[3] for b in batch]


def multiscale_sizes(base_grid: int) -> list[int]:
    """Input sides used by multi-scale training: grids 0.75x..1.5x the base (320..608 at 13)."""
    lo, hi = max(1, math.ceil(0.75 * base_grid)), max(1, math.floor(1.5 * base_grid))
    return [32 * g for g in range(lo, hi + 1)]


class EpochBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Batches of (index, input size, augmentation seed) for one epoch, a function of (seed, epoch).

    Call `set_epoch` before iterating (persistent workers keep the sampler in the main process).
    The last incomplete batch is dropped; with multi-scale on, input sizes are drawn per group of
    `sizes_every` batches (one optimizer step) from `sizes`, otherwise every batch uses `base_size`.
    A mid-epoch resume sets `skip`: the pass then starts at batch `skip` of the same epoch, with the
    same sizes and augmentation seeds as an uninterrupted pass (the whole epoch's draws are made, the
    first `skip` batches are dropped as lists of keys: no image is loaded for them).

    Several processes (`world` > 1): `batch_size` is the global micro-batch; every process draws the same
    global batches and yields slice `rank` of each (batch_size / world keys), so the processes see disjoint
    shards of the epoch's permutation, with the sizes and per-image seeds one process would use. `skip` and
    `len()` count global batches, the same on every rank.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, base_size: int, sizes: Sequence[int], sizes_every: int = 1,
        rank: int = 0, world: int = 1,
    ) -> None:  # fmt: skip
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.base_size = base_size
        self.sizes = list(sizes) or [base_size]
        self.sizes_every = max(1, sizes_every)
        self.rank, self.world = rank, world
        self.epoch = 0
        self.multiscale = True
        self.skip = 0

    def set_epoch(self, epoch: int, multiscale: bool, skip: int = 0) -> None:
        """Select the epoch; its next pass starts after its first `skip` batches."""
        self.epoch, self.multiscale, self.skip = epoch, multiscale, max(0, skip)

    @property
    def total(self) -> int:
        """Batches of a whole epoch."""
        return max(1, self.n // self.batch_size) if self.n else 0

    def __len__(self) -> int:
        """Batches this pass yields (the whole epoch unless it skips some)."""
        return max(0, self.total - self.skip)

    def batches(self) -> list[list[tuple[int, int, int]]]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 1))
        order = torch.randperm(self.n, generator=g).tolist()
        base = None if self.multiscale else self.base_size
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch, 2))
        out = []
        bs = min(self.batch_size, self.n)
        size = self.base_size
        for b in range(self.total):
            if b % self.sizes_every == 0:
                size = base if base is not None else int(rng.choice(self.sizes))
            idx = order[b * bs : (b + 1) * bs]
            seeds = rng.integers(0, 2**62, size=len(idx))
            keys = [(i, size, int(s)) for i, s in zip(idx, seeds, strict=True)]
            if self.world > 1:
                share = len(keys) // self.world
                keys = keys[self.rank * share : (self.rank + 1) * share]
            out.append(keys)
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        return iter(self.batches()[self.skip :])


class EvalBatchSampler(Sampler[list[int]]):
    """The evaluation's batches: consecutive images, `batch_size` each, the first `batches` of them (every
    image when None). With several processes, process `rank` takes batches rank, rank + world, ...: each
    batch holds the images it holds in one process, so per-batch results gathered in batch order are
    those of one process."""

    def __init__(self, n: int, batch_size: int, batches: int | None = None, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size = n, batch_size
        full = math.ceil(n / batch_size)
        self.batches = full if batches is None else min(batches, full)
        self.rank, self.world = rank, world

    def numbers(self) -> range:
        """The batch numbers this process evaluates, in order."""
        return range(self.rank, self.batches, self.world)

    def __len__(self) -> int:
        return len(self.numbers())

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.numbers():
            yield list(range(b * self.batch_size, min(self.n, (b + 1) * self.batch_size)))
