"""TensorBoard image strips: VOC colours, overlay only where there is an object, readable size."""
from __future__ import annotations

import torch

from deeplab_dropout.data.voc import VOC_PALETTE
from deeplab_dropout.tb import CAPTION_HEIGHT, colorize, overlay, strip


def test_colorize_uses_the_voc_palette():
    mask = torch.tensor([[0, 12], [255, 20]])
    rgb = colorize(mask)
    for (y, x), label in {(0, 0): 0, (0, 1): 12, (1, 0): 255, (1, 1): 20}.items():
        assert rgb[:, y, x].tolist() == VOC_PALETTE[3 * label: 3 * label + 3]


def test_overlay_blends_objects_and_leaves_background():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 8, 9), dtype=torch.uint8)
    mask = torch.zeros(8, 9, dtype=torch.long)
    mask[2:5, 3:7] = 15
    out = overlay(image, mask, alpha=0.5)
    assert torch.equal(out[:, mask == 0], image[:, mask == 0])
    colour = torch.tensor(VOC_PALETTE[45:48], dtype=torch.float32)[:, None]
    expected = (0.5 * image[:, mask == 15].float() + 0.5 * colour).round().to(torch.uint8)
    assert torch.equal(out[:, mask == 15], expected)


def test_strip_layout_and_scale():
    image = torch.zeros(3, 33, 40, dtype=torch.uint8)
    target = torch.zeros(33, 40, dtype=torch.long)
    out = strip(image, target, target, min_height=100)
    scale = 4  # ceil(100 / 33)
    assert out.shape == (3, 33 * scale, (3 * 40 + 2 * 4) * scale) and out.dtype == torch.uint8
    big = torch.zeros(3, 300, 40, dtype=torch.uint8)
    assert strip(big, torch.zeros(300, 40), torch.zeros(300, 40)).shape == (3, 300, 3 * 40 + 8)


def test_strip_titles_are_a_caption_band_above_each_panel():
    torch.manual_seed(1)
    image = torch.randint(0, 256, (3, 33, 40), dtype=torch.uint8)
    target = torch.randint(0, 21, (33, 40))
    pred = torch.randint(0, 21, (33, 40))
    plain = strip(image, target, pred, min_height=100)
    titled = strip(image, target, pred, min_height=100, titles=("2007_000033", "ground truth", "prediction"))
    assert titled.shape == (3, plain.shape[1] + CAPTION_HEIGHT, plain.shape[2])
    assert torch.equal(titled[:, CAPTION_HEIGHT:], plain)  # the strip itself is unchanged below the band
    band = titled[:, :CAPTION_HEIGHT]
    ink = (band < 128).all(0)  # dark text on white
    panel = (40 + 4) * 4  # each panel starts at a multiple of this (×4 enlargement)
    for i in range(3):
        assert ink[:, i * panel: i * panel + 40 * 4].sum() > 20, f"no text over panel {i}"
    assert (band[:, :, -4:] == 255).all() and not ink.all()
    empty = strip(image, target, pred, min_height=100, titles=("", "", ""))
    assert (empty[:, :CAPTION_HEIGHT] == 255).all()


def test_logged_image_decodes_to_the_same_pixels(tmp_path):
    from io import BytesIO

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from deeplab_dropout.tb import TBLogger

    img = torch.randint(0, 256, (3, 21, 34), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    logger = TBLogger(tmp_path, {"cell": "none"})
    logger.image("val_images/x", img, 3)
    logger.close()
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    ea.Reload()
    [event] = ea.Images("val_images/x")
    decoded = np.asarray(Image.open(BytesIO(event.encoded_image_string)))
    assert (event.step, event.height, event.width) == (3, 21, 34)
    assert np.array_equal(decoded, img.permute(1, 2, 0).numpy())
