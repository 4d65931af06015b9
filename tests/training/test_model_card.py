"""The model card a run writes."""

from focusdpo.config.training import FocusDPOConfig, LossConfig, ModelConfig


def test_model_card_of_a_full_fine_tune_loads_the_denoiser_not_a_lora(tmp_path):
    from focusdpo.config.focus import FocusConfig
    from focusdpo.config.training import DataConfig
    from focusdpo.training.model_card import model_card_text

    configs = (FocusDPOConfig(output_dir=str(tmp_path)), ModelConfig(family="flux2", reference_mode="frozen_copy",
                                                                     lora_rank=0), DataConfig(), LossConfig(),
               FocusConfig())
    card = model_card_text(tmp_path, configs, steps=7, num_pairs=3)
    assert "every transformer weight (full fine-tune)" in card and "(vanilla Diffusion-DPO)" in card
    assert 'pipe.transformer = type(pipe.transformer).from_pretrained("path/to/this/folder/transformer")' in card
    assert "load_lora_weights" not in card and "Samples" not in card
