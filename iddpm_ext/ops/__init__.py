"""Python side of the ``iddpm`` torch ops: one module per op with its wrapper, its
fake (meta) implementation for torch.compile, and its autograd formula where it has one.
Importing this package registers them; the wrappers raise ExtensionUnavailableError
when iddpm_ext._C is not usable."""

from .._ops import available, has_kernel, require  # noqa: F401
from .attention import qkv_attention_fused  # noqa: F401
from .gather import gather_coefs  # noqa: F401
from .step import ddim_reverse_step, ddim_step, p_sample_step  # noqa: F401
