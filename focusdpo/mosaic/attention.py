"""Reference→target attention capture for FLUX-family in-context transformers (MOSAIC's SCA and MD losses).

:class:`AttentionCapture` wraps the attention processors of chosen blocks of a ``Flux2Transformer2DModel``
(FLUX.2 / Klein) or a ``FluxTransformer2DModel`` (FLUX.1 Kontext) through diffusers' public
``attn_processors`` / ``set_attn_processor``. The wrapped processor runs unchanged (the model's output is
bit-identical); while :meth:`AttentionCapture.recording` is active it also keeps the block's own normalised
queries and keys, read with forward hooks on ``attn.norm_q`` / ``attn.norm_k``, and the RoPE tables the block
received. :meth:`AttentionCapture.attention` then applies the same RoPE (diffusers' ``apply_rotary_emb``, as the
processors call it) and returns, for the requested reference query rows only,

    A[s, r, j] = mean over heads and selected blocks of softmax_j(q_r · k_jᵀ / √d),  j over the L target tokens.

Memory: ``samples × rows × L`` floats for the block average, ``samples × heads × rows × L`` transiently for one
block at a time (each block's softmax is recomputed in backward), and the kept query rows and target keys
(``samples × (rows + L) × heads × d`` per block); never ``L_total²``.

Token layout (``focusdpo.models.flux``): the transformer's image stream is ``[target (L); ref 1 (l); …]``. In
double-stream blocks ``norm_q`` sees the image stream alone, in single-stream blocks ``[text; image]``: either
way the image tokens are the *last* ``image_tokens`` rows of the normalised queries and of the RoPE tables.

Gradient checkpointing: the queries and keys are only kept during the forward and the attention is computed
after it, outside any checkpointed block, so a recomputation in backward runs exactly the original ops.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch.utils.checkpoint import checkpoint

from focusdpo.errors import ConfigError

IN_CONTEXT_TRANSFORMERS = ("Flux2Transformer2DModel", "FluxTransformer2DModel")

# Processors whose attention is softmax(QKᵀ/√d) of norm_q/norm_k outputs after apply_rotary_emb(sequence_dim=1).
WRAPPABLE_PROCESSORS = ("Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor", "FluxAttnProcessor")

BLOCK_SELECTIONS = ("double", "all")

DOUBLE_PREFIX, SINGLE_PREFIX = "transformer_blocks.", "single_transformer_blocks."


@dataclass
class CapturePlan:
    """Which attention rows one forward pass keeps.

    rows: ``(S, R)`` long, the query rows per captured sample as indices into the image stream (target tokens
        are ``0 … L−1``, reference k's token t is ``L + k·l + t``); the first ``S`` batch rows are captured.
    target_tokens: ``L``. image_tokens: the image-stream length ``L + K·l`` the transformer receives.
    """

    rows: torch.Tensor
    target_tokens: int
    image_tokens: int


def select_blocks(denoiser: torch.nn.Module, blocks) -> list[str]:
    """Processor names of the chosen blocks: ``"double"`` (MOSAIC's code), ``"all"`` (the paper), or indices
    into ``[double-stream blocks…, single-stream blocks…]``."""
    names = list(denoiser.attn_processors)
    double = [n for n in names if n.startswith(DOUBLE_PREFIX)]
    ordered = double + [n for n in names if n.startswith(SINGLE_PREFIX)]
    if blocks == "double":
        return double
    if blocks == "all":
        return ordered
    bad = [i for i in blocks if not 0 <= int(i) < len(ordered)]
    if bad or not blocks:
        raise ConfigError(f"attention_blocks={blocks!r}: indices must lie in [0, {len(ordered)}) (this model has "
                          f"{len(double)} double-stream then {len(ordered) - len(double)} single-stream blocks), "
                          f"or use one of: {', '.join(BLOCK_SELECTIONS)}")
    return [ordered[int(i)] for i in blocks]


class CapturingProcessor:
    """Runs the wrapped processor unchanged; while recording, keeps its normalised q/k and RoPE tables."""

    def __init__(self, inner, capture: "AttentionCapture"):
        self.inner, self.capture = inner, capture
        self.signature = inspect.signature(inner.__call__)

    # diffusers sets the attention backend as these private attributes on every processor: pass them through, or a
    # backend chosen after the capture is installed would silently not reach the wrapped processor.
    @property
    def _attention_backend(self):
        return self.inner._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.inner._attention_backend = value

    @property
    def _parallel_config(self):
        return self.inner._parallel_config

    @_parallel_config.setter
    def _parallel_config(self, value):
        self.inner._parallel_config = value

    def __call__(self, attn, *args, **kwargs):
        if not self.capture.is_recording:
            return self.inner(attn, *args, **kwargs)
        kept = {}
        hooks = [attn.norm_q.register_forward_hook(lambda m, i, out: kept.__setitem__("q", out)),
                 attn.norm_k.register_forward_hook(lambda m, i, out: kept.__setitem__("k", out))]
        try:
            out = self.inner(attn, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        rope = self.signature.bind(attn, *args, **kwargs).arguments.get("image_rotary_emb")
        self.capture.kept.append((kept["q"], kept["k"], rope))
        return out


class AttentionCapture:
    """Install on a denoiser once; record the reference→target attention of chosen blocks per forward pass."""

    def __init__(self, denoiser: torch.nn.Module, blocks="double"):
        name = type(denoiser).__name__
        if name not in IN_CONTEXT_TRANSFORMERS:
            raise ConfigError(f"MOSAIC attention capture needs an in-context transformer "
                              f"({', '.join(IN_CONTEXT_TRANSFORMERS)}: family flux2 or flux_kontext); {name} has no "
                              "reference tokens to attend from. "
                              "Set lambda_sca: 0 and lambda_md: 0 for this family")
        self.denoiser, self.selected = denoiser, select_blocks(denoiser, blocks)
        processors = denoiser.attn_processors
        wrong = {type(processors[n]).__name__ for n in self.selected} - set(WRAPPABLE_PROCESSORS)
        if wrong:
            raise ValueError(f"attention capture wraps {', '.join(WRAPPABLE_PROCESSORS)}, but the selected blocks use "
                             f"{sorted(wrong)}; reset them with set_attn_processor before enabling MOSAIC losses")
        self.original = dict(processors)
        denoiser.set_attn_processor({n: CapturingProcessor(p, self) if n in self.selected else p
                                     for n, p in processors.items()})
        self.plan: CapturePlan | None = None
        self.kept: list = []

    @property
    def is_recording(self) -> bool:
        return self.plan is not None

    @contextmanager
    def recording(self, plan: CapturePlan):
        """Keep q/k of the selected blocks during one forward pass (nested use is refused)."""
        if self.plan is not None:
            raise RuntimeError("AttentionCapture.recording is already active")
        self.plan, self.kept = plan, []
        try:
            yield self
        finally:
            self.plan = None

    def attention(self, plan: CapturePlan) -> torch.Tensor:
        """``(S, R, L)`` float32 averaged attention of the recorded pass (rows of ``plan``), then forget it."""
        if not self.kept:
            raise RuntimeError("no attention was recorded: run the denoiser inside AttentionCapture.recording(plan)")
        total = sum(rows_attention(q, k, rope, plan) for q, k, rope in self.kept)
        count = len(self.kept)
        self.kept = []
        return total / count

    def remove(self) -> None:
        """Put the original processors back."""
        self.denoiser.set_attn_processor(self.original)


def rows_attention(query: torch.Tensor, key: torch.Tensor, rope, plan: CapturePlan) -> torch.Tensor:
    """Head-averaged ``softmax_j(q_r·k_jᵀ/√d)`` over target tokens ``j`` for the rows of ``plan``.

    Args:
        query, key: ``(N, T, H, D)`` outputs of the block's ``norm_q`` / ``norm_k`` (before RoPE); the image
            stream is their last ``plan.image_tokens`` rows.
        rope: the block's ``(cos, sin)`` tables ``(T_rope, D)`` or None; the image stream is their last rows.

    Returns:
        ``(S, R, L)`` float32, ``S = plan.rows.shape[0]``.
    """
    rows, n_img, n_tgt = plan.rows, plan.image_tokens, plan.target_tokens
    samples, count = rows.shape
    heads, dim = query.shape[-2:]
    # Copies of the needed rows only (gather / clone): autograd then keeps these, not the whole q and k.
    q_rows = query[:samples, -n_img:].gather(1, rows[..., None, None].expand(-1, -1, heads, dim))  # (S, R, H, D)
    k_tgt = key[:samples, -n_img:][:, :n_tgt].clone()  # (S, L, H, D)
    tables = () if rope is None else (*(t[-n_img:][rows.flatten()] for t in rope), *(t[-n_img:][:n_tgt] for t in rope))
    if torch.is_grad_enabled():  # backward recomputes the H·R·L softmax instead of keeping it for every block
        return checkpoint(target_softmax, q_rows, k_tgt, *tables, use_reentrant=False)
    return target_softmax(q_rows, k_tgt, *tables)


def target_softmax(q_rows: torch.Tensor, k_tgt: torch.Tensor, *tables: torch.Tensor) -> torch.Tensor:
    """RoPE (``tables`` = cos/sin of the rows, then of the targets, or none) and the head-averaged softmax.

    ``q_rows`` ``(S, R, H, D)``, ``k_tgt`` ``(S, L, H, D)`` → ``(S, R, L)`` float32.
    """
    samples, count, heads, dim = q_rows.shape
    if tables:
        cos_rows, sin_rows, cos_tgt, sin_tgt = tables
        q_rows = apply_rotary_emb(q_rows.reshape(1, samples * count, heads, dim), (cos_rows, sin_rows),
                                  sequence_dim=1).reshape(samples, count, heads, dim)
        k_tgt = apply_rotary_emb(k_tgt, (cos_tgt, sin_tgt), sequence_dim=1)
    logits = torch.einsum("srhd,slhd->shrl", q_rows.float(), k_tgt.float()) / math.sqrt(dim)
    return logits.softmax(dim=-1).mean(dim=1)
