"""CIFAR-10 for the vision app: the splits of a run, typed batches, and airbench94's augmentation
(Keller Jordan 2024) on batched uint8 tensors held in memory: alternating flip (an image is
flipped in every other epoch, starting from a random half) and a random translation of up to
``translate`` pixels with reflect padding, both as whole-batch tensor ops.

Every epoch's batches depend only on (seed, epoch), so a resumed run sees exactly the batches the
uninterrupted run saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_apps.datasets import load_cifar10
from moe_apps.vision.config import VisionConfig

SEED_STRIDE = 1_000_003  # keeps the (seed, epoch) streams of different seeds apart


@dataclass(frozen=True)
class VisionBatch:
    """``images_BCHW`` uint8 RGB, ``labels_B`` int64."""

    images_BCHW: Tensor
    labels_B: Tensor

    def to(self, device: torch.device | str) -> VisionBatch:
        return VisionBatch(self.images_BCHW.to(device, non_blocking=True),
                           self.labels_B.to(device, non_blocking=True))

    def __len__(self) -> int:
        return self.labels_B.shape[0]


@dataclass(frozen=True)
class Split:
    """Images uint8 ``(N, 3, 32, 32)`` and labels int64 ``(N,)``."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass(frozen=True)
class VisionData:
    """The parts of a run: ``train`` (trained on), ``val`` (held out of the training images; None
    when the run trains on all of them), ``test``, and the class names."""

    train: Split
    val: Split | None
    test: Split
    class_names: list[str]


def make_splits(config: VisionConfig, data_root: str | Path | None) -> VisionData:
    """Load CIFAR-10 and cut the run's parts: the first ``train_limit`` training images (all by
    default), of which a seeded random ``validation`` are held out."""
    data = load_cifar10(data_root)
    images, labels = data.train_images, data.train_labels
    if config.train_limit is not None:
        if config.train_limit > len(labels):
            raise ValueError(f"train_limit={config.train_limit} but CIFAR-10 has {len(labels)} "
                             "training images")
        images, labels = images[: config.train_limit], labels[: config.train_limit]
    val = None
    if config.validation:
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(config.seed))
        held, kept = order[: config.validation].sort().values, order[config.validation:].sort().values
        val = Split(images[held].contiguous(), labels[held].contiguous())
        images, labels = images[kept].contiguous(), labels[kept].contiguous()
    test_images, test_labels = data.test_images, data.test_labels
    if config.test_limit is not None:
        test_images, test_labels = test_images[: config.test_limit], test_labels[: config.test_limit]
    return VisionData(Split(images, labels), val, Split(test_images, test_labels), data.class_names)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * SEED_STRIDE + epoch)


def flip_mask(num_images: int, seed: int, epoch: int) -> Tensor:
    """Alternating flip: a fixed random half of the images (drawn from ``seed``) is flipped in even
    epochs, the other half in odd epochs. Bool ``(N,)``."""
    base = torch.rand(num_images, generator=epoch_generator(seed, -1)) < 0.5
    return base ^ bool(epoch % 2)


def translate(images_BCHW: Tensor, shifts_B2: Tensor, pad: int) -> Tensor:
    """Each image moved by its ``(dy, dx)`` in ``[-pad, pad]``: a crop of the reflect-padded image
    starting at ``(pad + dy, pad + dx)``, for the whole batch with two gathers."""
    if pad == 0:
        return images_BCHW
    B, C, H, W = images_BCHW.shape
    padded = F.pad(images_BCHW.float(), (pad, pad, pad, pad), mode="reflect").to(images_BCHW.dtype)
    rows_BH = (pad + shifts_B2[:, 0:1]) + torch.arange(H)  # padded rows each output row reads
    cols_BW = (pad + shifts_B2[:, 1:2]) + torch.arange(W)
    rows = rows_BH[:, None, :, None].expand(B, C, H, W + 2 * pad)
    out = padded.gather(2, rows)
    cols = cols_BW[:, None, None, :].expand(B, C, H, W)
    return out.gather(3, cols)


