"""
CPU-only speed machinery, opt-in behind one call: `cpu.layout(model)` (and `cpu.layout(model, on=False)` to
undo it). A GPU run never calls it and the models never mention it; sample.py calls it for CPU sampling,
train.py only under --cpu-layout true. It changes memory layouts and kernels, never parameters or
state-dict keys; outputs move by float32 rounding only (see the README for what each piece is worth).

- PackedConv2d: oneDNN re-lays out a conv weight into its blocked format at every call; for the deep levels
  of a U-Net (many channels, few pixels) that costs more than the convolution. A frozen weight that is
  large against its input is re-laid out once per input shape and kept (one more copy of the weight, two
  in training: forward, and backward to the input).
- channels-last weights: every activation after the first conv is then channels-last, so the spatial
  transformer's (B, C, H, W) <-> (B, HW, C) permutes are free views and small-channel convs run faster.
- BlockedFeedForward: the GEGLU activations of a 64x64 latent (40-80 MB) are above glibc's largest mmap
  threshold, so each is fresh memory whose pages fault in at every call; in row blocks they are reused.
"""
import torch
import torch.nn as nn

import unet

PACK_MIN_RATIO = 5  # pack where weight.numel() >= PACK_MIN_RATIO * input.numel(); below it packing loses
FF_ROWS = 1024  # feed-forward rows per block: (1024, 8 * 320) float32 = 10 MB, under glibc's mmap threshold


# -----------------------------------------------------------------------------
# prepacked frozen convolutions


def _packed_conv(x, conv, transposed=False):
    w, pad = conv.packed_weight(x.shape, transposed)
    x = x if x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()  # oneDNN takes both
    return torch.ops.mkldnn._convolution_pointwise(x, w, None if transposed else conv.bias, pad,
                                                   conv.stride, conv.dilation, conv.groups, "none", [], "")


def _grad_padding(conv):
    """Padding of the conv that gives a stride-1 conv's input gradient from its output gradient with the
    flipped, transposed weight: d * (k - 1) - p per side; None where that does not apply (strides, negative
    padding)."""
    pad = tuple(d * (k - 1) - p for k, p, d in zip(conv.kernel_size, conv.padding, conv.dilation))
    return pad if conv.stride == (1, 1) and min(pad) >= 0 else None


class _FrozenPackedConv(torch.autograd.Function):
    """conv2d with a frozen, prepacked weight. The gradient reaches the input only: for stride 1 it is the
    conv of the output gradient with the flipped, transposed weight, itself packed; other convs use the
    plain weight."""

    @staticmethod
    def forward(ctx, x, conv):
        ctx.conv, ctx.shape = conv, x.shape
        return _packed_conv(x, conv)

    @staticmethod
    def backward(ctx, grad):
        c = ctx.conv
        if _grad_padding(c) is not None:
            return _packed_conv(grad, c, transposed=True), None
        return torch.nn.grad.conv2d_input(ctx.shape, c.weight, grad, c.stride, c.padding, c.dilation,
                                          c.groups), None


class PackedConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state-dict keys) that, on a CPU in float32, hands oneDNN a weight
    reordered once per input shape when the weight is large against the input and does not train: sampling,
    and the frozen base of a LoRA layer. Anything else (another device or dtype, a weight that trains, a
    small weight) takes nn.Conv2d's path. The packed copy is rebuilt when the weight changes in place
    (a LoRA merge) or the input shape changes."""

    def packed_weight(self, shape, transposed=False):
        """(packed weight, padding) for an input of this shape; transposed: for the gradient of the input.
        One copy per direction is kept, for the last input shape."""
        version = (self.weight._version, self.weight.data_ptr())
        if getattr(self, "_packed_version", None) != version:  # new or changed weight: drop every copy
            self._packed, self._packed_version = {}, version
        shape = tuple(shape)
        if (self._packed.get(transposed) or (None,))[0] != shape:
            w, pad = self.weight.detach(), self.padding
            if transposed:  # grad_input = conv(grad, w^T flipped, _grad_padding)
                w, pad = w.transpose(0, 1).flip(2, 3).contiguous(), _grad_padding(self)
            self._packed[transposed] = None  # free the old copy before making the new one
            self._packed[transposed] = shape, torch.ops.mkldnn._reorder_convolution_weight(
                w, pad, self.stride, self.dilation, self.groups, list(shape)), pad
        return self._packed[transposed][1:]

    def forward(self, x):
        w, grad = self.weight, torch.is_grad_enabled()
        if (x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or x.dim() != 4
                or grad and (w.requires_grad or self.bias is not None and self.bias.requires_grad)
                or w.numel() < PACK_MIN_RATIO * x.numel()):
            return super().forward(x)
        return _FrozenPackedConv.apply(x, self) if grad and x.requires_grad else _packed_conv(x, self)


def can_pack():
    """oneDNN's prepacked convolution is in this torch build."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def pack_convs(model, on=True):
    """Turn every kxk (k > 1), ungrouped, zero-padded nn.Conv2d with at least 64 input channels into a
    PackedConv2d (on=False: back). Parameters and state dict are untouched."""
    if on and not can_pack():
        return model
    for m in model.modules():
        if (on and type(m) is nn.Conv2d and m.kernel_size != (1, 1) and m.groups == 1
                and m.padding_mode == "zeros" and not isinstance(m.padding, str) and m.in_channels >= 64):
            m.__class__ = PackedConv2d
        elif not on and type(m) is PackedConv2d:
            m.__class__ = nn.Conv2d
            m.__dict__.pop("_packed", None), m.__dict__.pop("_packed_version", None)
    return model


# -----------------------------------------------------------------------------
# the feed-forward in row blocks


class BlockedFeedForward(unet.FeedForward):
    """unet.FeedForward over blocks of FF_ROWS rows (its ops are row-wise: the same output)."""

    def forward(self, x):
        """x (B, N, dim) -> (B, N, dim_out)"""
        if x.shape[:-1].numel() <= FF_ROWS:
            return super().forward(x)
        rows = x.reshape(-1, x.shape[-1]).split(FF_ROWS)  # (FF_ROWS, dim) each
        return torch.cat([super(BlockedFeedForward, self).forward(r) for r in rows]).view(*x.shape[:-1], -1)


# -----------------------------------------------------------------------------
# the one call


def _contiguous_output(module, inputs, output):
    return output.contiguous() if torch.is_tensor(output) else output


def layout(model, on=True):
    """The CPU layout of a model (on=False: back to the standard one): prepacked frozen conv weights,
    channels-last 4-D weights (so channels-last activations), the feed-forward in row blocks, and a hook that
    hands back the model's output contiguous. State-dict tensors stay channels-last until layout(model,
    False)."""
    pack_convs(model, on)
    for m in model.modules():
        if on and type(m) is unet.FeedForward:
            m.__class__ = BlockedFeedForward
        elif not on and type(m) is BlockedFeedForward:
            m.__class__ = unet.FeedForward
    hook = model.__dict__.pop("_cpu_output_hook", None)
    if hook is not None:
        hook.remove()
    if on:
        model._cpu_output_hook = model.register_forward_hook(_contiguous_output)
    return model.to(memory_format=torch.channels_last if on else torch.contiguous_format)
