import torch

from ldm.model.inpainting import inpaint_condition, random_box_masks


def test_random_box_masks_are_seeded_rectangles_of_a_quarter_to_three_quarters_per_side():
    g = torch.Generator().manual_seed(0)
    masks = random_box_masks(64, 32, g)
    assert masks.shape == (64, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    rows, cols = masks[:, 0].amax(2).sum(1), masks[:, 0].amax(1).sum(1)
    assert rows.min() >= 8 and rows.max() <= 24 and cols.min() >= 8 and cols.max() <= 24
    # a rectangle: its area is rows x cols
    assert torch.equal(masks.sum((1, 2, 3)), rows * cols)
    assert torch.equal(masks, random_box_masks(64, 32, torch.Generator().manual_seed(0)))


class _FakeFirstStage:
    scale_factor = torch.tensor(2.0)

    def encode_moments(self, images):
        pooled = torch.nn.functional.avg_pool2d(images, 4)  # f=4, one channel
        return pooled, torch.zeros_like(pooled)


def test_inpaint_condition_is_mask_then_scaled_latents_of_the_masked_image():
    images = torch.ones(2, 1, 32, 32)
    holes = torch.zeros(2, 1, 32, 32)
    holes[:, :, :16] = 1  # top half is the hole
    cond = inpaint_condition(_FakeFirstStage(), images, holes)
    assert cond.shape == (2, 2, 8, 8)
    assert torch.equal(cond[:, 0, :4], torch.ones(2, 4, 8)) and torch.equal(cond[:, 0, 4:], torch.zeros(2, 4, 8))
    assert torch.equal(cond[:, 1, :4], torch.zeros(2, 4, 8))  # blanked region
    assert torch.equal(cond[:, 1, 4:], torch.full((2, 4, 8), 2.0))  # kept pixels, scaled
