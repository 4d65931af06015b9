"""The trainable parameters' gradients, and optionally their values, as views of one flat buffer each.

A LoRA has many small tensors (96 on the tiny SD UNet, thousands on a FLUX transformer). Zeroing, the
gradient norm, clipping and the optimizer step then cost one call per tensor, and freeing the gradients
each step hands their memory back to the allocator: on the tiny SD step these were ~4.5 ms, more than any
other piece outside the denoiser. With every ``.grad`` a view of one buffer, and every value a view of one
flat parameter that an elementwise optimizer (AdamW, SGD, ...) steps, each is a single tensor op.

Autograd adds into a gradient that exists in place (``grad += new``), and DDP copies its all-reduced
buckets back in place, so the views survive backward. Whatever replaces a ``.grad`` (``zero_grad`` of a
wrapping module, a skipped step setting them to None) detaches its view: :meth:`GradientBuffer.collect_`,
run before every optimizer step, copies such gradients back into the buffer and attaches the views again.
The same holds for values whose ``.data`` was replaced after they were shared (DDP's start-up broadcast
does it): their current values are copied in and the views attached again; one moved to another device
or cast is refused there, as the optimizer would step a copy the model no longer reads.
"""

from __future__ import annotations

import torch


class GradientBuffer:
    """``params``' gradients as views of one zero-initialised flat buffer (all on one device, of one dtype)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = list(params)
        first = self.params[0]
        self.flat = torch.zeros(sum(self.sizes()), dtype=first.dtype, device=first.device)
        self.views = [piece.view_as(param) for piece, param in zip(self.flat.split(self.sizes()), self.params)]
        self.values: torch.nn.Parameter | None = None  # see share_values
        self.value_views: list[torch.Tensor] = []
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

    def share_values(self) -> torch.nn.Parameter:
        """One parameter holding every value of ``params`` (each one's ``.data`` becomes its view), whose
        ``.grad`` is the gradient buffer: for an elementwise optimizer, which then steps all of them at once."""
        values = torch.cat([param.detach().reshape(-1) for param in self.params])
        self.value_views = [piece.view_as(param) for piece, param in zip(values.split(self.sizes()), self.params)]
        for param, view in zip(self.params, self.value_views):
            param.data = view
        self.values = torch.nn.Parameter(values, requires_grad=False)  # the same storage: not a copy
        self.values.grad = self.flat
        return self.values

    def sizes(self) -> list[int]:
        return [param.numel() for param in self.params]

    def attach(self) -> None:
        for param, view in zip(self.params, self.views):
            param.grad = view
        if self.values is not None:
            self.values.grad = self.flat

    def attached(self) -> bool:
        """Whether every parameter's ``.grad`` is still its view (nothing replaced one since :meth:`zero_`)."""
        flat_attached = self.values is None or self.values.grad is self.flat
        return flat_attached and all(param.grad is view for param, view in zip(self.params, self.views))

    def detach(self) -> None:
        """No gradients at all (a skipped step): an optimizer then changes no weight and no moment."""
        for param in self.params:
            param.grad = None
        if self.values is not None:
            self.values.grad = None

    def collect_(self) -> None:
        """Before an optimizer step: bring gradients that replaced their views (a wrapper's ``zero_grad`` set them
        to None, backward then made new ones), and values that replaced theirs (DDP's start-up broadcast gives
        every parameter new storage), back into the buffers, and attach the views again."""
        if self.values is not None:
            self.collect_values_()
        if self.attached():
            return
        for param, view in zip(self.params, self.views):
            if param.grad is not view:
                view.copy_(param.grad) if param.grad is not None else view.zero_()
        self.attach()

    def collect_values_(self) -> None:
        for param, view in zip(self.params, self.value_views):
            if param.data_ptr() == view.data_ptr():
                continue
            if param.dtype != view.dtype or param.device != view.device:
                raise RuntimeError(
                    f"a trainable parameter was moved or cast to {param.device}/{param.dtype} after the optimizer was "
                    f"built over its values ({view.device}/{view.dtype}), so the optimizer would step a copy the "
                    "model no longer reads: place and cast the model before training starts, or build the "
                    "PolicyModel with contiguous_gradients=False")
            view.copy_(param.detach())
            param.data = view

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


def flat_optimizer_state(state_dict: dict, sizes: list[int]) -> dict:
    """An optimizer state dict over one tensor per parameter (sizes ``sizes``, in the buffer's order: what a
    checkpoint of a per-tensor optimizer holds) as the state of one flat parameter in the same group (the others
    kept, empty): each per-parameter tensor (AdamW's moments, SGD's momentum) concatenated, scalars (``step``)
    kept where every parameter agrees. A state dict that already holds one parameter is returned as it is."""
    ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    if len(ids) == 1:
        return state_dict
    holding = [group for group in state_dict["param_groups"] if group["params"]]
    if len(ids) != len(sizes) or len(holding) != 1:
        raise ValueError(f"the checkpoint's optimizer holds {len(ids)} parameters in {len(holding)} groups, not the "
                         f"{len(sizes)} trainable tensors of this model in one group: resume with the settings it "
                         "was saved with (lora_rank, lora_target_modules, optim, weight_decay)")
    states = [state_dict["state"].get(i, {}) for i in ids]
    if any(state.keys() != states[0].keys() for state in states):
        raise ValueError("the checkpoint's optimizer has state for some trainable tensors and not others, so it "
                         "cannot be merged into one flat parameter: resume from another checkpoint")
    merged = {key: flat_state_entry(key, [state[key] for state in states], sizes) for key in states[0]}
    groups = [{**group, "params": [0] if group["params"] else []} for group in state_dict["param_groups"]]
    return {"state": {0: merged} if merged else {}, "param_groups": groups}


def flat_state_entry(key: str, values: list, sizes: list[int]):
    """One state entry of every parameter as the flat parameter's: tensors of each one's size concatenated, a
    value every parameter shares kept."""
    if all(torch.is_tensor(v) and v.dim() > 0 and v.numel() == n for v, n in zip(values, sizes)):  # not `step`
        return torch.cat([v.reshape(-1) for v in values])
    if all(torch.equal(torch.as_tensor(v), torch.as_tensor(values[0])) for v in values):
        return values[0]
    raise ValueError(f"the checkpoint's optimizer state {key!r} differs between trainable tensors: it cannot be "
                     "merged into one flat parameter")
