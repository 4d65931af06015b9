"""FLUX.2 [klein] and FLUX.1 Kontext adapters on tiny real diffusers models (random weights, 32 px, CPU)."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from diffusers.training_utils import compute_density_for_timestep_sampling
from peft import LoraConfig

from focusdpo.losses import diffusion_dpo_loss, weighted_error
from focusdpo.models import load_backbone
from focusdpo.models.base import DenoiseInputs
from focusdpo.models.flux import Flux2Backbone, FluxKontextBackbone
from focusdpo.models.sampling import sample_images
from focusdpo.models.tiny_flux import tiny_flux2_pipeline, tiny_flux_kontext_pipeline
from focusdpo.training.reference import disabled_adapters

RES = 32  # px → 8×8 packed tokens with 16 channels in both tiny models
GRID = 8
TOKENS = GRID * GRID
CHANNELS = 16
SEQ = 16  # text tokens: short prompts keep the tests fast


def flux2(**kwargs):
    return Flux2Backbone(tiny_flux2_pipeline(0), max_sequence_length=SEQ, **kwargs)


def kontext(**kwargs):
    return FluxKontextBackbone(tiny_flux_kontext_pipeline(0), max_sequence_length=SEQ, **kwargs)


BUILDERS = {"flux2": flux2, "flux_kontext": kontext}
families = pytest.mark.parametrize("family", list(BUILDERS))


def make_batch(counts, seed=1, res=RES, ref_res=None):
    g = torch.Generator().manual_seed(seed)
    pairs = len(counts)
    return {"pixel_values": torch.rand(2 * pairs, 3, res, res, generator=g) * 2 - 1,
            "prompts": [f"a red cube number {i}" for i in range(pairs)],
            "pair_ids": [f"pair-{i}" for i in range(pairs)],
            "references": [torch.rand(k, 3, ref_res or res, ref_res or res, generator=g) for k in counts]}


def prepare(backbone, batch, seed=0):
    return backbone.prepare(batch, torch.Generator().manual_seed(seed))


def add_lora(backbone, name="default", rank=4, alpha=8):
    backbone.denoiser.requires_grad_(False)
    backbone.denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                             target_modules=list(backbone.default_lora_targets)), adapter_name=name)
    return [p for n, p in backbone.denoiser.named_parameters() if "lora_" in n]


@families
@pytest.mark.parametrize("k", [0, 1, 4, 6])
def test_prepare_and_predict_shapes(family, k):
    backbone = BUILDERS[family]()
    inputs = prepare(backbone, make_batch([k, k]))
    assert backbone.loss_grid(RES) == (GRID, GRID)
    assert inputs.target.shape == (4, CHANNELS, GRID, GRID)
    assert inputs.noise_level.shape == (4,)
    assert inputs.model_kwargs["img_ids"].shape[0] == TOKENS * (k + 1)
    assert ("references" in inputs.model_kwargs) == (k > 0)
    guidance = inputs.model_kwargs.get("guidance")  # FLUX.1 has a guidance embedding, Klein has none
    assert guidance is None if family == "flux2" else guidance.tolist() == [3.5] * 4
    with torch.no_grad():
        tokens = backbone.predict_tokens(backbone.denoiser, inputs)
        pred = backbone.predict(backbone.denoiser, inputs)
    assert tokens.shape == (4, TOKENS * (k + 1), CHANNELS)
    assert pred.shape == inputs.target.shape
    assert torch.isfinite(pred).all()


@families
def test_winner_and_loser_share_noise_and_sigma(family):
    backbone = BUILDERS[family]()
    batch = make_batch([2, 2, 2])
    inputs = prepare(backbone, batch)
    sigma, target = inputs.noise_level, inputs.target
    noisy = backbone.unpack(inputs.model_kwargs["tokens"], inputs.model_kwargs["target_ids"], GRID, GRID)
    s = sigma.view(-1, 1, 1, 1)
    noise = noisy + (1 - s) * target  # x_t = (1−σ)x0 + σε and target = ε − x0  ⇒  ε = x_t + (1−σ)·target
    clean = noise - target
    torch.testing.assert_close(clean, backbone.encode_grid(batch["pixel_values"], None), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sigma[:3], sigma[3:], rtol=0, atol=0)
    torch.testing.assert_close(noise[:3], noise[3:], atol=1e-5, rtol=1e-5)
    assert len(set(sigma[:3].tolist())) == 3 and not torch.allclose(noise[0], noise[1])
    assert not torch.allclose(target[:3], target[3:])  # different images, same noise
    torch.testing.assert_close(inputs.model_kwargs["timestep"], sigma)  # the transformer multiplies by 1000


def test_sigma_density_and_scheduler_shift():
    backbone = kontext(flow_shift_mode="none")
    u = compute_density_for_timestep_sampling("none", 5, generator=torch.Generator().manual_seed(3))
    sigma = 1 - u  # u indexes the descending schedule, as in the diffusers training scripts
    torch.testing.assert_close(backbone.sample_sigmas(5, TOKENS, torch.Generator().manual_seed(3)), sigma)
    backbone.flow_shift_mode, backbone.flow_shift = "static", 3.0
    torch.testing.assert_close(backbone.sample_sigmas(5, TOKENS, torch.Generator().manual_seed(3)),
                               3 * sigma / (1 + 2 * sigma))
    backbone.flow_shift_mode = "pipeline"  # the tiny scheduler has FLUX's use_dynamic_shifting: shift depends on L
    config = backbone.pipeline.scheduler.config
    for seq_len in (64, 4096):
        mu = calculate_shift(seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                             config.max_shift)
        expected = math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))
        torch.testing.assert_close(backbone.sample_sigmas(5, seq_len, torch.Generator().manual_seed(3)), expected)
    normal = kontext(flow_density="logit_normal", logit_mean=1.0, logit_std=0.5, flow_shift_mode="none")
    sigma = normal.sample_sigmas(4000, TOKENS, torch.Generator().manual_seed(0))
    logit = torch.log(sigma / (1 - sigma))  # diffusers' sign: logit σ has mean −logit_mean
    assert abs(logit.mean().item() + 1.0) < 0.05 and abs(logit.std().item() - 0.5) < 0.05


@families
def test_fresh_lora_gives_ln2_and_a_step_moves_only_lora(family):
    torch.manual_seed(0)
    backbone = BUILDERS[family]()
    lora = add_lora(backbone)
    wrapped = {n for n, _ in backbone.denoiser.named_modules() if n.endswith(".lora_A")}
    assert any("single_transformer_blocks" in n for n in wrapped)  # the single stream is adapted too
    assert any("transformer_blocks.0.attn.to_out.0" in n for n in wrapped)
    inputs = prepare(backbone, make_batch([2, 2]))
    before = {n: p.detach().clone() for n, p in backbone.denoiser.named_parameters()}

    def loss_fn():
        pred = backbone.predict(backbone.denoiser, inputs)
        with disabled_adapters(backbone.denoiser) as ref:
            ref_pred = backbone.predict(ref, inputs)
        return diffusion_dpo_loss(weighted_error(pred, inputs.target), weighted_error(ref_pred, inputs.target),
                                  beta=1000.0)[0]

    loss = loss_fn()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    optimizer = torch.optim.AdamW(lora, lr=1e-2)
    loss.backward()
    optimizer.step()
    changed = {n for n, p in backbone.denoiser.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all(not p.requires_grad for n, p in backbone.denoiser.named_parameters() if "lora_" not in n)
    assert loss_fn().item() != pytest.approx(math.log(2), abs=1e-6)  # the adapter now changes the policy


@families
def test_reference_tokens_do_not_enter_the_loss(family):
    backbone = BUILDERS[family]()
    inputs = prepare(backbone, make_batch([2, 2]))
    with torch.no_grad():
        clean = backbone.predict(backbone.denoiser, inputs)

    def perturb(start, stop):
        def hook(module, args, output):
            out = output[0].clone()
            out[:, start:stop] += 10 * torch.randn_like(out[:, start:stop])
            return (out,)
        handle = backbone.denoiser.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return backbone.predict(backbone.denoiser, inputs)
        finally:
            handle.remove()

    torch.testing.assert_close(perturb(TOKENS, None), clean, rtol=0, atol=0)  # reference outputs: ignored
    assert not torch.allclose(perturb(0, TOKENS), clean)  # target outputs: the prediction


def single_pair(inputs: DenoiseInputs, pair: int, pairs: int, refs: int) -> DenoiseInputs:
    """The rows of one pair, cut to its own ``refs`` references (no padding, no mask)."""
    kw = dict(inputs.model_kwargs)
    rows = [pair, pair + pairs]
    for key in ("tokens", "references", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"):
        if key in kw:
            kw[key] = kw[key][rows]
    kw["references"] = kw["references"][:, : refs * TOKENS]
    kw["img_ids"] = kw["img_ids"][: TOKENS * (refs + 1)]
    kw.pop("attention_mask")
    return DenoiseInputs(kw, inputs.target[rows], inputs.noise_level[rows])


@families
def test_mixed_reference_counts_are_padded_and_masked_exactly(family):
    backbone = BUILDERS[family]()
    inputs = prepare(backbone, make_batch([1, 3, 2]))
    assert inputs.model_kwargs["references"].shape[1] == 3 * TOKENS
    with torch.no_grad():
        padded = backbone.predict(backbone.denoiser, inputs)
        for pair, k in enumerate([1, 3, 2]):
            alone = backbone.predict(backbone.denoiser, single_pair(inputs, pair, 3, k))
            torch.testing.assert_close(padded[[pair, pair + 3]], alone, atol=1e-5, rtol=1e-5)
        inputs.model_kwargs.pop("attention_mask")  # without the mask the padded tokens leak in
        assert not torch.allclose(backbone.predict(backbone.denoiser, inputs)[0], padded[0], atol=1e-4)
    strict = BUILDERS[family](mixed_reference_counts="error")
    with pytest.raises(ValueError, match="different reference counts"):
        prepare(strict, make_batch([1, 3, 2]))


def test_flux2_references_match_the_pipelines_own_reference_latents():
    backbone = flux2()
    batch = make_batch([3, 3])
    inputs = prepare(backbone, batch)
    pipe = backbone.pipeline
    for pair in range(2):
        images = [image[None] * 2 - 1 for image in batch["references"][pair]]
        tokens, ids = pipe.prepare_image_latents(images, 1, None, "cpu", torch.float32)
        torch.testing.assert_close(inputs.model_kwargs["references"][pair], tokens[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(inputs.model_kwargs["img_ids"][TOKENS:], ids[0])
    assert inputs.model_kwargs["img_ids"][TOKENS:, 0].unique().tolist() == [10, 20, 30]
    torch.testing.assert_close(inputs.model_kwargs["img_ids"][:TOKENS],
                               pipe.prepare_latents(1, 4, RES, RES, torch.float32, "cpu", None)[1][0])


def test_kontext_single_reference_matches_the_pipelines_own_ids_and_latents():
    backbone = kontext(reference_ids="kontext")
    batch = make_batch([1, 1])
    inputs = prepare(backbone, batch)
    _, image_latents, latent_ids, image_ids = backbone.pipeline.prepare_latents(
        batch["references"][1] * 2 - 1, 1, 4, RES, RES, torch.float32, "cpu", None)
    torch.testing.assert_close(inputs.model_kwargs["references"][1], image_latents[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inputs.model_kwargs["img_ids"], torch.cat([latent_ids, image_ids]))


@pytest.mark.parametrize("scheme", ["kontext", "diagonal", "width"])
def test_kontext_reference_id_schemes_tell_references_apart(scheme):
    backbone = kontext(reference_ids=scheme)
    ids = prepare(backbone, make_batch([3])).model_kwargs["img_ids"]
    blocks = [set(map(tuple, ids[i * TOKENS:(i + 1) * TOKENS].tolist())) for i in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not blocks[i] & blocks[j], (scheme, i, j)  # target and each reference: disjoint positions
    refs = ids[TOKENS:]
    if scheme == "kontext":
        assert refs[:, 0].unique().tolist() == [1.0, 2.0, 3.0]
    elif scheme == "diagonal":  # UNO: reference k starts where the previous one ends, on both axes
        assert ids[TOKENS, 1:].tolist() == [GRID, GRID] and ids[2 * TOKENS, 1:].tolist() == [2 * GRID, 2 * GRID]
    else:
        assert (refs[:, 2] < 0).all() and (refs[:, 0] == 0).all()
    with pytest.raises(ValueError, match="diagonal"):
        kontext(reference_ids="uno")


@families
def test_saved_lora_loads_into_a_fresh_pipeline(family, tmp_path):
    backbone = BUILDERS[family]()
    torch.manual_seed(1)
    for param in add_lora(backbone, name="dpo", rank=4, alpha=8):
        param.data.normal_(0, 0.3)  # as if trained; alpha/rank = 2 must survive the round trip
    inputs = prepare(backbone, make_batch([2, 2]))
    with torch.no_grad():
        trained = backbone.predict(backbone.denoiser, inputs)
    backbone.save_lora(tmp_path, "dpo")
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    fresh = BUILDERS[family]()  # same seed: the base weights the LoRA was trained on
    with torch.no_grad():
        base = fresh.predict(fresh.denoiser, inputs)
        fresh.pipeline.load_lora_weights(str(tmp_path))
        loaded = fresh.predict(fresh.denoiser, inputs)
    assert not torch.allclose(base, trained, atol=1e-3)
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-5)


@families
def test_cached_prompt_embeds_replace_the_text_encoders(family):
    backbone = BUILDERS[family]()
    batch = make_batch([1, 1])
    pipe = backbone.pipeline
    with torch.no_grad():
        expected = backbone.predict(backbone.denoiser, prepare(backbone, batch))
        if family == "flux2":
            batch["prompt_embeds"] = pipe.encode_prompt(batch["prompts"], max_sequence_length=SEQ)[0]
        else:
            embeds, pooled, _ = pipe.encode_prompt(batch["prompts"], None, max_sequence_length=SEQ)
            batch["prompt_embeds"], batch["pooled_prompt_embeds"] = embeds, pooled
        pipe.text_encoder = pipe.text_encoder_2 = None
        pipe.tokenizer = pipe.tokenizer_2 = None
        cached = backbone.predict(backbone.denoiser, prepare(backbone, dict(batch, prompts=None)))
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)
    batch["prompt_embeds"] = torch.cat([batch["prompt_embeds"]] * 2)  # one row per image instead of per pair
    with pytest.raises(ValueError, match="one row per pair"):
        prepare(backbone, batch)


@families
def test_bad_inputs_raise_clear_errors(family):
    backbone = BUILDERS[family]()
    with pytest.raises(ValueError, match="pair-1 has 7 references.*max_references"):
        prepare(backbone, make_batch([2, 7]))
    mixed = make_batch([1, 1])
    mixed["references"][1] = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="different sizes.*reference_size"):
        prepare(backbone, mixed)
    resized = BUILDERS[family](reference_size=RES)
    assert prepare(resized, mixed).model_kwargs["references"].shape == (4, TOKENS, CHANNELS)
    with pytest.raises(ValueError, match="divisible by 4"):
        prepare(backbone, make_batch([0], res=30))
    with pytest.raises(ValueError, match="divisible by 4"):
        prepare(backbone, make_batch([1], ref_res=18))
    with pytest.raises(ValueError, match="flow_density='sigmoid'.*logit_normal"):
        BUILDERS[family](flow_density="sigmoid")
    with pytest.raises(ValueError, match="reference_size=30"):
        BUILDERS[family](reference_size=30)


def test_wrong_family_checkpoints_are_refused(tmp_path):
    with pytest.raises(ValueError, match="flux_kontext"):
        Flux2Backbone(tiny_flux_kontext_pipeline(0))
    with pytest.raises(ValueError, match="'flux2'"):
        FluxKontextBackbone(tiny_flux2_pipeline(0))
    for saved, family, message in [("FluxKontextPipeline", "flux2", "flux2"),
                                   ("StableDiffusionPipeline", "flux_kontext", "flux_kontext"),
                                   ("Flux2KleinPipeline", "flux_kontext", "FLUX.2 checkpoints are family 'flux2'"),
                                   ("Flux2KleinKVPipeline", "flux2", "Flux2Pipeline or Flux2KleinPipeline")]:
        folder = tmp_path / saved
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": saved}))
        with pytest.raises(ValueError, match=message):
            load_backbone(family, str(folder))


def test_checkpoints_load_through_load_backbone(tmp_path):
    """A saved Klein pipeline loads as flux2; a FLUX.1-dev (FluxPipeline) folder loads as flux_kontext."""
    klein = tiny_flux2_pipeline(0)
    klein.save_pretrained(tmp_path / "klein")
    loaded = load_backbone("flux2", str(tmp_path / "klein"))
    assert isinstance(loaded, Flux2Backbone) and type(loaded.pipeline).__name__ == "Flux2KleinPipeline"
    torch.testing.assert_close(loaded.pipeline.vae.bn.running_var, klein.vae.bn.running_var)
    k = tiny_flux_kontext_pipeline(0)
    dev = FluxPipeline(scheduler=k.scheduler, vae=k.vae, text_encoder=k.text_encoder, tokenizer=k.tokenizer,
                       text_encoder_2=k.text_encoder_2, tokenizer_2=k.tokenizer_2, transformer=k.transformer)
    dev.save_pretrained(tmp_path / "dev")
    loaded = load_backbone("flux_kontext", str(tmp_path / "dev"))
    assert isinstance(loaded, FluxKontextBackbone) and type(loaded.pipeline).__name__ == "FluxKontextPipeline"
    loaded.max_sequence_length = SEQ
    assert prepare(loaded, make_batch([2])).target.shape == (2, CHANNELS, GRID, GRID)


@families
def test_tiny_default_and_sampling_at_training_size(family):
    backbone = load_backbone(family)
    assert backbone.family == family
    backbone.max_sequence_length = SEQ
    images = sample_images(backbone, ["a red cube", "a blue ball"], None, [0, 1], RES, steps=2)
    assert [im.size for im in images] == [(RES, RES)] * 2  # Kontext would otherwise upscale to 1024²


@pytest.mark.parametrize("loader", ["strict", "pipeline"])
def test_personalization_lora_is_the_frozen_reference_and_resume_reloads(loader, tmp_path):
    """FLUX.1 + an existing LoRA (UNO/DreamO-style): reference = base + that LoRA; the DPO LoRA goes on top."""
    from focusdpo.training.reference import DPO_ADAPTER, PERSONAL_ADAPTER, frozen_adapter

    personal = kontext()
    torch.manual_seed(2)
    for param in add_lora(personal, name="trained", rank=4, alpha=8):
        param.data.normal_(0, 0.3)
    inputs = prepare(personal, make_batch([2, 2]))
    with torch.no_grad():
        expected = personal.predict(personal.denoiser, inputs)
    personal.save_lora(tmp_path / "personal", "trained")

    backbone = kontext()
    backbone.add_lora_adapter(tmp_path / "personal", PERSONAL_ADAPTER, loader)  # alpha 8 != rank 4: metadata
    add_lora(backbone, name=DPO_ADAPTER)
    backbone.denoiser.set_adapters([PERSONAL_ADAPTER, DPO_ADAPTER])
    with torch.no_grad():
        policy = backbone.predict(backbone.denoiser, inputs)
        with frozen_adapter(backbone.denoiser) as ref:
            reference = backbone.predict(ref, inputs)
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(policy, reference, rtol=0, atol=0)  # fresh DPO LoRA: loss starts at ln 2

    # resume: Backbone.load_lora reads the saved file back into an existing adapter
    for name, param in backbone.denoiser.named_parameters():
        if f".{DPO_ADAPTER}." in name:
            param.data.normal_(0, 0.3)
    with torch.no_grad():
        trained = backbone.predict(backbone.denoiser, inputs)
    backbone.save_lora(tmp_path / "dpo", DPO_ADAPTER)
    for name, param in backbone.denoiser.named_parameters():
        if f".{DPO_ADAPTER}." in name:
            param.data.zero_()
    backbone.load_lora(tmp_path / "dpo", DPO_ADAPTER)
    with torch.no_grad():
        torch.testing.assert_close(backbone.predict(backbone.denoiser, inputs), trained, rtol=0, atol=1e-6)


def test_flux2_pipeline_shift_matches_the_pipelines_inference_schedule():
    backbone = load_backbone("flux2")  # tiny FLUX.2 [klein]; its scheduler has use_dynamic_shifting
    steps, seq_len = 50, 64
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(backbone.pipeline.scheduler.config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(seq_len, steps))
    plain = torch.from_numpy(np.linspace(1.0, 1 / steps, steps)).float()
    torch.testing.assert_close(backbone.shift_sigmas(plain, seq_len), scheduler.sigmas[:-1])
    backbone.flow_shift_mode = "none"
    assert torch.equal(backbone.shift_sigmas(plain, seq_len), plain)


def test_logit_mean_follows_the_diffusers_training_scripts():
    # The diffusers flow scripts: u from compute_density_for_timestep_sampling indexes the (descending,
    # unshifted) training schedule; σ = sigmas[int(u·T)].
    backbone = load_backbone("flux2", flow_density="logit_normal", logit_mean=1.0, logit_std=0.5,
                             flow_shift_mode="none")
    u = compute_density_for_timestep_sampling("logit_normal", 2000, 1.0, 0.5,
                                              generator=torch.Generator().manual_seed(0))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    script_sigma = scheduler.sigmas[(u * 1000).long()]
    ours = backbone.sample_sigmas(2000, 64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, script_sigma, rtol=0, atol=1.01e-3)
    assert ours.mean() < 0.5  # a positive logit_mean favours low noise, as in diffusers recipes
