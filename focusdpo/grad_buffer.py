"""The trainable parameters' gradients as views of one flat buffer.

A LoRA has many small tensors (96 on the tiny SD UNet, thousands on a FLUX transformer). Zeroing, the
gradient norm and clipping then cost one call per tensor, and freeing the gradients each step hands their
memory back to the allocator: on the tiny SD step these were ~2.5 ms, more than any other piece outside
the denoiser. With every ``.grad`` a view of one buffer, each is a single tensor op.

Autograd adds into a gradient that exists in place (``grad += new``), and DDP copies its all-reduced
buckets back in place, so the views survive backward. Whatever replaces a ``.grad`` (``zero_grad`` of a
wrapping module, a skipped step setting them to None) detaches its view: the buffer is read only while
:meth:`GradientBuffer.attached`, and :meth:`GradientBuffer.zero_` attaches the views again.
"""

from __future__ import annotations

import torch


class GradientBuffer:
    """``params``' gradients as views of one zero-initialised flat buffer (all on one device, of one dtype)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = list(params)
        first = self.params[0]
        self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=first.dtype, device=first.device)
        pieces = self.flat.split([p.numel() for p in self.params])
        self.views = [piece.view_as(param) for piece, param in zip(pieces, self.params)]
        self.attach()

    @classmethod
    def of(cls, params: list[torch.nn.Parameter]) -> "GradientBuffer | None":
        """A buffer for ``params``, or None where one cannot hold them all: no parameters, several devices or
        dtypes, or subclassed tensors (DTensor shards)."""
        if not params or any(type(p) is not torch.nn.Parameter for p in params):
            return None
        if len({(p.device, p.dtype) for p in params}) > 1:
            return None
        return cls(params)

    def holds(self, params: list[torch.nn.Parameter]) -> bool:
        """Whether this buffer still fits ``params`` (the same tensors, on its device, of its dtype)."""
        return (len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))
                and params[0].device == self.flat.device and params[0].dtype == self.flat.dtype)

    def attach(self) -> None:
        for param, view in zip(self.params, self.views):
            param.grad = view

    def attached(self) -> bool:
        """Whether every parameter's ``.grad`` is still its view (nothing replaced one since :meth:`zero_`)."""
        return all(param.grad is view for param, view in zip(self.params, self.views))

    def zero_(self) -> None:
        """Zero every gradient in place, attaching the views again where a ``.grad`` was replaced."""
        self.flat.zero_()
        if not self.attached():
            self.attach()

    def clip_(self, max_norm: float) -> torch.Tensor:
        """The gradients' total 2-norm, after scaling them by ``max_norm / (norm + 1e-6)`` clamped to 1 (torch's
        ``clip_grad_norm_`` rule; ``inf``: never). Only while :meth:`attached`: the buffer is then every gradient."""
        norm = torch.linalg.vector_norm(self.flat)
        if max_norm != float("inf"):  # a tensor clamp, not a Python `if`: no wait for the device
            self.flat.mul_((max_norm / (norm + 1e-6)).clamp_(max=1.0))
        return norm
