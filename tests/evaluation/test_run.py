"""The evaluator end to end on tiny in-process models with the DreamBench subset, and its bad-input paths."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from focusdpo.errors import ConfigError
from focusdpo.config.evaluation import EvalConfig
from focusdpo.evaluation.report import bootstrap_interval, compare, paired_deltas, summarize
from focusdpo.errors import EvalInputError
from focusdpo.commands.evaluate import main
from focusdpo.evaluation.run import run

UNO_MULTI = SHARED_DATA / "uno" / "dreambench_multiip_covered_by_subset.json"
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


def test_dreambench_prompt_file_groups_the_views_of_a_subject(tmp_path):
    out = evaluate(tmp_path / "db", benchmark=SHARED_DATA / "dreambench" / "prompts_and_classes.txt", prompts=2)
    report = json.loads((out / "report.json").read_text())
    assert report["benchmark"]["layout"] == "dreambench"
    assert [s["subjects"] for s in report["samples"]] == [1, 1]  # several views, one subject
    assert report["samples"][0]["variants"]["base"]["ip_conf"] is None  # undefined for one subject, not 0


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


def test_paired_deltas_and_bootstrap_by_hand():
    records = [{"item_id": "p0", "variants": {"base": {"clip_t": 0.2}, "new": {"clip_t": 0.5}}},
               {"item_id": "p0", "variants": {"base": {"clip_t": 0.4}, "new": {"clip_t": 0.5}}},
               {"item_id": "p1", "variants": {"base": {"clip_t": 0.3}, "new": {"clip_t": 0.2}}},
               {"item_id": "p2", "variants": {"base": {"clip_t": 0.3}, "new": {"clip_t": None}}}]
    assert paired_deltas(records, "new", "base", "clip_t") == pytest.approx([0.2, -0.1])  # per prompt, p2 undefined
    assert summarize(records, ["base"])["base"]["clip_t"] == {"mean": pytest.approx(0.3), "n": 4}
    low, high = bootstrap_interval(np.array([0.2, -0.1]), 2000, seed=0)
    assert -0.1 <= low < 0.05 < high <= 0.2
    assert bootstrap_interval(np.array([0.3, 0.3]), 50, seed=0) == pytest.approx((0.3, 0.3))
    assert compare(records, ["base", "new"], 100, 0)["new"]["clip_t"]["delta"] == pytest.approx(0.05)


def test_dino_v1_protocol_takes_the_normalised_cls_of_a_centre_crop():
    import timm

    from focusdpo.features.eval import DINO_V1_MODEL, dino_v1_transform, load_dino_v1

    x = torch.rand(2, 3, 300, 400)
    assert tuple(dino_v1_transform()(x).shape) == (2, 3, 224, 224)
    model = timm.create_model(DINO_V1_MODEL, pretrained=False, num_classes=0, depth=1)
    embed = load_dino_v1(None, model=model)
    out = embed(x)
    assert out.shape == (2, 384) and torch.allclose(out.norm(dim=-1), torch.ones(2))
    with torch.no_grad():
        expected = model(dino_v1_transform()(x))  # timm's own head: CLS after the final norm
    assert torch.allclose(out, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="dino_v1_weights"):
        load_dino_v1("no/such/file.pth")


def test_training_time_evaluation_logs_next_to_the_dpo_metrics(tmp_path):
    from conftest import REPO
    from focusdpo.commands.train import main as train

    train(["--config", str(REPO / "recipes" / "tiny_cpu.yaml"), "--output_dir", str(tmp_path), "--max_steps", "2",
           "--toy_num_pairs", "4", "--save_steps", "10", "--logging_steps", "1", "--sample_steps", "2",
           "--sample_every_run", "false", "--subject_eval_steps", "2", "--subject_eval_prompts", "2",
           "--report_to", "tensorboard"])
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in logs if "subject_eval/fidelity_mean" in m]
    assert [m["step"] for m in evals] == [2] and any("loss" in m for m in logs)
    assert {"subject_eval/fidelity_min_delta", "subject_eval/subject_count", "subject_eval/backbone_i"} <= set(evals[0])
    assert (tmp_path / "subject_eval" / "step-2.png").is_file()
    assert list(tmp_path.rglob("events.out.tfevents.*"))  # the grid and scalars went to TensorBoard


def test_two_processes_split_the_prompts_and_write_the_same_report(tmp_path):
    from conftest import accelerate_launch

    # One image per sampler call: a batch of another composition may differ in the last float bit.
    single = evaluate(tmp_path / "one", "--batch_size", "1")
    args = ["--benchmark", str(UNO_MULTI), "--data_root", str(SHARED_DATA / "dreambench"), "--output_dir",
            str(tmp_path / "two"), "--max_prompts", "3", "--batch_size", "1", *TOY]
    accelerate_launch(["-m", "focusdpo", "evaluate", *args], processes=2, port=29637)
    assert (tmp_path / "two" / "report.json").read_bytes() == (single / "report.json").read_bytes()
    assert sorted(p.name for p in (tmp_path / "two" / ".shards").iterdir()) == ["scores-0.json", "scores-1.json"]


def test_eval_recipe_parses():
    from conftest import REPO

    recipe = str(REPO / "recipes" / "eval_tiny_cpu.yaml")
    cfg, model_cfg, focus_cfg = parse(["--config", recipe, "--benchmark", "b.json"])
    assert cfg.metrics == ["subject", "backbone_i"] and focus_cfg.feature_backbone == "mobilenet_v2"
    assert model_cfg.family == "sd"
