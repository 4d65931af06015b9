"""The evaluator end to end on tiny in-process models with the DreamBench subset, and its bad-input paths."""

import json
import shutil

import pytest
import torch

from focusdpo.commands.evaluate import main
from focusdpo.config.evaluation import EvalConfig
from focusdpo.errors import ConfigError, EvalInputError
from focusdpo.evaluation.run import run

from conftest import SHARED_DATA, UNO_MULTI, accelerate_launch

# Toy sizes: 32 px images, a one-block random DINOv2 on 56 px (plumbing only: the numbers mean nothing).
TOY = ["--resolution", "32", "--sample_steps", "2", "--score_size", "56", "--dino_random_weights", "true",
       "--dino_depth", "1", "--dino_image_size", "56", "--bootstrap_samples", "200", "--grid_prompts", "2"]


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    """A DPO-sized LoRA for the tiny SD UNet (random, non-zero) and one for the tiny SDXL UNet (does not fit)."""
    from peft import LoraConfig

    from focusdpo.models import load_backbone

    root = tmp_path_factory.mktemp("loras")
    for family in ("sd", "sdxl"):
        backbone = load_backbone(family)
        torch.manual_seed(1)
        backbone.denoiser.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                                 target_modules=list(backbone.default_lora_targets)))
        backbone.save_lora(root / f"dpo_{family}")
    return root


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random transformers CLIPModel folder with its processor (the char tokenizer of the tiny SD)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from focusdpo.models.tiny import char_tokenizer

    tokenizer = char_tokenizer()
    n = len(tokenizer)
    config = CLIPConfig(text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=128, bos_token_id=n - 2,
                                         eos_token_id=n - 1, pad_token_id=n - 1),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def evaluate(out, *extra, benchmark=UNO_MULTI, prompts: int = 3):
    if not benchmark.is_file():
        pytest.skip(f"shared test data not found at {benchmark}")
    return main(["--benchmark", str(benchmark), "--data_root", str(SHARED_DATA / "dreambench"), "--output_dir",
                 str(out), "--max_prompts", str(prompts), *TOY, *extra])


@pytest.mark.e2e
def test_base_vs_lora_report_is_complete_resumable_and_reproducible(tmp_path, lora_dirs, tiny_clip):
    extra = ["--loras", str(lora_dirs / "dpo_sd"), "--metrics", "subject", "backbone_i", "clip_i", "clip_t",
             "--clip_model", str(tiny_clip)]
    first = evaluate(tmp_path / "a", *extra)
    report = json.loads((first / "report.json").read_text())
    assert report["variants"] == ["base", "dpo_sd"]
    assert report["counts"] == {"prompts": 3, "samples": 3, "skipped_entries": 0, "skipped_images": 0}
    sample = report["samples"][0]
    assert set(sample["variants"]) == {"base", "dpo_sd"} and sample["subjects"] == 2
    scores = sample["variants"]["dpo_sd"]
    for metric in ("fidelity_mean", "fidelity_min", "ip_conf", "collapsed", "subject_count", "backbone_i",
                   "clip_i", "clip_t"):
        assert isinstance(scores[metric], float), metric
    assert len(scores["subject_fidelity"]) == 2 and scores["fidelity_min"] == min(scores["subject_fidelity"])
    assert set(report["deltas"]["dpo_sd"]) >= {"fidelity_mean", "clip_t"}
    assert report["extractors"]["clip_t"].startswith("CLIPModel") and "dinov2" in report["extractors"]["subject"]
    base, lora = (first / "images" / v / f"{sample['item_id']}_0.png" for v in ("base", "dpo_sd"))
    assert base.read_bytes() != lora.read_bytes()  # the LoRA really changes the images
    assert "| fidelity_min |" in (first / "report.md").read_text()
    assert (first / "deltas.png").is_file() and len(list((first / "grids").glob("*.png"))) == 2

    second = evaluate(tmp_path / "b", *extra)  # fresh generation with the same seeds
    assert (second / "report.json").read_bytes() == (first / "report.json").read_bytes()

    missing = second / "images" / "base" / f"{sample['item_id']}_0.png"
    missing.unlink()
    kept = second / "images" / "dpo_sd" / f"{sample['item_id']}_0.png"
    kept.write_bytes(base.read_bytes())  # a reused image is not regenerated: its scores change
    evaluate(tmp_path / "b", *extra)
    assert missing.read_bytes() == base.read_bytes()  # regenerated, identical
    resumed = json.loads((second / "report.json").read_text())["samples"][0]["variants"]
    assert resumed["dpo_sd"]["fidelity_mean"] == resumed["base"]["fidelity_mean"]


