"""Sampling: an image depends on its seed, not on the batch it was drawn in."""

import numpy as np


def test_sampler_image_depends_on_its_seed_not_its_batch(dreambench):
    from PIL import Image

    from focusdpo.models import load_backbone
    from focusdpo.models.sampling import sample_images

    backbone = load_backbone("flux2")
    ref = [Image.open(dreambench / "can" / "01.jpg")]
    pair = sample_images(backbone, ["a can"] * 2, [ref, ref], [3, 4], 32, 2, batch_size=2)
    alone = sample_images(backbone, ["a can"], [ref], [4], 32, 2, batch_size=1)
    assert np.array_equal(np.asarray(pair[1]), np.asarray(alone[0]))
    assert not np.array_equal(np.asarray(pair[0]), np.asarray(pair[1]))
