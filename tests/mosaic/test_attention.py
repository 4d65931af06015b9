"""Reference-to-target attention capture on tiny FLUX.2 and Kontext transformers."""

import math

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from focusdpo.config.training import LossConfig
from focusdpo.errors import ConfigError
from focusdpo.models import load_backbone
from focusdpo.mosaic.attention import AttentionCapture, CapturePlan
from focusdpo.mosaic.objective import build_targets

from conftest import md_of, sca_of


def tiny_batch(backbone, refs: int, ref_size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch = {"pixel_values": torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, "prompts": ["a red cup", "two dogs"],
             "pair_ids": ["0", "1"], "references": [torch.rand(refs, 3, ref_size, ref_size, generator=g)] * 2}
    return backbone.prepare(batch, torch.Generator().manual_seed(seed))


def direct_attention(attn, kw: dict) -> torch.Tensor:
    """Full ``softmax(QKᵀ/√d)`` ``(N, H, T, T)`` from the block's own projections, norms and RoPE."""
    hidden, encoder, rope = kw["hidden_states"], kw.get("encoder_hidden_states"), kw["image_rotary_emb"]
    dim = attn.head_dim
    if hasattr(attn, "to_qkv_mlp_proj"):  # FLUX.2 single-stream: fused q/k/v + MLP input
        q, k, _ = attn.to_qkv_mlp_proj(hidden)[..., : 3 * attn.inner_dim].chunk(3, dim=-1)
    else:
        q, k = attn.to_q(hidden), attn.to_k(hidden)
    q, k = attn.norm_q(q.unflatten(-1, (-1, dim))), attn.norm_k(k.unflatten(-1, (-1, dim)))
    if encoder is not None:
        q = torch.cat([attn.norm_added_q(attn.add_q_proj(encoder).unflatten(-1, (-1, dim))), q], dim=1)
        k = torch.cat([attn.norm_added_k(attn.add_k_proj(encoder).unflatten(-1, (-1, dim))), k], dim=1)
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    return (torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(dim)).softmax(-1)


@pytest.mark.parametrize("family", ["flux2", "flux_kontext"])
def test_captured_attention_is_the_blocks_own_softmax_and_leaves_the_output_unchanged(family):
    backbone = load_backbone(family, max_references=2)
    den = backbone.denoiser
    prepared = tiny_batch(backbone, refs=2)
    with torch.no_grad():
        plain = backbone.predict(den, prepared)
    target, image = 64, 64 + 2 * 64
    plan = CapturePlan(torch.tensor([[64, 100, 130], [191, 64, 65]]), target, image)
    blocks = [den.transformer_blocks[0].attn, den.single_transformer_blocks[0].attn]
    inputs = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: inputs.__setitem__(m, kw), with_kwargs=True) for b in blocks]
    for index, block in enumerate(blocks):
        capture = AttentionCapture(den, [index])
        with torch.no_grad():
            with capture.recording(plan):
                captured = backbone.predict(den, prepared)
            got = capture.attention(plan)
        capture.remove()
        assert torch.equal(captured, plain)  # capture on == capture off, bit for bit
        with torch.no_grad():
            full = direct_attention(block, inputs[block])[:2]  # the winners
        offset = full.shape[-1] - image
        rows = plan.rows + offset
        picked = torch.stack([full[s][:, rows[s]][..., offset:offset + target] for s in range(2)])
        expected = (picked / picked.sum(-1, keepdim=True)).mean(1)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    for hook in hooks:
        hook.remove()


def test_blocks_are_selected_by_name_or_index_and_averaged():
    backbone = load_backbone("flux2", max_references=1)
    prepared = tiny_batch(backbone, refs=1)
    plan = CapturePlan(torch.tensor([[64, 70], [80, 127]]), 64, 128)
    per_block = []
    for blocks in ([0], [1], "all"):
        capture = AttentionCapture(backbone.denoiser, blocks)
        with torch.no_grad(), capture.recording(plan):
            backbone.predict(backbone.denoiser, prepared)
        per_block.append(capture.attention(plan))
        capture.remove()
    torch.testing.assert_close(per_block[2], (per_block[0] + per_block[1]) / 2)
    assert not torch.allclose(per_block[0], per_block[1])
    with pytest.raises(ConfigError, match=r"indices must lie in \[0, 2\)"):
        AttentionCapture(backbone.denoiser, [2])


def test_capture_is_refused_on_a_unet():
    backbone = load_backbone("sd")
    with pytest.raises(ConfigError, match="UNet2DConditionModel has no reference tokens"):
        AttentionCapture(backbone.denoiser)
    from focusdpo.config.focus import FocusConfig
    from focusdpo.mosaic.objective import MosaicObjective

    with pytest.raises(ConfigError, match="family='sd'"):
        MosaicObjective(backbone.denoiser, "sd", LossConfig(lambda_sca=0.1), FocusConfig())


def test_sca_decreases_when_trained_on_fixed_correspondences_with_checkpointing():
    torch.manual_seed(0)
    backbone = load_backbone("flux2", max_references=2, reference_size=16)
    den = backbone.denoiser.requires_grad_(True)
    den.enable_gradient_checkpointing()  # the recipes train this way: gradients must still reach the blocks
    den.train()
    prepared = tiny_batch(backbone, refs=2, ref_size=16)
    points = [torch.tensor([[0, 0, 9], [0, 5, 20], [1, 3, 40], [1, 15, 63]]), torch.tensor([[1, 2, 0], [0, 7, 33]])]
    t = build_targets(points, [2, 2], 64, 16)
    capture = AttentionCapture(den, "all")
    optimizer = torch.optim.Adam(den.parameters(), lr=3e-3)
    history = []
    for _ in range(6):
        with capture.recording(t.plan):
            backbone.predict(den, prepared)
        loss = sca_of(capture.attention(t.plan), t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < history[0] - 0.1, history


@pytest.mark.parametrize("refs", [4, 6])
def test_four_and_six_references_run(refs):
    backbone = load_backbone("flux2", max_references=refs, reference_size=16)
    prepared = tiny_batch(backbone, refs=refs, ref_size=16)
    points = [torch.stack([torch.full((3,), k), torch.arange(3) + k, torch.arange(3) + 3 * k], 1) for k in range(refs)]
    t = build_targets([torch.cat(points)] * 2, [refs, refs], 64, 16, "all")
    assert t.plan.rows.shape == (2, refs * 16) and t.plan.image_tokens == 64 + refs * 16
    capture = AttentionCapture(backbone.denoiser, "all")
    with torch.no_grad(), capture.recording(t.plan):
        backbone.predict(backbone.denoiser, prepared)
    attn = capture.attention(t.plan)
    assert attn.shape == (2, refs * 16, 64) and torch.isfinite(sca_of(attn, t)) and md_of(attn, t) < 0


def test_an_attention_backend_set_after_installing_reaches_the_wrapped_processor():
    backbone = load_backbone("flux2")
    AttentionCapture(backbone.denoiser, "all")
    backbone.denoiser.set_attention_backend("native")
    assert backbone.denoiser.transformer_blocks[0].attn.processor.inner._attention_backend.value == "native"
