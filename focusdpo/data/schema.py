"""Preference pairs: one schema, importers into it, and the collator that builds ``[w; l]`` batches.

Schema (a ``datasets.Dataset``; images are stored as encoded bytes):

===================  =====================  ==================================================
column               type                   meaning
===================  =====================  ==================================================
``pair_id``          string                 stable id, reported in errors and NaN stops
``prompt``           string                 the generation prompt
``chosen``           Image                  the preferred image (winner)
``rejected``         Image                  the other image (loser), same size as ``chosen``
``references``       list of Image          reference subjects, 0–6 (may be empty)
``reference_masks``  list of Image (L)      optional subject masks, one per reference, or empty
``prior_mask``       Image (L) or None      optional region where the pair differs (aligned pairs)
``focus_maps``       float16 (2, 2, h, w)   optional cache from ``focusdpo focus``: [w, l] × [structure, detail]
``focus_key``        string                 what produced the cache (extractor + config + grid)
``prompt_embeds``    float16 (L, D)         optional cache from ``focusdpo embed`` (flow models)
``pooled_prompt_embeds`` float16 (D,)       optional, FLUX.1's pooled CLIP embedding
``latents``          float16 (2, C', h, w)  optional VAE latents [chosen, rejected] (``embed --latents``); UNets
                                           store the posterior's mean and std on the channel axis (C' = 2C)
``reference_latents`` float16 (K, C, h, w)  optional VAE latents of the references (flow models)
``encoder_key``      string                 what produced the embeddings/latents (model + sizes)
``pair_weight``      float ≥ 0              optional: multiplies the pair's loss (e.g. the generator's margin)
``preference``       float in [0.5, 1]      optional soft label p: ``inside`` scaled by 2p − 1
``original_size``    int (2,) or (2, 2)     optional SDXL micro-conditioning [h, w] (else the training size)
``crop_top_left``    int (2,) or (2, 2)     optional SDXL crop [top, left] (else (0, 0))
``subject_scores``   float (2, K)           optional per-subject scores [chosen, rejected] (``preference_unit: subject``)
``subject_masks``    float16 (K, 2, h, w)   optional cache from ``focusdpo focus`` (subject unit): per reference, [w, l]
``mosaic_points``    int (P, 3)             optional MOSAIC points (k, ref token, target token), ``correspond``
``mosaic_key``       string                 what produced the points
===================  =====================  ==================================================
"""

from __future__ import annotations

from datasets import Array2D, Array3D, Array4D, Features, Image, List, Sequence, Value

PAIR_FEATURES = Features({
    "pair_id": Value("string"), "prompt": Value("string"), "chosen": Image(), "rejected": Image(),
    "references": List(Image()), "reference_masks": List(Image()), "prior_mask": Image(),
})

# optional per-subject scores [chosen row, rejected row], one per reference (preference_unit: subject)
SUBJECT_SCORES_FEATURE = List(List(Value("float32")))

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")

TEXT_CACHE_COLUMNS = ("prompt_embeds", "pooled_prompt_embeds")

ENCODER_CACHE_COLUMNS = TEXT_CACHE_COLUMNS + ("latents", "reference_latents", "encoder_key")

IMAGE_COLUMNS = ("chosen", "rejected", "references", "reference_masks", "prior_mask")


ARRAY_COLUMNS = ("prompt_embeds", "pooled_prompt_embeds", "latents", "reference_latents", "focus_maps", "subject_masks",
                 "subject_scores")


def array_feature(shape: tuple[int, ...], dynamic_first: bool = False):
    """A float16 datasets feature for arrays of ``shape`` (the first axis may vary per row)."""
    if len(shape) == 1:
        return Sequence(Value("float16"))
    shape = (None, *shape[1:]) if dynamic_first else tuple(shape)
    return {2: Array2D, 3: Array3D, 4: Array4D}[len(shape)](shape=shape, dtype="float16")