def augment(images_BCHW: Tensor, flip_B: Tensor, shifts_B2: Tensor, pad: int) -> Tensor:
    """Flip the images where ``flip_B``, then translate them by ``shifts_B2`` (uint8 in, uint8 out)."""
    flipped = torch.where(flip_B[:, None, None, None], images_BCHW.flip(-1), images_BCHW)
    return translate(flipped, shifts_B2, pad)


class TrainBatches:
    """The training batches of one epoch: a seeded shuffle, full batches only (the remainder is
    left out, a different part each epoch), alternating flip and translation per image."""

    def __init__(self, split: Split, batch_size: int, translate_px: int, seed: int, epoch: int) -> None:
        if len(split) < batch_size:
            raise ValueError(f"the training part has {len(split)} images, fewer than one batch of "
                             f"{batch_size}; lower the batch size or use more images")
        self.split, self.batch_size, self.pad = split, batch_size, translate_px
        self.seed, self.epoch = seed, epoch

    def __len__(self) -> int:
        return len(self.split) // self.batch_size

    def __iter__(self) -> Iterator[VisionBatch]:
        n = len(self.split)
        generator = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(n, generator=generator)
        shifts = torch.randint(-self.pad, self.pad + 1, (n, 2), generator=generator)
        flips = flip_mask(n, self.seed, self.epoch)
        for i in range(len(self)):
            index = order[i * self.batch_size: (i + 1) * self.batch_size]
            images = augment(self.split.images[index], flips[index], shifts[index], self.pad)
            yield VisionBatch(images, self.split.labels[index])


def eval_batches(split: Split, batch_size: int) -> list[VisionBatch]:
    """The split in order, in batches of ``batch_size`` (the last one may be smaller)."""
    return [VisionBatch(split.images[i: i + batch_size], split.labels[i: i + batch_size])
            for i in range(0, len(split), batch_size)]


GREY_16_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # Pillow's modes of a 16-bit grey PNG


def _rgb_array(image):
    """``(H, W, 3)`` uint8 RGB of a decoded Pillow image. 16-bit grey is scaled to 8 bits
    (v / 257): Pillow's own convert("RGB") clips it at 255, which turns mid-grey white."""
    import numpy as np

    if image.mode in GREY_16_BIT:
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:  # straight to RGB, Pillow warns
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"))


def load_image(path: str | Path) -> Tensor:
    """A PNG / JPEG file of any size and mode as a uint8 ``(3, 32, 32)`` RGB tensor, as the model
    sees CIFAR-10: decoded with Pillow (of a multi-picture camera JPEG, the primary picture),
    turned upright by its EXIF orientation tag (phone photos), converted to RGB (grayscale
    replicated, 16-bit levels scaled to 8 bits, alpha dropped, palettes expanded), the shorter side
    resized to 32 pixels (bilinear, antialiased, torchvision v2), then the centre 32 x 32 cropped.
    ValueError naming the file for a missing, unreadable, truncated or non-image file, or one over
    Pillow's decompression-bomb limit of pixels."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    from torchvision.transforms.v2 import functional as TF

    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    try:
        with Image.open(path) as opened:
            if opened.format not in ("PNG", "JPEG", "MPO"):  # MPO: a camera JPEG with an MPF header
                raise ValueError(f"{path}: a {opened.format} image; give a PNG or JPEG file")
            opened.load()  # decodes now: a truncated file fails here
            rgb = _rgb_array(ImageOps.exif_transpose(opened))
    except Image.DecompressionBombError as error:
        raise ValueError(f"{path}: too large to decode safely ({' '.join(str(error).split())}); "
                         "downscale it first") from error
    except UnidentifiedImageError as error:
        raise ValueError(f"{path}: not a PNG/JPEG image (Pillow cannot identify it)") from error
    except (OSError, SyntaxError) as error:  # Pillow: truncated or corrupt data
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise ValueError(f"{path}: not a readable PNG/JPEG image ({reason})") from error
    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1)
    if min(image.shape[1:]) < 1:
        raise ValueError(f"{path}: the image is empty ({tuple(image.shape[1:])} pixels)")
    image = TF.resize(image, 32, antialias=True)
    return TF.center_crop(image, [32, 32]).contiguous()
