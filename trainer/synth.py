"""A VOCdevkit-shaped data set of drawn shapes, so the real reader, augmentation and evaluation run
on every machine: `python -m trainer.synth --out DIR --images N --size S --seed K`.

Writes DIR/VOCdevkit/VOC2007/{JPEGImages, Annotations, ImageSets/Main/{train,val,trainval,test}.txt}.
Each image holds 1-4 shapes of the classes in CLASSES on a noisy low-saturation gradient, each class
in its own (jittered) hue family so the set is learnable in minutes on a CPU; some overlap, and
small ones are marked difficult. The same (N, S, K) always gives the same files.
`ensure_synthetic` creates the set once, under a file lock and an atomic rename, so two attempts
starting together never see or write half a data set.
"""

from __future__ import annotations

import argparse
import colorsys
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from filelock import FileLock
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
CLASS_HUES: tuple[float, ...] = (0.0, 0.33, 0.62, 0.15, 0.83)  # red, green, blue, yellow, magenta
DIFFICULT_MAX_SIDE = 0.12  # objects smaller than this fraction of the image are marked difficult


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A low-saturation gradient with noise, so that the saturated shapes stand out."""
    grey0, grey1 = rng.uniform(50, 205), rng.uniform(50, 205)
    tint = rng.uniform(-18, 18, size=3)
    c0, c1 = grey0 + tint, grey1 - tint
    t = np.linspace(0.0, 1.0, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0.0, 1.0, h)[:, None, None]
    img = c0 * (1 - t) + c1 * t
    img = np.broadcast_to(img, (h, w, 3)) + rng.normal(0.0, 8.0, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _colour(rng: np.random.Generator, cls_index: int) -> tuple[int, int, int]:
    """Each class has its own hue family (jittered): colour and shape both tell the class."""
    hue = (CLASS_HUES[cls_index] + rng.uniform(-0.04, 0.04)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _draw(draw: ImageDraw.ImageDraw, cls: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if cls == "circle":
        draw.ellipse(box, fill=fill)
    elif cls == "square":
        draw.rectangle(box, fill=fill)
    elif cls == "triangle":
        draw.polygon([(x0 + w / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif cls == "cross":
        tw, th = max(1, w // 3), max(1, h // 3)
        draw.rectangle((x0 + tw, y0, x1 - tw, y1), fill=fill)
        draw.rectangle((x0, y0 + th, x1, y1 - th), fill=fill)
    elif cls == "ring":
        t = max(2, min(w, h) // 4)
        draw.ellipse(box, outline=fill, width=t)
    else:  # pragma: no cover - CLASSES is closed
        raise ValueError(cls)


Box = tuple[int, int, int, int]


def make_image(index: int, size: int, seed: int) -> tuple[Image.Image, list[tuple[str, Box, bool]]]:
    """One image and its objects [(class, (x0, y0, x1, y1) 0-based inclusive, difficult)]."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    w = size
    h = int(size * rng.choice([1.0, 1.0, 0.75, 0.8]))
    arr = _background(rng, w, h)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    objects: list[tuple[str, tuple[int, int, int, int], bool]] = []
    for k in range(int(rng.integers(1, 5))):
        ci = int(rng.integers(len(CLASSES)))
        cls = CLASSES[ci]
        small = rng.random() < 0.12
        side = rng.uniform(0.07, DIFFICULT_MAX_SIDE) if small else rng.uniform(0.18, 0.5)
        bw = max(4, int(side * w * rng.uniform(0.8, 1.25)))
        bh = max(4, int(side * w * rng.uniform(0.8, 1.25)))
        bw, bh = min(bw, w - 2), min(bh, h - 2)
        if k > 0 and objects and rng.random() < 0.3:
            # Overlap a previous object on purpose, centred on its border so both stay visible.
            _, (px0, py0, px1, py1), _ = objects[int(rng.integers(len(objects)))]
            if rng.random() < 0.5:
                cx, cy = rng.choice([px0, px1]), rng.uniform(py0, py1)
            else:
                cx, cy = rng.uniform(px0, px1), rng.choice([py0, py1])
            x0 = int(np.clip(cx - bw / 2, 0, w - bw - 1))
            y0 = int(np.clip(cy - bh / 2, 0, h - bh - 1))
        else:
            x0 = int(rng.integers(0, w - bw))
            y0 = int(rng.integers(0, h - bh))
        box = (x0, y0, x0 + bw - 1, y0 + bh - 1)
        _draw(draw, cls, box, _colour(rng, ci))
        objects.append((cls, box, bool(max(bw, bh) < DIFFICULT_MAX_SIDE * w)))
    return img, objects