@pytest.mark.e2e
def test_existing_images_with_missing_files_are_listed_and_counted(tmp_path):
    made = evaluate(tmp_path / "gen", prompts=2)
    images = tmp_path / "images"
    shutil.copytree(made / "images" / "base", images / "before")
    shutil.copytree(made / "images" / "base", images / "after")
    gone = sorted((images / "after").iterdir())[0]
    gone.unlink()
    out = evaluate(tmp_path / "read", "--images_dir", str(images), "--variants", "before", "after", prompts=2)
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["skipped_images"] == 1
    assert report["skipped_images"][0]["variant"] == "after" and gone.name in report["skipped_images"][0]["reason"]
    assert report["deltas"]["after"]["fidelity_mean"]["prompts"] == 1  # the other prompt only, never a zero
    assert report["deltas"]["after"]["fidelity_mean"]["delta"] == 0.0


@pytest.mark.e2e
def test_dreambench_prompt_file_groups_the_views_of_a_subject(tmp_path):
    out = evaluate(tmp_path / "db", benchmark=SHARED_DATA / "dreambench" / "prompts_and_classes.txt", prompts=2)
    report = json.loads((out / "report.json").read_text())
    assert report["benchmark"]["layout"] == "dreambench"
    assert [s["subjects"] for s in report["samples"]] == [1, 1]  # several views, one subject
    assert report["samples"][0]["variants"]["base"]["ip_conf"] is None  # undefined for one subject, not 0


@pytest.mark.e2e
def test_two_processes_split_the_prompts_and_write_the_same_report(tmp_path):
    # One image per sampler call: a batch of another composition may differ in the last float bit.
    single = evaluate(tmp_path / "one", "--batch_size", "1")
    args = ["--benchmark", str(UNO_MULTI), "--data_root", str(SHARED_DATA / "dreambench"), "--output_dir",
            str(tmp_path / "two"), "--max_prompts", "3", "--batch_size", "1", *TOY]
    accelerate_launch(["-m", "focusdpo", "evaluate", *args], processes=2, port=29637)
    assert (tmp_path / "two" / "report.json").read_bytes() == (single / "report.json").read_bytes()
    assert sorted(p.name for p in (tmp_path / "two" / ".shards").iterdir()) == ["scores-0.json", "scores-1.json"]


def test_a_lora_for_another_model_is_refused(tmp_path, lora_dirs):
    with pytest.raises(EvalInputError, match="does not fit this sd model"):
        run(*parse(["--benchmark", str(UNO_MULTI), "--data_root", str(SHARED_DATA / "dreambench"),
                    "--output_dir", str(tmp_path), "--loras", str(lora_dirs / "dpo_sdxl"), "--max_prompts", "1",
                    *TOY]))


def parse(argv):
    from focusdpo.commands.evaluate import parse_eval_config
    return parse_eval_config(argv)[:3]


def test_bad_config_and_benchmark_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="metrics='fid' is not valid"):
        EvalConfig(benchmark="x.json", metrics=["subject", "fid"])
    with pytest.raises(ConfigError, match="dino_v1_weights"):
        EvalConfig(benchmark="x.json", metrics=["dino"])
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps([{"text": "a dog", "images": ["dog/00.jpg"]}]))
    with pytest.raises(SystemExit):
        main(["--benchmark", str(odd), "--output_dir", str(tmp_path / "out"), *TOY])
    assert "cannot tell the layout" in capsys.readouterr().err
    with pytest.raises(EvalInputError, match="no entry has all its images"):
        run(*parse(["--benchmark", str(UNO_MULTI), "--data_root", str(tmp_path), "--output_dir", str(tmp_path),
                    *TOY]))
