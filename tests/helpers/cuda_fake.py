"""A stand-in for iddpm_ext._C that answers the CUDA attention's device queries for made-up
cards (tests of fused_supported and `iddpm info` without a GPU)."""

from __future__ import annotations

# The kernels' shared memory per block (bytes) by (element size, tile head dim, backward), as
# _C.attention_smem_bytes gives them for the H100-sized configs; used where _C has no CUDA
# kernels (a CPU-only build answers 0).
SMEM_BYTES = {
    (2, 64, False): 46080, (2, 64, True): 65536, (2, 128, False): 92160, (2, 128, True): 83456,
    (2, 256, False): 118784, (2, 256, True): 161280, (4, 64, False): 87040, (4, 64, True): 122880,
    (4, 128, False): 174080, (4, 128, True): 153088, (4, 256, False): 217088, (4, 256, True): 226560,
}  # fmt: skip


class FakeCudaC:
    """``real`` (the loaded _C) but for attention_kernel_arch, answered from ``archs`` (device
    index -> architecture, or an exception to raise), and attention_smem_bytes (the real one's
    where it has CUDA kernels, else SMEM_BYTES). ``asked`` lists the devices asked about."""

    def __init__(self, real, archs: dict):
        self._real, self._archs, self.asked = real, archs, []

    def attention_kernel_arch(self, index):
        self.asked.append(index)
        answer = self._archs[index]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def attention_smem_bytes(self, element_size, head_dim, backward):
        if self._real.build_info()["cuda"]:
            return self._real.attention_smem_bytes(element_size, head_dim, backward)
        return SMEM_BYTES[element_size, head_dim, backward]

    def __getattr__(self, name):
        return getattr(self._real, name)
