"""The evaluator end to end on tiny in-process models with the DreamBench subset, its bad-input paths, and its output
folder: keyed by what made its images, locked, a full disk named."""

import errno
import json
import os
import shutil
import socket

import pytest
import torch

from focusdpo.commands.evaluate import main
from focusdpo.config.evaluation import EvalConfig
from focusdpo.errors import ConfigError, EvalInputError, OutputError
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
    for name, family, seed in (("dpo_sd", "sd", 1), ("dpo_sdxl", "sdxl", 1), ("other_sd", "sd", 2)):
        backbone = load_backbone(family)
        torch.manual_seed(seed)
        backbone.denoiser.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                                 target_modules=list(backbone.default_lora_targets)))
        backbone.save_lora(root / name)
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
    for field in ("loras", "metrics"):  # a lone string, as a YAML recipe may give it: not walked letter by letter
        with pytest.raises(ConfigError, match=rf"{field}='subject' is a str, but {field} takes list\[str\] "
                                              r"\(write \[subject\]\)"):
            EvalConfig(benchmark="x.json", **{field: "subject"})
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps([{"text": "a dog", "images": ["dog/00.jpg"]}]))
    with pytest.raises(SystemExit):
        main(["--benchmark", str(odd), "--output_dir", str(tmp_path / "out"), *TOY])
    assert "cannot tell the layout" in capsys.readouterr().err
    with pytest.raises(EvalInputError, match="no entry has all its images"):
        run(*parse(["--benchmark", str(UNO_MULTI), "--data_root", str(tmp_path), "--output_dir", str(tmp_path),
                    *TOY]))


# ---- the output folder: keyed by what made its images, locked, a full disk named -------------------------------------
def refuse_models(monkeypatch):
    """Loading a scorer or the generator fails the test: a refusal must come before any model loads."""
    import focusdpo.evaluation.run as evaluation

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the rerun was refused")
    monkeypatch.setattr(evaluation, "build_scorers", loaded)
    monkeypatch.setattr(evaluation, "load_backbone", loaded)


def refuse_sampling(monkeypatch):
    import focusdpo.evaluation.run as evaluation

    def sampled(*args, **kwargs):
        raise AssertionError("an image on disk was generated again")
    monkeypatch.setattr(evaluation, "sample_images", sampled)


def test_a_rerun_with_other_settings_or_loras_is_refused_and_an_identical_one_resumes(tmp_path, lora_dirs,
                                                                                     monkeypatch):
    lora = tmp_path / "lora"
    shutil.copytree(lora_dirs / "dpo_sd", lora)
    out = evaluate(tmp_path / "eval", "--loras", str(lora), prompts=1)
    with monkeypatch.context() as patched:
        refuse_sampling(patched)  # same settings and inputs: every image is reused
        evaluate(out, "--loras", str(lora), prompts=1)
    image = out / "images" / "lora" / min(os.listdir(out / "images" / "lora"))
    made = (out / "images" / "base" / image.name).read_bytes()
    image.write_bytes(made)  # a reused image is not regenerated
    report = json.loads((evaluate(out, "--loras", str(lora), prompts=2) / "report.json").read_text())
    assert report["counts"]["prompts"] == 2 and image.read_bytes() == made  # one prompt more: the run extends
    refuse_models(monkeypatch)
    changes = ((["--seed", "1"], "sampling.seed (0 → 1)"), (["--resolution", "48"], "sampling.resolution (32 → 48)"),
               (["--sample_steps", "3"], "sampling.sample_steps (2 → 3)"))
    for extra, changed in changes:
        with pytest.raises(OutputError, match=rf"{out} holds images made with other settings or inputs \(changed: "
                                              rf"{changed.replace('(', '.').replace(')', '.')}.*new --output_dir"):
            run(*parse(eval_argv(out, "--loras", str(lora), *extra)))
    shutil.copy(lora_dirs / "other_sd" / "pytorch_lora_weights.safetensors", lora)  # another LoRA, same name
    with pytest.raises(OutputError, match="changed: lora lora\\)"):
        run(*parse(eval_argv(out, "--loras", str(lora))))
    assert image.read_bytes() == made


def eval_argv(out, *extra, prompts: int = 1):
    return ["--benchmark", str(UNO_MULTI), "--data_root", str(SHARED_DATA / "dreambench"), "--output_dir", str(out),
            "--max_prompts", str(prompts), *TOY, *extra]


def another_live_process() -> int:
    return os.getppid()  # alive for as long as this test runs, on this host, not this process


def test_a_second_evaluation_into_one_folder_is_refused_while_the_first_lives(tmp_path, monkeypatch):
    owner = another_live_process()
    (tmp_path / ".eval.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": owner}))
    refuse_models(monkeypatch)
    with pytest.raises(OutputError, match=f"another process is writing {tmp_path / 'eval'} \\(pid {owner}"):
        run(*parse(eval_argv(tmp_path / "eval")))


def test_a_full_disk_while_writing_images_names_the_folder_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    from PIL import Image

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full_disk)
    folder = tmp_path / "eval" / "images" / "base"
    with pytest.raises(OutputError, match=f"no space left on the device of {folder} "):
        run(*parse(eval_argv(tmp_path / "eval")))
    assert list(folder.iterdir()) == [] and not (tmp_path / ".eval.lock").exists()


def test_references_are_read_as_displayed(tmp_path):
    """A phone photo stores its pixels sideways with an EXIF orientation: the scorers see it upright."""
    from PIL import Image

    from focusdpo.evaluation.run import read_image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.new("RGB", (40, 20), "red").save(tmp_path / "photo.jpg", exif=exif.tobytes())
    assert read_image(tmp_path / "photo.jpg").shape == (3, 40, 20)


def test_a_missing_cut_or_other_family_lora_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    from conftest import cut, lora_file, png

    refuse_models(monkeypatch)
    (tmp_path / "r.png").write_bytes(png("green"))
    (tmp_path / "bench.jsonl").write_text(json.dumps({"prompt": "a dog", "references": ["r.png"]}) + "\n")
    flux = lora_file(tmp_path / "flux.safetensors", "transformer")
    for lora, message in ((flux, f"loras: {flux} holds transformer LoRA weights, not the unet weights of family 'sd'"),
                          (tmp_path / "gone", "loras: '{}' does not exist".format(tmp_path / "gone")),
                          (cut(lora_file(tmp_path / "sd.safetensors")), "sd.safetensors cannot be read")):
        with pytest.raises(SystemExit) as exit_:
            main(["--benchmark", str(tmp_path / "bench.jsonl"), "--output_dir", str(tmp_path / "out"),
                  "--loras", str(lora), *TOY])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and message in err, err
