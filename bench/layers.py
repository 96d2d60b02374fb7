"""The benchmark layers (the table in README.md, "Benchmarks", and `python -m bench --list`)
and named suites of them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from dilconv._validate import make_spec

OPS = ("forward", "backward")
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Layer:
    """One convolution: input and weight shapes plus conv2d's arguments (as PyTorch takes
    them: ints or (h, w) pairs, symmetric padding)."""

    name: str
    input: tuple
    weight: tuple
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    what: str = ""

    def spec(self):
        return make_spec(self.input, self.weight, self.stride, self.padding, self.dilation,
                         self.groups)

    def args(self) -> tuple:
        """(stride, padding, dilation, groups) for conv2d-style calls."""
        return self.stride, self.padding, self.dilation, self.groups

    def describe(self) -> str:
        """Short argument summary as the layer table writes it, e.g. 'g128 p4 d4'."""
        parts = []
        for prefix, value, default in (("s", self.stride, 1), ("p", self.padding, 0),
                                       ("d", self.dilation, 1), ("g", self.groups, 1)):
            if value != default:
                text = str(value) if isinstance(value, int) else \
                    "(" + ",".join(map(str, value)) + ")"
                parts.append(prefix + text)
        return " ".join(parts) or "-"


LAYERS = {layer.name: layer for layer in [
    Layer("seed_toy", (1, 1, 4, 4), (1, 1, 2, 2), dilation=2,
          what="the 4x4 example of the API tour"),
    Layer("seed_3to16", (1, 3, 256, 256), (16, 3, 3, 3), dilation=2,
          what="RGB stem, few input channels"),
    Layer("aspp_r6", (1, 256, 33, 33), (256, 256, 3, 3), padding=6, dilation=6,
          what="DeepLab ASPP branch, rate 6"),
    Layer("aspp_r18", (1, 256, 33, 33), (256, 256, 3, 3), padding=18, dilation=18,
          what="DeepLab ASPP branch, rate 18: most taps in the padding"),
    Layer("context_d8", (1, 64, 128, 128), (64, 64, 3, 3), padding=8, dilation=8,
          what="context module (Yu & Koltun), dilation 8"),
    Layer("wavenet", (8, 64, 1, 4096), (64, 64, 1, 2), dilation=(1, 64),
          what="WaveNet/TCN causal 1-D layer as 1xW, dilation 64"),
    Layer("dw_d4", (8, 128, 64, 64), (128, 1, 3, 3), padding=4, dilation=4, groups=128,
          what="depthwise, dilation 4"),
    Layer("stride2_d2", (8, 32, 64, 64), (64, 32, 3, 3), stride=2, padding=2, dilation=2,
          what="strided and dilated"),
    # Larger layers of published networks (suite "networks").
    Layer("deeplab_2048", (1, 2048, 33, 33), (256, 2048, 3, 3), padding=6, dilation=6,
          what="DeepLabv3 ASPP branch on ResNet's 2048 channels, rate 6"),
    Layer("drn_512_d4", (1, 512, 64, 64), (512, 512, 3, 3), padding=4, dilation=4,
          what="dilated ResNet's last stage (DRN, PSPNet), dilation 4"),
    Layer("erfnet_3x1_d8", (1, 128, 64, 128), (128, 128, 3, 1), padding=(8, 0),
          dilation=(8, 1), what="ERFNet's factorised 3x1, dilation 8"),
    Layer("tcn_k3_d4", (16, 128, 1, 256), (128, 128, 1, 3), padding=(0, 4), dilation=(1, 4),
          what="TCN block, kernel 3, dilation 4, batch 16"),
    Layer("deeplabv2_21", (1, 2048, 41, 41), (21, 2048, 3, 3), padding=6, dilation=6,
          what="DeepLabv2 ASPP classifier branch, 2048 -> 21 classes, rate 6"),
    Layer("mnv2_dw_d2", (1, 960, 33, 33), (960, 1, 3, 3), padding=2, dilation=2, groups=960,
          what="MobileNetV2 (DeepLabv3+) dilated depthwise, 960 channels"),
    Layer("grouped_32x8_d2", (1, 256, 65, 65), (256, 8, 3, 3), padding=2, dilation=2,
          groups=32, what="ResNeXt-style dilated grouped conv, 32 groups of 8"),
]}
NETWORK_LAYERS = ("deeplab_2048", "drn_512_d4", "erfnet_3x1_d8", "tcn_k3_d4", "deeplabv2_21",
                  "mnv2_dw_d2", "grouped_32x8_d2")

NOTATION = ("input N x C x H x W, weight O x C/groups x kH x kW; args: s stride, p padding "
            "(each side), d dilation, g groups (defaults 1, 0, 1, 1 left out)")

DEFAULT_THREADS = (1, 2)


@dataclass(frozen=True)
class Suite:
    layers: tuple
    dtypes: tuple = ("float32",)
    threads: tuple = DEFAULT_THREADS
    what: str = ""


SUITE_LAYERS = tuple(name for name in LAYERS if name not in NETWORK_LAYERS)
SUITES = {
    "default": Suite(SUITE_LAYERS, what="every layer but the networks', float32"),
    "all": Suite(SUITE_LAYERS, DTYPES,
                 what="every layer but the networks', float32 and float64"),
    "networks": Suite(NETWORK_LAYERS, what="larger layers of published networks, float32"),
    "tiny": Suite(("seed_toy",), what="seed_toy only: a smoke test in seconds"),
}


def select(suite: str, layers: Optional[list] = None) -> list:
    """Layers to run: `layers` by name if given, else the suite's."""
    names = layers if layers else SUITES[suite].layers
    return [LAYERS[name] for name in names]


def flops(spec, op: str) -> tuple:
    """(nominal, effective) floating-point operations of one call.

    A multiply-add counts 2. Nominal counts every tap of every output; effective only the
    taps that read the image, not the zero padding. Backward = grad input + grad weight
    (each as many multiply-adds as the forward) + the grad bias sum.
    """
    per_pair = spec.n * spec.o * (spec.c // spec.groups)
    nominal = 2 * per_pair * spec.kh * spec.kw * spec.ho * spec.wo
    effective = 2 * per_pair * spec.effective_taps
    if op == "forward":
        return nominal, effective
    bias = spec.n * spec.o * spec.ho * spec.wo
    return 2 * nominal + bias, 2 * effective + bias


def min_bytes(spec, op: str, dtype: str) -> int:
    """Bytes one call must at least move: each array it reads and writes, once.

    Forward reads x, weight and bias and writes y; backward reads grad_output, x and weight
    and writes the three gradients.
    """
    s = spec
    x = s.n * s.c * s.h * s.w
    w = s.o * (s.c // s.groups) * s.kh * s.kw
    y = s.n * s.o * s.ho * s.wo
    elements = x + w + s.o + y if op == "forward" else y + x + w + x + w + s.o
    return elements * np.dtype(dtype).itemsize


def memory_bound(spec, fma_peak: dict, copy_bandwidth: dict) -> bool:
    """True when the forward cannot reach the 1-thread multiply-add peak even at the copy
    bandwidth: fewer flops per byte moved than the machine's balance (float32, or the
    dtype measured)."""
    dtype = "float32" if "float32" in fma_peak else next(iter(fma_peak))
    threads = min(copy_bandwidth, key=int)
    intensity = flops(spec, "forward")[1] / min_bytes(spec, "forward", dtype)
    return intensity < fma_peak[dtype][threads] / copy_bandwidth[threads]
