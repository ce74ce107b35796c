"""The Python side of the ``iddpm`` torch ops, one module per op: its wrapper, its fake
(meta) implementation for torch.compile, its autograd formula where it has one, and the
dispatch between the fused op and the readable eager path where the library picks one.

- :mod:`.loader` — loading ``iddpm_ext._C`` (available, require, build_info, has_kernel).
- :mod:`.gather_coefs` — iddpm::gather_coefs, rows of the schedule-coefficient table.
- :mod:`.step` — iddpm::p_sample_step / ddim_step / ddim_reverse_step, the fused steps.
- :mod:`.attention` — iddpm::qkv_attention (+ backward) and the UNet's attention dispatch.
- :mod:`.group_norm` — iddpm::group_norm_act (+ backward), GroupNorm + scale-shift + SiLU fused.
- :mod:`.winograd` — iddpm::conv3x3_winograd / winograd_weight, the CPU fp32 Winograd 3×3 conv,
  and conv3x3_winograd_weight_grad, its weight gradient (training).
- :mod:`.checks` — the fake implementations' argument checks (the C++ checks' messages); they
  refuse meta tensors mixed with real ones, which the dispatcher sends to the fakes.

Importing this package registers the fake and autograd implementations; the wrappers raise
ExtensionUnavailableError when ``_C`` is not usable.
"""

from .attention import (  # noqa: F401
    attention_impl,
    get_attention_impl,
    qkv_attention,
    qkv_attention_fused,
    qkv_attention_reference,
    set_attention_impl,
)
from .gather_coefs import gather_coefs  # noqa: F401
from .group_norm import group_norm_act, group_norm_act_reference  # noqa: F401
from .loader import available, build_info, has_kernel, load_error, require  # noqa: F401
from .step import ddim_reverse_step, ddim_step, p_sample_step  # noqa: F401
from .winograd import conv3x3_winograd, conv3x3_winograd_weight_grad, winograd_weight  # noqa: F401
