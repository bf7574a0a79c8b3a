"""The vision data layer: augmentation against a per-image numpy reference, alternating flip,
deterministic epochs, the validation split, and image files of every mode (and bad ones)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moe_apps.vision.config import VisionConfig
from moe_apps.vision.data import Split, TrainBatches, augment, flip_mask, load_image, make_splits


def reference_augment(image_CHW: np.ndarray, flip: bool, dy: int, dx: int, pad: int) -> np.ndarray:
    """One image at a time with numpy: mirror, reflect-pad, crop at (pad + dy, pad + dx)."""
    out = image_CHW[:, :, ::-1] if flip else image_CHW
    padded = np.pad(out, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    return padded[:, pad + dy: pad + dy + 32, pad + dx: pad + dx + 32]


def test_augment_matches_per_image_reference() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    flips = torch.rand(64, generator=g) < 0.5
    shifts = torch.randint(-2, 3, (64, 2), generator=g)
    shifts[0] = torch.tensor([-2, 2])  # the extremes are in
    shifts[1] = torch.tensor([2, -2])
    got = augment(images, flips, shifts, 2)
    assert got.dtype == torch.uint8 and got.shape == images.shape
    for i in range(64):
        want = reference_augment(images[i].numpy(), bool(flips[i]), int(shifts[i, 0]), int(shifts[i, 1]), 2)
        np.testing.assert_array_equal(got[i].numpy(), want)


def test_alternating_flip_flips_each_image_every_other_epoch() -> None:
    masks = [flip_mask(1000, seed=3, epoch=e) for e in range(4)]
    assert torch.equal(masks[0], ~masks[1]) and torch.equal(masks[0], masks[2])
    assert torch.equal(masks[1], masks[3])
    assert 400 < int(masks[0].sum()) < 600
    assert not torch.equal(masks[0], flip_mask(1000, seed=4, epoch=0))


def test_epoch_batches_depend_only_on_seed_and_epoch() -> None:
    g = torch.Generator().manual_seed(1)
    split = Split(torch.randint(0, 256, (250, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.arange(250) % 10)
    first = list(TrainBatches(split, 64, 2, seed=0, epoch=1))
    again = list(TrainBatches(split, 64, 2, seed=0, epoch=1))
    other = list(TrainBatches(split, 64, 2, seed=0, epoch=2))
    assert len(first) == 3 and all(len(b) == 64 for b in first)  # the remainder is left out
    assert all(torch.equal(a.images_BCHW, b.images_BCHW) and torch.equal(a.labels_B, b.labels_B)
               for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0].labels_B, other[0].labels_B)
    with pytest.raises(ValueError, match="fewer than one batch"):
        TrainBatches(split, 512, 2, seed=0, epoch=0)


def test_validation_split_is_held_out(cifar_data: Path) -> None:
    data = make_splits(VisionConfig(validation=300, train_limit=1000), cifar_data)
    assert len(data.train) == 700 and data.val is not None and len(data.val) == 300
    assert len(data.test) == 240 and data.class_names[0] == "airplane"
    flat = lambda s: {bytes(x.numpy().tobytes()) for x in s.images}  # noqa: E731
    assert not flat(data.train) & flat(data.val)
    everything = make_splits(VisionConfig(validation=0, train_limit=1000), cifar_data)
    assert everything.val is None and len(everything.train) == 1000


# JPEG stores no alpha or palette, so those modes are PNG only.
@pytest.mark.parametrize("mode,size,ext", [
    (mode, size, ext)
    for mode, size in [("L", (50, 70)), ("RGBA", (40, 40)), ("P", (40, 40)), ("RGB", (300, 200)), ("LA", (17, 90))]
    for ext in (("png",) if mode in ("RGBA", "P", "LA") else ("png", "jpg"))
])
def test_image_files_of_any_mode_and_size(tmp_path: Path, mode: str, size: tuple[int, int], ext: str) -> None:
    red = Image.new("RGB", size, (250, 10, 10)).convert(mode)
    path = tmp_path / f"image.{ext}"
    red.save(path)
    image = load_image(path)
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    if mode in ("RGB", "RGBA", "P"):  # colour kept (JPEG within its loss)
        assert abs(int(image[0].float().mean()) - 250) < 8 and int(image[1].float().mean()) < 20
    else:  # grey: the three channels are equal
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_resize_keeps_the_centre(tmp_path: Path) -> None:
    array = np.zeros((64, 128, 3), dtype=np.uint8)
    array[:, 32:96] = 255  # the white centre square of a wide image
    Image.fromarray(array).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png")
    assert int(image.float().mean()) > 240  # shorter side -> 32, centre 32 x 32 is all white


def test_bad_image_files_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.jpg")
    raw = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) // 3])
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    for name in ("text.png", "cut.jpg", "cut.png", "missing.png"):
        with pytest.raises(ValueError, match=name) as info:
            load_image(tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="not a file"):
        load_image(tmp_path)


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand (any header, even one Pillow would not write)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    raw = b"".join(b"\x00" + row for row in rows)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    """Pillow opens a 16-bit grey PNG as mode I;16 and its convert("RGB") clips at 255: mid-grey
    would turn white. Levels are scaled to 8 bits (v / 257) instead."""
    levels = np.linspace(0, 65535, 64).astype(np.uint16)
    Image.fromarray(np.tile(levels, (64, 1))).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as opened:
        assert opened.mode.startswith("I")
    image = load_image(tmp_path / "ramp16.png")
    want = np.rint(levels[::2].astype(np.float64) / 257)  # 64 -> 32 columns
    np.testing.assert_allclose(image[0, 16].numpy(), want, atol=6)  # bilinear resize
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    rgb16 = np.zeros((8, 8, 3), dtype=">u2")
    rgb16[..., 0] = 30000  # 16-bit RGB: Pillow reduces it to 8 bits itself
    (tmp_path / "rgb16.png").write_bytes(png_bytes(8, 8, 16, 2, [r.tobytes() for r in rgb16]))
    assert abs(float(load_image(tmp_path / "rgb16.png")[0].float().mean()) - 30000 / 257) < 2


def test_jpeg_orientation_tag_is_applied(tmp_path: Path) -> None:
    """A phone photo stored sideways with EXIF orientation 6 (shown turned 90 degrees clockwise)
    is predicted the way it is shown."""
    stored = np.zeros((32, 64, 3), dtype=np.uint8)
    stored[:, :32] = 255  # stored: the left half white, so shown: the top half white
    picture = Image.fromarray(stored)
    exif = picture.getexif()
    exif[0x0112] = 6
    picture.save(tmp_path / "phone.jpg", exif=exif)
    image = load_image(tmp_path / "phone.jpg").float()
    assert image[:, :14].mean() > 240 and image[:, 18:].mean() < 15  # shown 32 x 64: top white


def test_an_image_too_large_to_decode_names_the_file(tmp_path: Path) -> None:
    """A header claiming 20,000 x 20,000 pixels: Pillow's decompression-bomb refusal becomes the
    one-line ValueError naming the file (not an uncaught exception that stops the other files)."""
    (tmp_path / "huge.png").write_bytes(png_bytes(20000, 20000, 8, 0, []))
    with pytest.raises(ValueError, match="huge.png") as info:
        load_image(tmp_path / "huge.png")
    assert "\n" not in str(info.value) and "too large" in str(info.value)


def test_multi_picture_jpeg_from_a_camera_is_a_jpeg(tmp_path: Path) -> None:
    """Many phones and cameras write JPEGs with an MPF header (Pillow's format "MPO"): the file is
    a JPEG, and the primary (first) picture is the one predicted."""
    primary, second = Image.new("RGB", (40, 30), (220, 10, 10)), Image.new("RGB", (40, 30), (10, 10, 220))
    primary.save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[second])
    with Image.open(tmp_path / "camera.jpg") as opened:
        assert opened.format == "MPO"
    image = load_image(tmp_path / "camera.jpg").float()
    assert image[0].mean() > 200 and image[2].mean() < 30


def test_palette_png_with_transparency_converts_quietly(tmp_path: Path) -> None:
    """A palette PNG whose transparency is a byte table: Pillow warns (two lines on the terminal of
    `predict`) when it goes straight to RGB; it goes through RGBA, colours unchanged."""
    import warnings

    picture = Image.new("RGB", (40, 40), (200, 10, 10))
    picture.paste((10, 200, 10), (0, 0, 20, 40))
    palette = picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.save(tmp_path / "icon.png", transparency=bytes([0, 128, 255, 255]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_image(tmp_path / "icon.png").float()
    assert image[0].mean() == pytest.approx(105, abs=2) and image[2].mean() == pytest.approx(10, abs=1)
