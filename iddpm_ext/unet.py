"""The UNet of improved-diffusion: the same module tree, parameter names and outputs.

A checkpoint saved from openai/improved-diffusion's ``UNetModel`` loads here with
``strict=True`` and gives the same outputs. Mixed precision is meant to be done with
``torch.autocast`` (parameters stay fp32); ``convert_to_fp16`` is kept for the
reference's API. Attention goes through :func:`iddpm_ext.ops.attention.qkv_attention`, so
``iddpm_ext.ops.attention.attention_impl(...)`` selects the fused kernel or the einsum path.

Shapes: x: [N, C, *spatial] with 1, 2 or 3 spatial dims (``dims``); for dims=3 only the
last two spatial dims are down/upsampled.

Fast paths (each switchable off; docs/unet.md has the measurements):
- :meth:`UNetModel.to_inference` — eval mode, every parameter in one dtype (e.g. bf16: no
  per-call casts of autocast) and, for 2-D models, the channels-last memory format end to end
  (oneDNN's NHWC convolutions on the CPU). Inputs and outputs keep their dtype and layout.
- GroupNorm (+ the ResBlock's scale-shift + SiLU) fused into one op, iddpm::group_norm_act, and
  GroupNorm of bf16/fp16 activations without fp32 copies (:func:`iddpm_ext.nn.set_groupnorm_impl`).
- fused attention (:func:`iddpm_ext.ops.attention.set_attention_impl`).
"""

from __future__ import annotations

import math
import os
from abc import abstractmethod

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ArgumentError
from .nn import (
    SiLU,
    avg_pool_nd,
    canonical_channels_last,
    channels_innermost,
    checkpoint,
    clear_conv_prepack,
    conv1x1_channels_innermost,
    conv_add,
    conv_nd,
    default_conv_prepack,
    linear,
    norm_act,
    normalization,
    set_conv_prepack,
    timestep_embedding,
    use_fused_groupnorm,
    zero_module,
)
from .ops.attention import qkv_attention

__all__ = [
    "AttentionBlock",
    "Downsample",
    "QKVAttention",
    "ResBlock",
    "SuperResModel",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "UNetModel",
    "Upsample",
    "convert_module_to_f16",
    "convert_module_to_f32",
    "default_channels_last",
    "set_channels_last_attention",
]


def default_channels_last(device) -> bool:
    """Whether :meth:`UNetModel.to_inference` picks channels-last by default on ``device``.

    IDDPM_CHANNELS_LAST=1/0 forces it on/off; otherwise on for the CPU (oneDNN's NHWC convolutions
    were faster there, docs/unet.md) and off elsewhere (not measured on a GPU yet).
    """
    value = os.environ.get("IDDPM_CHANNELS_LAST", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    if value:
        raise ValueError(f"IDDPM_CHANNELS_LAST: expected 1 or 0 (or unset), got {value!r}")
    return torch.device(device).type == "cpu"


# The attention block's channels-last branch (AttentionBlock._forward): on by default.
_CHANNELS_LAST_ATTENTION = True


def set_channels_last_attention(enabled: bool) -> bool:
    """Let AttentionBlock keep channels-last activations channels-last (True, the default: its
    qkv comes out [N, T, 3C] in memory and its output stays channels-last) or flatten them
    through contiguous [N, C, T] tensors as before (False). Returns the previous setting."""
    global _CHANNELS_LAST_ATTENTION
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled: expected True or False, got {enabled!r}")
    previous, _CHANNELS_LAST_ATTENTION = _CHANNELS_LAST_ATTENTION, enabled
    return previous


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(module: nn.Module):
    """Cast a convolution's parameters to float16 (other modules are left alone)."""
    if isinstance(module, _CONVS):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module: nn.Module):
    """Undo :func:`convert_module_to_f16`."""
    if isinstance(module, _CONVS):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to ``x`` given the embeddings ``emb``: [N, emb_channels]."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A Sequential that hands ``emb`` to the children that are TimestepBlocks."""

    def forward(self, x, emb):
        batched = isinstance(emb, _BatchedEmb)
        for layer in self:
            if not isinstance(layer, TimestepBlock):
                x = layer(x)
            elif not batched:
                x = layer(x, emb)
            elif isinstance(layer, ResBlock) and id(layer) in emb.outs:
                x = layer(x, emb.emb, emb_out=emb.outs[id(layer)])
            else:
                x = layer(x, emb.emb)
        return x


