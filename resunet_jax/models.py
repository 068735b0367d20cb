"""The seed ResUNet (Buda-style brain-MRI ResUNet, from the original Keras model).

Layer for layer the Keras model: with the default widths it has 1,206,129 trainable
parameters and 4,384 BatchNorm statistics, like the PyTorch copy of the seed model
used as the speed yardstick (benchmarks/README.md).
Images are NHWC. The network returns logits; the sigmoid lives in the losses and in
inference so that the loss is computed stably in float32.

Detection: the seed detected tumour slices with a separate ResNet-50. Here an optional
head on the bottleneck (global average and max pooling -> Dense(1)) gives each slice a
tumour logit, trained jointly. Without the head the slice's tumour logit is its
largest pixel logit, so "tumour" means "the predicted mask is not empty".
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

# Keras BatchNormalization defaults of the seed model (momentum 0.99, epsilon 1e-3).
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


def batch_norm(train: bool, dtype, axis_name: str | None, name: str) -> nn.BatchNorm:
    """Seed BatchNorm; in training, batch statistics are averaged over `axis_name`."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        axis_name=axis_name if train else None,
        name=name,
    )


def upsample2x(x):
    """Nearest-neighbour upsampling [B, H, W, C] -> [B, 2H, 2W, C] (Keras UpSampling2D)."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


class UpsampledConcatConv(nn.Module):
    """`nn.Conv(features, (1, 1))` of concat([upsample2x(low), skip]), without either.

    A 1x1 convolution commutes with nearest upsampling, so the low-resolution part is
    convolved at a quarter of the pixels and then upsampled, and the concatenation
    (a copy of both inputs) is never built. Same parameters as the `nn.Conv` it
    replaces (kernel [1, 1, C + C', features], bias), so checkpoints are unchanged.

    Attributes:
        features: output channels f.
        dtype: computation dtype (parameters stay float32).
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, low, skip):
        """Maps low [B, H, W, C] and skip [B, 2H, 2W, C'] to [B, 2H, 2W, features]."""
        c = low.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (1, 1, c + skip.shape[-1], self.features)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        low, skip, kernel, bias = promote_dtype(low, skip, kernel, bias, dtype=self.dtype)

        def conv(x, k):
            return jax.lax.conv_general_dilated(
                x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )

        return upsample2x(conv(low, kernel[:, :, :c])) + conv(skip, kernel[:, :, c:]) + bias


class ResBlock(nn.Module):
    """Residual block: ReLU(BN(Conv3x3(ReLU(BN(Conv1x1(x))))) + BN(Conv1x1(x))).

    Attributes:
        features: output channels f.
        dtype: computation dtype (parameters stay float32).
        axis_name: pmap axis over which training BatchNorm statistics are averaged.
    """

    features: int
    dtype: Any = jnp.float32
    axis_name: str | None = "batch"

    @nn.compact
    def __call__(self, x, train: bool, skip=None):
        """Maps [B, H, W, C] to [B, H, W, features].

        With `skip` [B, 2H, 2W, C'] (a decoder block), the block's input is
        concat([upsample2x(x), skip]) and its output [B, 2H, 2W, features].
        """
        conv = functools.partial(nn.Conv, self.features, dtype=self.dtype)
        norm = functools.partial(batch_norm, train, self.dtype, self.axis_name)

        def conv1x1(name):
            if skip is None:
                return conv((1, 1), name=name)(x)
            return UpsampledConcatConv(self.features, self.dtype, name=name)(x, skip)

        h = nn.relu(norm("bn_in")(conv1x1("conv_in")))
        h = conv((3, 3), name="conv_mid")(h)
        h = norm("bn_mid")(h)
        shortcut = norm("bn_shortcut")(conv1x1("conv_shortcut"))
        return nn.relu(h + shortcut)


class ResUNet(nn.Module):
    """Seed ResUNet: stem, three pooled ResBlocks, bottleneck, four decoder ResBlocks.

    Attributes:
        stem_features: channels of the two stem convolutions (skip 0).
        features: encoder ResBlock widths, shallow to deep; the decoder mirrors them.
        bottleneck_features: width of the bottleneck ResBlock.
        dtype: computation dtype, e.g. jnp.bfloat16 for mixed precision; parameters,
            BatchNorm statistics and the returned logits stay float32.
        axis_name: pmap axis over which training BatchNorm statistics are averaged, so
            that replicas normalise like one global batch; None outside pmap.
        detection_head: add the slice-level tumour classifier on the bottleneck.
        deep_supervision: k > 0 adds a 1x1 logit head to each of the k decoder blocks
            before the last (nnU-Net's deep supervision), at 1/2, ..., 1/2**k of the
            input side; training adds their losses (see `train.train_step`).
        concat_skips: build each decoder block's input as the concatenation of the
            upsampled map and the skip, as the seed does, instead of
            `UpsampledConcatConv`'s split: the same function and parameters. XLA runs
            the split faster (no concatenation, 1x1 convolutions at a quarter of the
            pixels); ONNX Runtime runs the concatenation faster (it folds each BatchNorm
            into the convolution before it, which the split's sum prevents), so
            `export` traces that form.
    """

    stem_features: int = 16
    features: Sequence[int] = (32, 64, 128)
    bottleneck_features: int = 256
    dtype: Any = jnp.float32
    axis_name: str | None = "batch"
    detection_head: bool = False
    deep_supervision: int = 0
    concat_skips: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        """Segments a batch of slices and scores each for tumour.

        Args:
            x: [B, H, W, C] normalised images; H and W divisible by 2**(len(features)+1).
            train: use batch statistics (synced over the 'batch' axis) and update them.

        Returns:
            {"mask": [B, H, W, 1] float32 pixel logits, "tumor": [B] float32 slice logits};
            with deep supervision also "aux_masks": k logit maps, [B, H/2, W/2, 1], ...,
            [B, H/2**k, W/2**k, 1].
        """
        depth = len(self.features) + 1
        if not 0 <= self.deep_supervision < depth:
            raise ValueError(f"deep_supervision must be in [0, {depth - 1}]")
        if x.shape[1] % 2**depth or x.shape[2] % 2**depth:
            raise ValueError(f"image side {x.shape[1:3]} must be divisible by {2**depth}")
        x = x.astype(self.dtype)
        norm = functools.partial(batch_norm, train, self.dtype, self.axis_name)
        # The seed stem applies ReLU before BatchNorm (Conv+ReLU -> BN), unlike ResBlocks.
        x = nn.relu(nn.Conv(self.stem_features, (3, 3), dtype=self.dtype, name="stem_conv1")(x))
        x = norm("stem_bn1")(x)
        x = nn.relu(nn.Conv(self.stem_features, (3, 3), dtype=self.dtype, name="stem_conv2")(x))
        x = norm("stem_bn2")(x)
        skips = [x]
        x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        for i, f in enumerate(self.features):
            x = ResBlock(f, self.dtype, self.axis_name, name=f"encoder{i}")(x, train)
            skips.append(x)
            x = nn.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = ResBlock(self.bottleneck_features, self.dtype, self.axis_name, name="bottleneck")(
            x, train
        )
        if self.detection_head:
            pooled = jnp.concatenate([jnp.mean(x, axis=(1, 2)), jnp.max(x, axis=(1, 2))], -1)
            tumor = nn.Dense(1, dtype=self.dtype, name="detection_head")(pooled)[:, 0]
        decoder_features = tuple(reversed(self.features)) + (self.stem_features,)
        aux_masks = []
        for i, (f, skip) in enumerate(zip(decoder_features, reversed(skips), strict=True)):
            block = ResBlock(f, self.dtype, self.axis_name, name=f"decoder{i}")
            if self.concat_skips:
                x = block(jnp.concatenate([upsample2x(x), skip], axis=-1), train)
            else:
                x = block(x, train, skip)
            level = depth - 1 - i  # this block's output is 1/2**level of the input side
            if 0 < level <= self.deep_supervision:
                aux = nn.Conv(1, (1, 1), dtype=self.dtype, name=f"aux_head{level}")(x)
                aux_masks.insert(0, aux.astype(jnp.float32))
        logits = nn.Conv(1, (1, 1), dtype=self.dtype, name="head")(x).astype(jnp.float32)
        if not self.detection_head:
            tumor = jnp.max(logits, axis=(1, 2, 3))
        outputs = {"mask": logits, "tumor": tumor.astype(jnp.float32)}
        if aux_masks:
            outputs["aux_masks"] = aux_masks
        return outputs


def lacks_pre_contrast(x):
    """Which slices have a FLAIR copy for their pre-contrast (the sequence not acquired).

    The LGG data fill a sequence that was not acquired with the FLAIR, and
    `--mode=predict` replicates a one-channel (FLAIR-only) scan to three channels, so a
    missing pre-contrast is a channel equal to the FLAIR. Any normalisation keeps them
    equal (a copied channel's statistics are the FLAIR's).

    Written with the arrays' own methods: the model routes jax arrays, and a host
    backend routes its numpy batch in numpy (a third of the time it took through jax).

    Args:
        x: [B, H, W, 3n] images, n slices of (pre-contrast, FLAIR, post-contrast).

    Returns:
        [B] bool: every slice's pre-contrast equals its FLAIR, to 1e-3 of its scale.
    """
    slices = x.reshape(x.shape[:3] + (x.shape[3] // 3, 3)).astype(np.float32)
    pre, flair = slices[..., 0], slices[..., 1]
    return (abs(pre - flair) <= 1e-3 * (1.0 + abs(flair))).all(axis=(1, 2, 3))


class NoContrastRouted(nn.Module):
    """Two ResUNets: one for complete slices, one for slices without the pre-contrast.

    A model trained on complete scans needs the pre-contrast, and one trained to do
    without it is weaker on complete scans (docs/experiments.md). Routing each slice by
    `lacks_pre_contrast` keeps the best of both. Both networks run on every slice; the
    model is assembled from two trained ones (`checkpointing.join_no_contrast_expert`),
    not trained as one.

    Attributes:
        complete: the model for slices with their pre-contrast.
        no_contrast: the model for slices whose pre-contrast is a FLAIR copy.
    """

    complete: nn.Module
    no_contrast: nn.Module

    def __call__(self, x, train: bool = False):
        """Maps [B, H, W, C] images to the outputs of the model each slice is routed to."""
        if train:
            raise ValueError(
                "NoContrastRouted joins two trained models for evaluation and prediction "
                "(checkpointing.join_no_contrast_expert); train each on its own"
            )
        routed = lacks_pre_contrast(x)
        complete, no_contrast = self.complete(x), self.no_contrast(x)

        def select(a, b):
            return jnp.where(routed.reshape((-1,) + (1,) * (a.ndim - 1)), b, a)

        return jax.tree.map(select, complete, no_contrast)


def input_channels(data_config) -> int:
    """Channels of the model input: three (FLAIR, pre- and post-contrast) per slice, and
    per context slice (`data.context_slices` on either side)."""
    return 3 * (2 * data_config.get("context_slices", 0) + 1)


def create_model(
    model_config, axis_name: str | None = "batch", concat_skips: bool = False
) -> nn.Module:
    """Builds the ResUNet from `config.model` (an ml_collections.ConfigDict or dict);
    with `no_contrast_expert`, two of them routed by `NoContrastRouted`. `concat_skips`:
    see `ResUNet`."""

    def resunet():
        return ResUNet(
            axis_name=axis_name,
            stem_features=model_config["stem_features"],
            features=tuple(model_config["features"]),
            bottleneck_features=model_config["bottleneck_features"],
            dtype=jnp.dtype(model_config["dtype"]),
            detection_head=model_config.get("detection_head", False),
            deep_supervision=model_config.get("deep_supervision", 0),
            concat_skips=concat_skips,
        )

    if model_config.get("no_contrast_expert", False):
        return NoContrastRouted(complete=resunet(), no_contrast=resunet())
    return resunet()