def _xml(name: str, w: int, h: int, objects: list[tuple[str, tuple[int, int, int, int], bool]]) -> str:
    parts = [
        "<annotation>",
        "  <folder>VOC2007</folder>",
        f"  <filename>{escape(name)}.jpg</filename>",
        "  <source><database>trainer.synth</database></source>",
        f"  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>",
        "  <segmented>0</segmented>",
    ]
    for cls, (x0, y0, x1, y1), diff in objects:
        parts += [
            "  <object>",
            f"    <name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated>",
            f"    <difficult>{int(diff)}</difficult>",
            # VOC pixel coordinates are 1-based.
            f"    <bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
            f"<xmax>{x1 + 1}</xmax><ymax>{y1 + 1}</ymax></bndbox>",
            "  </object>",
        ]
    parts.append("</annotation>\n")
    return "\n".join(parts)


def write_dataset(out: Path, images: int, size: int, seed: int) -> Path:
    """Write the set under out/VOCdevkit (out is created); returns the VOCdevkit path."""
    voc = out / "VOCdevkit" / "VOC2007"
    (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (voc / "Annotations").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}" for i in range(images)]
    for i, name in enumerate(names):
        img, objects = make_image(i, size, seed)
        img.save(voc / "JPEGImages" / f"{name}.jpg", quality=92)
        (voc / "Annotations" / f"{name}.xml").write_text(_xml(name, img.width, img.height, objects))
    n_test = max(1, int(round(images * 0.2))) if images > 1 else 0
    trainval, test = names[: images - n_test], names[images - n_test :]
    n_val = max(1, len(trainval) // 8) if len(trainval) > 1 else 0
    splits = {"train": trainval[n_val:], "val": trainval[:n_val], "trainval": trainval, "test": test}
    for split, items in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{n}\n" for n in items))
    (out / "VOCdevkit" / "SYNTHETIC").write_text(
        f"trainer.synth images={images} size={size} seed={seed} classes={','.join(CLASSES)}\n"
    )
    return out / "VOCdevkit"


def ensure_synthetic(root: Path, images: int, size: int, seed: int) -> Path:
    """root/VOCdevkit, generated first if missing; safe when several processes race to create it."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / "VOCdevkit"
    if target.is_dir():
        return target
    with FileLock(str(root / ".VOCdevkit.lock")):
        if target.is_dir():
            return target
        log.info("generating a synthetic VOC set: %d images of %d px, seed %d, in %s", images, size, seed, target)
        tmp = Path(tempfile.mkdtemp(prefix=".VOCdevkit.", dir=root))
        try:
            write_dataset(tmp, images, size, seed)
            os.replace(tmp / "VOCdevkit", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder that will hold VOCdevkit/")
    ap.add_argument("--images", type=int, default=1000, help="number of images (default 1000)")
    ap.add_argument("--size", type=int, default=160, help="image width in pixels (default 160)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = ap.parse_args(argv)
    if args.images < 1 or args.size < 32:
        print("trainer.synth: --images must be >= 1 and --size >= 32", file=sys.stderr)
        return 2
    if (args.out / "VOCdevkit").exists():
        print(f"trainer.synth: {args.out / 'VOCdevkit'} already exists; choose another --out", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ensure_synthetic(args.out, args.images, args.size, args.seed)
    print(f"wrote {args.images} images to {args.out / 'VOCdevkit'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
