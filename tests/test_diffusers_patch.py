"""The diff in docs/ecosystem.md ("The loss inside diffusers' Diffusion-DPO script") stays applicable and its calls
stay right.

diffusers' script itself is not in this repository and the tests do not fetch it, so the two-step run of the patched
script is documented, not repeated here. What is checked: the diff block is a well-formed unified diff (each hunk's
header counts match its body, so ``git apply`` does not reject a hand edit), every focusdpo name it imports exists,
and the calls it makes run at toy size, at λ = 0 giving the script's sigmoid and hinge losses on the same errors.
"""

import importlib
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torchvision import transforms

from focusdpo import FocusConfig, compute_focus_weights, diffusion_dpo_loss, weighted_error
from focusdpo.focus.mapper import FocusMapper

DOC = Path(__file__).resolve().parents[1] / "docs" / "ecosystem.md"
HEADING = "## The loss inside diffusers' Diffusion-DPO script"
HUNK = re.compile(r"^@@ -(\d+),(\d+) \+(\d+),(\d+) @@")
TOY = {"dino_random_weights": True, "dino_depth": 2, "dino_image_size": 56}  # tests only: random features


def patch_text() -> str:
    text = DOC.read_text()
    assert HEADING in text, f"{DOC} lost the section {HEADING!r}"
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```diff\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the section should hold exactly one ```diff block"
    return blocks[0]


def hunks(diff: str) -> list[tuple[tuple[int, int, int, int], list[str]]]:
    out = []
    for line in diff.splitlines():
        match = HUNK.match(line)
        if match:
            out.append((tuple(int(g) for g in match.groups()), []))
        elif out:
            out[-1][1].append(line)
    return out


def test_diff_block_is_a_consistent_unified_diff():
    diff = patch_text()
    path = "examples/research_projects/diffusion_dpo/train_diffusion_dpo.py"
    assert f"--- a/{path}\n+++ b/{path}\n" in diff
    found = hunks(diff)
    assert len(found) >= 8
    shift = 0
    for (old_start, old_len, new_start, new_len), body in found:
        assert all(line[:1] in (" ", "+", "-") for line in body), body
        assert sum(line[:1] in " -" for line in body) == old_len
        assert sum(line[:1] in " +" for line in body) == new_len
        assert new_start == old_start + shift  # the new file's line numbers follow from the earlier hunks
        shift += new_len - old_len


def test_diff_imports_only_existing_focusdpo_names():
    imports = [line[1:].split() for line in patch_text().splitlines() if line.startswith("+from focusdpo")]
    assert imports
    for _, module, _, *names in imports:  # from MODULE import NAME, NAME
        loaded = importlib.import_module(module)
        for name in names:
            assert hasattr(loaded, name.rstrip(",")), f"the patch imports {name} from {module}, which lacks it"


def test_pair_flip_flips_winner_and_loser_together():
    pair = torch.rand(6, 4, 5)  # the script's stacked (winner, loser) channels
    assert torch.equal(transforms.RandomHorizontalFlip(p=1.0)(pair), pair.flip(-1))


def patch_inputs(pairs: int = 2, size: int = 32, references=(2, 0)):
    torch.manual_seed(0)
    pixel_values = torch.rand(pairs, 6, size, size) * 2 - 1  # the script's batch: [-1, 1], winner then loser channels
    refs = [torch.rand(k, 3, size, size) for k in references]
    timesteps = torch.randint(0, 1000, (pairs,)).repeat(2)  # the script's timesteps: one per pair, repeated
    return pixel_values, refs, timesteps


def weights_as_patched(focus: FocusConfig, pixel_values, refs, timesteps, grid=(16, 16)):
    mapper = FocusMapper(focus, device=torch.device("cpu"))  # the patch passes accelerator.device
    winners, losers = ((pixel_values.float() + 1) / 2).clamp(0, 1).chunk(2, dim=1)
    return compute_focus_weights(winners, losers, refs, grid, focus, mapper, timesteps=timesteps,
                                 scheduler=DDPMScheduler())


def test_lambda_zero_weights_are_ones_and_errors_are_the_scripts_mse():
    # as the patch reads --focus_config: JSON integers and booleans must pass FocusConfig's type checks
    focus = FocusConfig(**json.loads('{"lambda_structure": 0, "lambda_detail": 0, "dino_random_weights": true, '
                                     '"dino_depth": 2, "dino_image_size": 56}'))
    pixel_values, refs, timesteps = patch_inputs(references=(2, 0))  # K may differ; K = 0 needs λ_s = 0
    weights = weights_as_patched(focus, pixel_values, refs, timesteps)
    assert torch.equal(weights, torch.ones(4, 16, 16))
    pred, target = torch.randn(2, 4, 4, 16, 16).unbind()
    plain = F.mse_loss(pred, target, reduction="none").mean(dim=[1, 2, 3])
    torch.testing.assert_close(weighted_error(pred, target, weights), plain, rtol=1e-6, atol=0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_twice_beta_dpo_gives_the_scripts_loss(loss_type):
    # exact binary fractions, so every difference is exact and only the formula is compared
    policy = torch.tensor([1.0, 1.25, 1.5, 1.0 + 2**-14])  # [w; l] of 2 pairs
    reference = torch.tensor([1.0 + 2**-13, 1.25, 1.5, 1.0])
    beta_dpo = 2500
    policy_w, policy_l = policy.chunk(2)
    reference_w, reference_l = reference.chunk(2)
    logits = (reference_w - reference_l) - (policy_w - policy_l)
    script = (-F.logsigmoid(beta_dpo * logits) if loss_type == "sigmoid" else torch.relu(1 - beta_dpo * logits)).mean()
    loss, _ = diffusion_dpo_loss(policy, reference, 2 * beta_dpo, loss_type)
    torch.testing.assert_close(loss, script, rtol=1e-6, atol=1e-7)


def test_focus_weights_on_the_latent_grid():
    focus = FocusConfig(lambda_structure=1.0, lambda_detail=1.0, **TOY)
    pixel_values, refs, timesteps = patch_inputs(references=(2, 1))
    weights = weights_as_patched(focus, pixel_values, refs, timesteps)
    assert weights.shape == (4, 16, 16)  # (2B, h, w), rows [winners; losers] like the script's errors
    torch.testing.assert_close(weights.mean(dim=(1, 2)), torch.ones(4))
    assert not torch.equal(weights, torch.ones_like(weights))
    pred, target = torch.randn(2, 4, 4, 16, 16).unbind()
    assert weighted_error(pred, target, weights).shape == (4,)
