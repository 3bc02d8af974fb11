"""The CPU backend's path rules: which kernel runs each conv, kernel gradient and max-pool, as one frozen dataclass.

Every rule is a pure function of static shapes, the dtype and one fact of the CPU (whether oneDNN has its AVX-512
kernels there), so benches and tests vary a rule by passing another :class:`Rules` instance
(``dataclasses.replace(DEFAULT, ...)``), never by patching a module. ``python -m experiments.bench.convs`` times
each conv of the zoo by every path against PyTorch's; ``python -m experiments.bench.cpu`` times whole train steps
with the backend on and off.
"""

from __future__ import annotations

import dataclasses

Pads = tuple[tuple[int, int], tuple[int, int]]
CONV_PATHS = ("onednn", "shifted", "patches", "xla")
WGRAD_CHOICES = ("auto", "native", "forward", "matmul")


def output_hw(in_hw: tuple[int, int], kernel_hw: tuple[int, int], strides: tuple[int, int], pads: Pads,
              dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """``(H', W')`` of a convolution or pool window (floor mode)."""
    return tuple((in_hw[a] + pads[a][0] + pads[a][1] - dilation[a] * (kernel_hw[a] - 1) - 1) // strides[a] + 1
                 for a in (0, 1))


@dataclasses.dataclass(frozen=True)
class Rules:
    """Path rules of the CPU backend, with the defaults it runs by.

    Grouped convolutions (groups > 1, depthwise ones included; :meth:`conv_path`): 'onednn' (its grouped
    primitives) wherever oneDNN runs the dtype, else 'xla'; no shifted-sum or patches path takes them (measured
    against XLA's grouped conv and a shifted sum of per-channel taps: ``python -m experiments.bench.convs
    --models mobilenet_v2@224,efficientnet_b0@224,convnext_tiny@224,regnet_y_400mf@224 --grouped --only conv
    --batch 32 --steps 3``). Their kernel gradients (:meth:`grouped_wgrad_path`): depthwise ones (one input channel per
    group) with kernels at least ``depthwise_wgrad_loop_min_width`` wide, or dilated, by cnnjax's own loop over
    channels ('depthwise'; oneDNN's depthwise backward-weights kernel takes only narrower undilated kernels, and its
    generic grouped kernel pads each channel to a 16x16 block); every other by oneDNN's primitive ('native'). The
    command's ``--grouped`` table times each depthwise conv with the other choice too.

    Convolutions of groups 1 (:meth:`conv_path`):

    * ``shifted``: a greyscale input (at most ``shifted_max_in`` channels) with a multiple of
      ``shifted_out_multiple`` output channels and at most ``shifted_max_terms`` kernel taps: one elementwise sum of
      shifted views times kernel rows (XLA fuses it with the next activation), oneDNN's gradients;
    * ``patches``: other greyscale convs with kernels up to ``patches_max_kernel``, 1x1 kernels and outputs of at
      most ``patches_max_output`` positions: patches times the reshaped kernel, one matrix product;
    * ``onednn``: every other float32 (and, with AVX-512, bfloat16) conv.

    Kernel gradients of stride-1 undilated convs (:meth:`wgrad_path`), float32 without AVX-512 when
    ``wgrad_by_shape``: oneDNN's backward-weights primitive ('native') for inputs of at most ``wgrad_native_max_in``
    channels or outputs of fewer than ``wgrad_native_below_out``; one matrix product of the input patches
    ('matmul') where the conv at least doubles its channels to ``wgrad_matmul_min_out`` or more, or the map is at
    most ``wgrad_matmul_max_hw``, and the patches take at most ``wgrad_matmul_max_bytes``; else one forward conv
    with the batch as the channels ('forward'). bfloat16 (AVX-512): 'forward' up to 4x4 maps, 'matmul' up to 8x8,
    else 'native'. ``wgrad`` other than 'auto' forces one path for all groups-1 kernel gradients.

    ``forward_as_input_gradient``: float32 stride-1 forwards without AVX-512 run as oneDNN's input gradient of the
    transposed conv, whose AVX2 kernel is the faster one. ``onednn_max_pool``: 'avx512' (oneDNN's max-pool where it
    has AVX-512 kernels, the strided views elsewhere), 'always' or 'never'. ``closed_form_batch_norm``: training
    BatchNorm's backward in closed form (two channel sums, one elementwise pass) instead of autodiff.
    """

    shifted_max_in: int = 1
    shifted_out_multiple: int = 8
    shifted_max_terms: int = 49
    patches_max_kernel: int = 3
    patches_max_output: int = 4
    wgrad: str = "auto"
    wgrad_by_shape: bool = True
    wgrad_native_max_in: int = 4
    wgrad_native_below_out: int = 32
    wgrad_matmul_min_out: int = 64
    wgrad_matmul_max_hw: int = 4
    wgrad_matmul_max_bytes: int = 256 << 20
    depthwise_wgrad_loop_min_width: int = 4
    forward_as_input_gradient: bool = True
    onednn_max_pool: str = "avx512"
    closed_form_batch_norm: bool = True

    def __post_init__(self):
        if self.wgrad not in WGRAD_CHOICES:
            raise ValueError(f"Rules.wgrad must be one of {', '.join(WGRAD_CHOICES)}; got {self.wgrad!r}")
        if self.onednn_max_pool not in ("avx512", "always", "never"):
            raise ValueError("Rules.onednn_max_pool must be 'avx512', 'always' or 'never'; got "
                             f"{self.onednn_max_pool!r}")

    def conv_path(self, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], strides: tuple[int, int],
                  pads: Pads, dilation: tuple[int, int], onednn_runs: bool, groups: int = 1) -> str:
        """One of :data:`CONV_PATHS` for a conv of ``x_shape`` ``[N, H, W, C]`` by ``kernel_shape``
        ``[kH, kW, C / groups, O]``; ``onednn_runs``: whether oneDNN's kernels run this dtype here."""
        if groups != 1:
            return "onednn" if onednn_runs else "xla"
        kh, kw, c_in, c_out = kernel_shape
        if c_in <= self.shifted_max_in and c_out % self.shifted_out_multiple == 0 and \
                kh * kw * c_in <= self.shifted_max_terms and onednn_runs:
            return "shifted"
        ho, wo = output_hw(x_shape[1:3], (kh, kw), strides, pads, dilation)
        if (c_in <= self.shifted_max_in and max(kh, kw) <= self.patches_max_kernel) or (kh, kw) == (1, 1) or \
                ho * wo <= self.patches_max_output:
            return "patches"
        return "onednn" if onednn_runs else "xla"

    def wgrad_path(self, dtype_name: str, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                   out_hw: tuple[int, int], avx512: bool) -> str:
        """How oneDNN computes a stride-1 undilated conv's kernel gradient: 'native', 'forward' or 'matmul'."""
        if self.wgrad != "auto":
            return self.wgrad
        hw = max(out_hw)
        if dtype_name == "bfloat16":
            return "forward" if hw <= 4 else ("matmul" if hw <= 8 else "native")
        kh, kw, c_in, c_out = kernel_shape
        if avx512 or not self.wgrad_by_shape or c_in <= self.wgrad_native_max_in or \
                c_out < self.wgrad_native_below_out:
            return "native"
        patch_bytes = x_shape[0] * out_hw[0] * out_hw[1] * kh * kw * c_in * 4
        widens = c_out >= 2 * c_in and c_out >= self.wgrad_matmul_min_out
        small = patch_bytes <= self.wgrad_matmul_max_bytes
        return "matmul" if (widens or hw <= self.wgrad_matmul_max_hw) and small else "forward"

    def grouped_wgrad_path(self, kernel_shape: tuple[int, ...], groups: int, dilation: tuple[int, int]) -> str:
        """How oneDNN's backend computes the kernel gradient of a grouped conv (``groups`` > 1) by ``kernel_shape``
        ``[kH, kW, C / groups, O]``: 'depthwise' (the loop) or 'native'."""
        depthwise = groups > 1 and kernel_shape[2] == 1
        wide = kernel_shape[1] >= self.depthwise_wgrad_loop_min_width or dilation != (1, 1)
        return "depthwise" if depthwise and wide else "native"

    def forward_by_input_gradient(self, dtype_name: str, kernel_hw: tuple[int, int], strides: tuple[int, int],
                                  pads: Pads, dilation: tuple[int, int], avx512: bool) -> bool:
        """Whether a forward runs as the input gradient of the transposed conv: float32 without AVX-512, stride 1,
        undilated, every pad at most ``kernel - 1`` (so the transposed conv's pads are not negative)."""
        return self.forward_as_input_gradient and not avx512 and dtype_name == "float32" and strides == (1, 1) \
            and dilation == (1, 1) and all(0 <= p <= k - 1 for k, pair in zip(kernel_hw, pads, strict=True)
                                           for p in pair)

    def max_pool_by_onednn(self, avx512: bool) -> bool:
        """Whether max-pools run through oneDNN (else the strided views)."""
        return self.onednn_max_pool == "always" or (self.onednn_max_pool == "avx512" and avx512)


DEFAULT = Rules()