class _BatchedEmb:
    """The timestep embedding ``emb`` together with every ResBlock's ``emb_layers(emb)``,
    computed in one GEMM by :meth:`UNetModel._batched_emb` (keyed by ``id`` of the block).
    TimestepEmbedSequential hands each ResBlock its slice and every other block ``emb``."""

    __slots__ = ("emb", "outs")

    def __init__(self, emb, outs):
        self.emb = emb
        self.outs = outs


def _autocast_dtype(device_type: str):
    """The dtype autocast lowers matmuls to on ``device_type``, or None when it is off there."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _mkldnn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _emb_gemm_weights(weight, bias):
    """(weight, bias, packed) of the batched time-embedding GEMM: on the CPU in fp32, or bf16 where
    oneDNN runs it, also the weight packed for oneDNN's linear (``mkldnn::_linear_pointwise``, the
    op torch's inductor uses after freezing), else None. At the model's shapes (M = the batch, a
    few rows; N ~ 14k outputs) torch's F.linear runs far from memory speed: CIFAR-10 model, B = 2,
    AMD EPYC, 1 thread: fp32 10.3 ms vs 1.0 ms packed, bf16 1.67 vs 0.49 ms."""
    packed = None
    if (
        weight.device.type == "cpu"
        and _mkldnn_linear_available()
        and (
            weight.dtype == torch.float32
            or (weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        )
    ):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 2)
    return weight, bias, packed


class _EmbGemmCache:
    """The ResBlocks' time-embedding projections concatenated into one weight and bias (rebuilt
    when any of them changes: address + version counter, as the prepacked convs). Not part of
    the state_dict; copies and pickles start empty."""

    def __init__(self):
        self.clear()

    def clear(self):
        self.key = None
        self.blocks = None  # the ResBlocks, in order
        self.weight = self.bias = self.sizes = self.sources = None
        self.cast = {}  # compute dtype -> (weight, bias, packed weight or None), once per weight

    def __deepcopy__(self, memo):
        return _EmbGemmCache()

    def __reduce__(self):
        return (_EmbGemmCache, ())


class Upsample(nn.Module):
    """Nearest-neighbour ×2 upsampling, then a 3×3 convolution when ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, channels, 3, padding=1)

    def forward(self, x):  # x: [N, C, ...] -> [N, C, ...×2]
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """×2 downsampling by a stride-2 3×3 convolution (``use_conv``) or average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, channels, channels, 3, stride=stride, padding=1)
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):  # x: [N, C, ...] -> [N, C, .../2]
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding.

    h = conv(SiLU(GN(x))); then either h + W·emb (default) or, with
    ``use_scale_shift_norm``, GN(h)·(1 + scale) + shift with [scale, shift] = W·emb;
    then SiLU, dropout and a zero-initialised conv; the skip path is the identity, a 3×3
    conv (``use_conv``) or a 1×1 conv when the channel count changes.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        out_ch = self.out_channels

        self.in_layers = nn.Sequential(
            normalization(channels), SiLU(), conv_nd(dims, channels, out_ch, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            SiLU(), linear(emb_channels, 2 * out_ch if use_scale_shift_norm else out_ch)
        )
        self.out_layers = nn.Sequential(
            normalization(out_ch),
            SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, out_ch, out_ch, 3, padding=1)),
        )
        if out_ch == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, out_ch, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, out_ch, 1)

    def forward(self, x, emb, emb_out=None):  # x: [N, C, ...], emb: [N, E] -> [N, out_channels, ...]
        """``emb_out``: ``emb_layers(emb)`` when already computed (the model's batched GEMM)."""
        return checkpoint(self._forward, (x, emb, emb_out), None, self.use_checkpoint)

    def _forward(self, x, emb, emb_out=None):
        if use_fused_groupnorm(x):  # norm → SiLU in one op; then the conv
            h = self.in_layers[2](norm_act(self.in_layers[0], x))
        else:
            h = self.in_layers(x)
        if emb_out is None:
            emb_out = self.emb_layers(emb)
        emb_out = emb_out.to(h.dtype)  # [N, C'] or [N, 2C']
        if use_fused_groupnorm(h):  # norm → (scale-shift →) SiLU in one op; then dropout, conv
            if self.use_scale_shift_norm:
                scale, shift = torch.chunk(emb_out, 2, dim=1)  # [N, C'] each
                h = norm_act(self.out_layers[0], h, scale, shift)
            else:
                h = norm_act(self.out_layers[0], h + emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - 2))))
            # skip + conv(dropout(h)): with prepacking the add is the packed conv's post-op.
            return conv_add(self.out_layers[3], self.out_layers[2](h), self.skip_connection(x))
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - 2)))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttention(nn.Module):
    """Multi-head QKV attention, [N, 3·H·C, T] -> [N, H·C, T] (no parameters).

    Unlike the reference's module (which receives [N·H, 3C, T]), this one takes the head
    count and the un-split tensor, and calls :func:`iddpm_ext.ops.attention.qkv_attention`.
    """

    def __init__(self, num_heads: int = 1):
        super().__init__()
        self.num_heads = num_heads

    def forward(self, qkv):
        return qkv_attention(qkv, self.num_heads)

    @staticmethod
    def count_flops(model, _x, y):
        """A ``thop`` counter: two matmuls of N·T²·C multiply-adds each."""
        b, c, *spatial = y[0].shape
        num_spatial = int(np.prod(spatial))
        model.total_ops += torch.DoubleTensor([2 * b * (num_spatial**2) * c])


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a zero-initialised output projection."""

    def __init__(self, channels: int, num_heads: int = 1, use_checkpoint: bool = False):
        super().__init__()
        if num_heads < 1 or channels % num_heads != 0:
            raise ValueError(
                f"num_heads: expected a positive divisor of the block's {channels} channels, got {num_heads}"
            )
        self.channels = channels
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = QKVAttention(num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        return checkpoint(self._forward, (x,), None, self.use_checkpoint)

    def _forward(self, x):  # x: [N, C, *spatial]
        b, c, *spatial = x.shape
        t = math.prod(spatial)  # not -1: a batch of 0 images has no size to infer it from
        flat = x.reshape(b, c, t)  # [N, C, T]
        if _CHANNELS_LAST_ATTENTION and channels_innermost(flat):
            # Channels-last activations: the norm runs on x in its own layout, and the two 1×1
            # convs keep channels innermost, so qkv is [N, T, 3C] in memory (what "auto" hands to
            # SDPA without a copy) and the block's output stays channels-last for the next conv.
            # Same values as the branch below (the norm over [N, C, *spatial] is that over [N, C, T]).
            qkv = conv1x1_channels_innermost(self.qkv, self.norm(x).reshape(b, c, t))
            h = conv1x1_channels_innermost(self.proj_out, self.attention(qkv), flat)
            return canonical_channels_last(h.reshape(b, c, *spatial))  # N = 1: see its doc
        qkv = self.qkv(self.norm(flat))  # [N, 3C, T], per head h: q|k|v at [3hC/H, 3(h+1)C/H)
        h = conv_add(self.proj_out, self.attention(qkv), flat)  # x + proj_out(attention): [N, C, T]
        return h.reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """The UNet with timestep embedding and attention of improved-diffusion.

    :param in_channels: channels of the input.
    :param model_channels: base channel count (multiplied by ``channel_mult`` per level).
    :param out_channels: channels of the output (2× the image channels when learning σ).
    :param num_res_blocks: residual blocks per level on the way down (one more going up).
    :param attention_resolutions: downsample rates (1, 2, 4, …) at which attention is used.
    :param dropout: dropout probability inside the residual blocks.
    :param channel_mult: channel multiplier of each level; len(channel_mult) - 1 downsamplings.
    :param conv_resample: learned convolutions for down/upsampling (else pooling / plain).
    :param dims: 1, 2 or 3 spatial dimensions.
    :param num_classes: make the model class-conditional with this many classes.
    :param use_checkpoint: activation checkpointing in every ResBlock and AttentionBlock.
    :param num_heads: attention heads on the way down and in the middle.
    :param num_heads_upsample: heads on the way up (-1: same as ``num_heads``).
    :param use_scale_shift_norm: FiLM-like conditioning of the ResBlocks.
    """

    def __init__(
        self,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        num_heads=1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        channel_mult = tuple(int(m) for m in channel_mult)
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult: expected positive integers, got {channel_mult!r}")
        if dims not in (1, 2, 3):
            raise ValueError(f"dims: expected 1, 2 or 3, got {dims!r}")
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"num_classes: expected a positive int or None, got {num_classes!r}")

        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.dims = dims
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_heads_upsample = num_heads_upsample
        # Set by to_inference: run the torso in the channels-last memory format (2-D only).
        self.channels_last = False
        self.batch_emb = False  # to_inference turns it on (UNetModel._batched_emb)
        self._emb_gemm = _EmbGemmCache()

        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, emb_dim), SiLU(), linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res_block(ch_in, ch_out):
            return ResBlock(
                ch_in,
                emb_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
            )

        def attention(ch, heads):
            return AttentionBlock(ch, num_heads=heads, use_checkpoint=use_checkpoint)

        # Down: input_blocks[0] is the stem conv; then per level num_res_blocks
        # [ResBlock (+ AttentionBlock)] and, except at the last level, a Downsample.
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        skip_chans = [model_channels]  # channels of each input block's output
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample, dims=dims)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), attention(ch, num_heads), res_block(ch, ch)
        )

        # Up: per level (deepest first) num_res_blocks + 1 blocks, each taking the
        # concatenation with one skip; the last block of each level but the top upsamples.
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample, dims=dims))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )

    # -- precision -------------------------------------------------------------------
    def convert_to_fp16(self):
        """Cast the convolutions of the torso (input, middle, output blocks) to float16.

        Kept for the reference's API; prefer ``torch.autocast`` with fp32 parameters.
        """
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f16)

    def convert_to_fp32(self):
        """Undo :meth:`convert_to_fp16`."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to_f32)

    def to_inference(
        self,
        dtype: torch.dtype | None = None,
        channels_last: bool | None = None,
        prepack: bool | str | None = None,
        batch_emb: bool | None = None,
    ):
        """Switch to the inference fast paths, in place; returns the model.

        Puts the model in eval mode; with ``dtype`` casts every parameter and buffer to it
        (``torch.bfloat16``: activations stay bf16 from the stem to the output conv, with no
        autocast casts per call; GroupNorm still normalises in fp32); with ``channels_last``
        (default: :func:`default_channels_last` of the parameters' device for 2-D models, off for
        1-D and 3-D ones, which have no such format: True is an error there) stores the
        convolution weights channels-last and runs the torso in that format; with
        ``prepack`` (True: fp32 and bf16 calls, "bf16": bf16 calls only, False: off; default
        :func:`iddpm_ext.nn.default_conv_prepack`: "bf16" on the CPU) the 1-D/2-D convolutions
        keep oneDNN-packed copies of their weights for no-grad CPU calls
        (:func:`iddpm_ext.nn.set_conv_prepack`; with prepack True or "bf16" no-grad fp32 3×3 convs,
        and bf16 ones on CPUs without AMX, run as Winograd convs by default,
        :func:`iddpm_ext.nn.set_conv_winograd`, so the CPU fp32 default is affected too: ~1e-7 from
        torch's conv by F(2×2, 3×3), ~1e-6 by F(4×4, 3×3), which the larger maps take,
        :func:`iddpm_ext.nn.set_conv_winograd_tile`; cached transformed weights; bf16: ~2× a
        direct bf16 conv's error); with ``batch_emb``
        no-grad calls compute every ResBlock's time-embedding projection in one GEMM
        (:meth:`_batched_emb`; True: on every device, False: off, None (default): CPU calls only,
        as it has not run on a GPU yet). ``forward`` still takes and returns NCHW tensors of the
        caller's dtype. State-dict keys are unchanged;
        ``to_inference(torch.float32, channels_last=False, prepack=False, batch_emb=False)`` undoes it.
        Every argument is checked before anything changes: a refused call leaves the model as it was.
        """
        if batch_emb is not None and not isinstance(batch_emb, bool):
            raise ValueError(f"batch_emb: expected True, False or None, got {batch_emb!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
        device = next(self.parameters()).device
        if channels_last is None:  # the device's default; 1-D and 3-D models have no such format
            channels_last = default_channels_last(device) and self.dims == 2
        else:
            self._check_channels_last(channels_last)
        if prepack is None:
            prepack = default_conv_prepack(device)
        if prepack not in (True, False, "bf16") or not isinstance(prepack, (bool, str)):
            raise ValueError(f"prepack: expected True, False, 'bf16' or None, got {prepack!r}")
        if dtype is not None:  # after every check: a refused call leaves the model as it was
            self.to(dtype)
        self.set_channels_last(bool(channels_last))
        self.batch_emb = "cpu" if batch_emb is None else batch_emb
        self._emb_gemm.clear()
        set_conv_prepack(self, prepack)
        return self.eval()

    def _check_channels_last(self, enabled):
        if enabled and self.dims != 2:
            raise ValueError(f"channels_last: only 2-D models have a channels-last format, dims={self.dims}")

    def set_channels_last(self, enabled: bool = True):
        """Run the torso channels-last (NHWC), in place, for training as for inference: the conv
        weights are stored channels-last and activations converted once after the stem conv
        (``forward`` still takes and returns the caller's layout). 2-D models only; returns the
        model. :meth:`to_inference` calls it; ``iddpm train --channels_last True`` too."""
        if not isinstance(enabled, bool):
            raise ValueError(f"channels_last: expected True or False, got {enabled!r}")
        self._check_channels_last(enabled)
        fmt = torch.channels_last if enabled else torch.contiguous_format
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)
        self.channels_last = enabled
        return self

    def train(self, mode: bool = True):
        """As ``nn.Module.train``; entering training mode also frees prepacked conv weights
        (prepacking stays on and repacks on the next no-grad CPU call), and the batched
        time-embedding weights."""
        if mode:
            clear_conv_prepack(self)
            if "_emb_gemm" in self.__dict__:
                self._emb_gemm.clear()
        return super().train(mode)

    @property
    def inner_dtype(self) -> torch.dtype:
        """The dtype of the torso's parameters (float16 after :meth:`convert_to_fp16`)."""
        return next(self.input_blocks.parameters()).dtype

    # -- forward ---------------------------------------------------------------------
    def _check_inputs(self, x, timesteps, y):
        """Validate the inputs; returns timesteps as [N] (a scalar or [1] is broadcast)."""
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ArgumentError(
                f"x: expected [N, {self.in_channels}, {', '.join(['...'] * self.dims)}] "
                f"(dims={self.dims}), got shape {tuple(x.shape)}"
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        resampled = x.shape[2:] if self.dims != 3 else x.shape[3:]
        if any(s % factor for s in resampled):
            raise ArgumentError(
                f"x: spatial size {tuple(x.shape[2:])} must be divisible by {factor} "
                f"({len(self.channel_mult) - 1} downsamplings)"
            )
        n = x.shape[0]
        if not isinstance(timesteps, torch.Tensor):
            raise ArgumentError(f"timesteps: expected a tensor [N], got {type(timesteps).__name__}")
        if timesteps.dim() == 0 or tuple(timesteps.shape) == (1,):
            timesteps = timesteps.reshape(1).expand(n)
        if tuple(timesteps.shape) != (n,):
            raise ArgumentError(f"timesteps: expected shape ({n},), got {tuple(timesteps.shape)}")
        if (y is not None) != (self.num_classes is not None):
            raise ArgumentError(
                "y: must be given if and only if the model is class-conditional "
                f"(num_classes={self.num_classes}), got {'a tensor' if y is not None else 'None'}"
            )
        if y is not None and tuple(y.shape) != (n,):
            raise ArgumentError(f"y: expected class labels of shape ({n},), got {tuple(y.shape)}")
        return timesteps

    def _embed(self, timesteps, y):  # -> emb: [N, 4·model_channels]
        t_emb = timestep_embedding(timesteps, self.model_channels)  # fp32
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))  # model.to(dtype) works
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x, timesteps, y=None):
        """x: [N, in_channels, ...], timesteps: [N], y: [N] labels -> [N, out_channels, ...]."""
        timesteps = self._check_inputs(x, timesteps, y)
        emb = self._batched_emb(self._embed(timesteps, y))
        hs = []
        h = self._torso_input(x)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self._head(h, x)

    def _batched_emb(self, emb):
        """With ``batch_emb`` on (:meth:`to_inference`) and no gradient recorded: ``emb`` and every
        ResBlock's ``emb_layers(emb)`` (SiLU → Linear, the same input for all) from one SiLU and
        one GEMM over the concatenated weights, instead of one small GEMM per block (each a
        weight read and a call; ~5% of a bf16 CPU forward of the CIFAR-10 model). Else ``emb``
        (also while torch.compile traces and during CUDA graph capture)."""
        mode = getattr(self, "batch_emb", False)  # True, False or "cpu" (to_inference's default)
        if not mode or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return emb
        if mode == "cpu" and emb.device.type != "cpu":
            return emb
        if emb.is_cuda and torch.cuda.is_current_stream_capturing():
            # A captured graph replays without this check: it reads the blocks' own weights, so
            # that later in-place updates (EMA) are seen, where the concatenated copy would not be.
            return emb
        cache = self._emb_gemm
        if cache.blocks is None:
            cache.blocks = [m for m in self.modules() if isinstance(m, ResBlock)]
        linears = []
        for block in cache.blocks:
            layers = block.emb_layers
            if not (
                len(layers) == 2
                and type(layers[0]) is nn.SiLU
                and type(layers[1]) is nn.Linear
                and layers[1].bias is not None
                and not (layers._forward_hooks or layers._forward_pre_hooks)
                and not (layers[1]._forward_hooks or layers[1]._forward_pre_hooks)
            ):
                return emb
            linears.append(layers[1])
        if not linears or len({(lin.weight.dtype, lin.weight.device) for lin in linears}) != 1:
            return emb
        key = tuple(
            (lin.weight.data_ptr(), lin.weight._version, lin.bias.data_ptr(), lin.bias._version)
            for lin in linears
        )
        if cache.key != key or cache.weight.dtype != linears[0].weight.dtype:
            cache.weight = torch.cat([lin.weight.detach() for lin in linears])
            cache.bias = torch.cat([lin.bias.detach() for lin in linears])
            cache.sizes = [lin.out_features for lin in linears]
            # The sources stay alive with the cache, so their addresses cannot be reused by new
            # weights while the key compares them.
            cache.sources = [(lin.weight.detach(), lin.bias.detach()) for lin in linears]
            cache.key = key
            cache.cast = {}
        act = F.silu(emb)
        low = _autocast_dtype(emb.device.type)
        dtype = low if low is not None and cache.weight.dtype == torch.float32 else cache.weight.dtype
        if dtype not in cache.cast:
            # Autocast would cast the concatenated weight (not a leaf: not in its cast cache) on
            # every call (~4% of a bf16 CPU forward of the CIFAR-10 model): cast once, kept here.
            cache.cast[dtype] = _emb_gemm_weights(cache.weight.to(dtype), cache.bias.to(dtype))
        weight, bias, packed = cache.cast[dtype]
        act = act.to(dtype) if dtype != cache.weight.dtype else act
        if (
            packed is not None
            and torch.backends.mkldnn.enabled
            and act.dtype == weight.dtype
            and act.dim() == 2
        ):
            out = torch.ops.mkldnn._linear_pointwise(act, packed, bias, "none", [], "")
        else:
            out = F.linear(act, weight, bias)
        outs = out.split(cache.sizes, dim=1)
        return _BatchedEmb(emb, {id(block): out for block, out in zip(cache.blocks, outs)})

    def _torso_input(self, x):
        h = x.to(self.inner_dtype)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        return h

    def _head(self, h, x):
        # The out layers run in x's dtype (autocast may lower it, as in the reference), unless the
        # whole model was cast (to_inference(dtype)): then in theirs, and the result goes back to x's.
        out_dtype = self.out[-1].weight.dtype
        if out_dtype == torch.float32:
            out_dtype = x.dtype
        h = h.to(out_dtype)
        if use_fused_groupnorm(h):  # norm → SiLU in one op; then the conv
            out = self.out[2](norm_act(self.out[0], h))
        else:
            out = self.out(h)
        if out_dtype != x.dtype:
            out = out.to(x.dtype)
        return self._layout_like(out, x)

    def _layout_like(self, h, x):  # after channels-last: back to the caller's layout
        if self.channels_last and h.dim() == 4:
            x_is_nhwc = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
            h = h.contiguous(memory_format=torch.channels_last if x_is_nhwc else torch.contiguous_format)
        return h

    def get_feature_vectors(self, x, timesteps, y=None):
        """The intermediate activations: {'down': [...], 'middle': tensor, 'up': [...]}."""
        timesteps = self._check_inputs(x, timesteps, y)
        emb = self._embed(timesteps, y)
        hs, result = [], {"down": [], "up": []}
        h = self._torso_input(x)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
            result["down"].append(self._layout_like(h.to(x.dtype), x))
        h = self.middle_block(h, emb)
        result["middle"] = self._layout_like(h.to(x.dtype), x)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
            result["up"].append(self._layout_like(h.to(x.dtype), x))
        return result


class SuperResModel(UNetModel):
    """A UNetModel conditioned on a low-resolution image (``low_res=``), which is
    bilinearly upsampled to x's size and concatenated to x along channels (2-D only)."""

    def __init__(self, in_channels, *args, **kwargs):
        super().__init__(in_channels * 2, *args, **kwargs)

    def _with_low_res(self, x, low_res):
        if low_res is None:
            raise ValueError("low_res: SuperResModel needs the low-resolution image, got None")
        if x.dim() != 4 or low_res.dim() != 4:
            raise ValueError(
                f"x, low_res: expected 4-D [N, C, H, W] tensors, got {tuple(x.shape)} "
                f"and {tuple(low_res.shape)}"
            )
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return torch.cat([x, upsampled], dim=1)

    def forward(self, x, timesteps, low_res=None, **kwargs):
        return super().forward(self._with_low_res(x, low_res), timesteps, **kwargs)

    def get_feature_vectors(self, x, timesteps, low_res=None, **kwargs):
        return super().get_feature_vectors(self._with_low_res(x, low_res), timesteps, **kwargs)
