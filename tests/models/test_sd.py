"""The SD and SDXL adapters: noise levels on the flow scale, fp32 VAEs, SDXL's size conditioning."""

import torch

from focusdpo.models import load_backbone


def test_ddpm_noise_level_is_the_flow_sigma_of_the_same_snr():
    backbone = load_backbone("sd")
    t = torch.tensor([0, 100, 500, 999])
    u = backbone.flow_equivalent_sigma(t).double()
    alpha_bar = backbone.noise_scheduler.alphas_cumprod[t].double()
    snr_ddpm = alpha_bar / (1 - alpha_bar)
    snr_flow = ((1 - u) / u) ** 2  # x_t = (1 − σ)·x0 + σ·ε
    torch.testing.assert_close(snr_flow, snr_ddpm, rtol=1e-5, atol=0)
    batch = {"pixel_values": torch.zeros(2, 3, 32, 32), "prompts": ["a"], "pair_ids": ["p"]}
    prepared = backbone.prepare(batch, torch.Generator().manual_seed(0))
    torch.testing.assert_close(prepared.noise_level, backbone.flow_equivalent_sigma(
        prepared.model_kwargs["timestep"]))


def test_sdxl_keeps_a_force_upcast_vae_in_fp32_and_reads_size_columns():
    backbone = load_backbone("sdxl").to("cpu", torch.bfloat16)
    assert backbone.pipeline.vae.config.force_upcast and backbone.pipeline.vae.dtype == torch.float32
    assert backbone.pipeline.unet.dtype == torch.float32  # the trainable denoiser is cast elsewhere
    batch = {"pixel_values": torch.zeros(4, 3, 32, 32), "prompts": ["a", "b"], "pair_ids": ["p", "q"],
             "original_size": torch.tensor([[64, 48], [20, 30], [64, 48], [40, 50]]),
             "crop_top_left": torch.tensor([[0, 0], [1, 2], [0, 0], [3, 4]])}
    prepared = backbone.prepare(batch, torch.Generator().manual_seed(0))
    time_ids = prepared.model_kwargs["added_cond_kwargs"]["time_ids"]
    dim = backbone.pipeline.text_encoder_2.config.projection_dim
    for row, (size, crop) in enumerate(zip(batch["original_size"].tolist(), batch["crop_top_left"].tolist())):
        expected = backbone.pipeline._get_add_time_ids(tuple(size), tuple(crop), (32, 32), dtype=time_ids.dtype,
                                                       text_encoder_projection_dim=dim)
        torch.testing.assert_close(time_ids[row], expected[0])
    del batch["original_size"], batch["crop_top_left"]
    plain = backbone.prepare(batch, torch.Generator().manual_seed(0)).model_kwargs["added_cond_kwargs"]["time_ids"]
    assert plain.tolist() == [[32, 32, 0, 0, 32, 32]] * 4
