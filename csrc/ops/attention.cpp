// csrc/ops/attention.cpp — torch glue of the fused QKV attention:
//
//   iddpm::qkv_attention(Tensor qkv, int num_heads) -> (Tensor out, Tensor lse)
//     qkv: [B, 3·H·C, T]; per head h the channels [3Ch, 3Ch + 3C) are q | k | v (the
//     reference's order). out: [B, H·C, T] in qkv's dtype; lse: [B, H, T], the natural-log
//     logsumexp of each query's scaled logits (saved for the backward): float32, or float64
//     for float64 qkv (so that the CPU backward in float64 is exact to float64 rounding).
//   iddpm::qkv_attention_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse,
//                                 int num_heads) -> Tensor grad_qkv   [B, 3·H·C, T]
//
//   iddpm::qkv_attention_bf16(Tensor qkv, int num_heads) -> Tensor out
//     CPU, bf16, inference (no lse, no backward): out as qkv_attention's, computed with bf16
//     pair dot products (AVX512-BF16 where the CPU has it); qkv at any strides (read in
//     place where token-major, channel stride 1: what a 1×1 conv of channels-last activations
//     gives), out token-major.
//
// No layout copies: the kernels read q, k, v as the [C, T] blocks they are in qkv. A
// non-contiguous argument (not the case for a Conv1d output) is made contiguous once here.
#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <torch/version.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>

#include "cpu/attention.h"
#include "cuda/attention.h"  // plain C++: the CUDA kernels' dtypes and head dims
#include "ops/checks.h"
#include "ops/dtype.h"

#ifdef IDDPM_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <ATen/cuda/CUDAContext.h>
#endif

namespace iddpm::ops {

// The opt-in switches of the CUDA attention, process-wide, each initialised once from its
// variable =1 in the environment, then set through set_attention_* (Python:
// iddpm_ext.ops.attention.attention_sm90 / attention_tile_major). Atomics, not the environment
// read at each call: getenv in an op that runs without the GIL races with os.environ writes
// (setenv) elsewhere.
//   IDDPM_ATTENTION_SM90: the sm_90a kernels (see use_sm90);
//   IDDPM_ATTENTION_TILE_MAJOR: the sm_80 kernels launched with a head's tiles adjacent
//     (AttentionFwdParams::tile_major);
//   IDDPM_ATTENTION_SM90_PIPELINED: the sm_90a forward's pipelined consumers, where the sm_90a
//     forward runs (AttentionFwdParams::sm90_pipelined);
//   IDDPM_ATTENTION_SM90_BULK_DQ: the sm_90a backward's dq by TMA bulk reductions, where the
//     sm_90a backward runs (AttentionBwdParams::sm90_bulk_dq).
namespace {
int env_switch(const char* name) {
  const char* want = std::getenv(name);
  return want != nullptr && std::strcmp(want, "1") == 0 ? 1 : 0;
}
std::atomic<int>& sm90_flag() {
  static std::atomic<int> flag{env_switch("IDDPM_ATTENTION_SM90")};
  return flag;
}
std::atomic<int>& tile_major_flag() {
  static std::atomic<int> flag{env_switch("IDDPM_ATTENTION_TILE_MAJOR")};
  return flag;
}
std::atomic<int>& sm90_pipelined_flag() {
  static std::atomic<int> flag{env_switch("IDDPM_ATTENTION_SM90_PIPELINED")};
  return flag;
}
std::atomic<int>& sm90_bulk_dq_flag() {
  static std::atomic<int> flag{env_switch("IDDPM_ATTENTION_SM90_BULK_DQ")};
  return flag;
}
}  // namespace

bool attention_sm90_enabled() { return sm90_flag().load(std::memory_order_relaxed) != 0; }

bool set_attention_sm90(bool enabled) { return sm90_flag().exchange(enabled ? 1 : 0) != 0; }

bool attention_tile_major_enabled() {
  return tile_major_flag().load(std::memory_order_relaxed) != 0;
}

bool set_attention_tile_major(bool enabled) {
  return tile_major_flag().exchange(enabled ? 1 : 0) != 0;
}

bool attention_sm90_pipelined_enabled() {
  return sm90_pipelined_flag().load(std::memory_order_relaxed) != 0;
}

bool set_attention_sm90_pipelined(bool enabled) {
  return sm90_pipelined_flag().exchange(enabled ? 1 : 0) != 0;
}

bool attention_sm90_bulk_dq_enabled() {
  return sm90_bulk_dq_flag().load(std::memory_order_relaxed) != 0;
}

bool set_attention_sm90_bulk_dq(bool enabled) {
  return sm90_bulk_dq_flag().exchange(enabled ? 1 : 0) != 0;
}

#ifdef IDDPM_WITH_CUDA
namespace {
// cuda::qkv_attention_kernel_arch on the current device, a read error raised as CUDA's; read
// once per device (the first call of the op there, never inside a graph capture that is not
// preceded by one) and kept, as each call of the op asks.
int kernel_arch() {
  constexpr int kDevices = 64;
  static std::array<std::atomic<int>, kDevices> known{};  // 0: not read yet
  const int device = c10::cuda::current_device();
  int arch = device >= 0 && device < kDevices ? known[device].load(std::memory_order_relaxed) : 0;
  if (arch > 0) return arch;
  arch = cuda::qkv_attention_kernel_arch();
  if (arch < 0) C10_CUDA_CHECK(static_cast<cudaError_t>(-arch));
  if (device >= 0 && device < kDevices) known[device].store(arch, std::memory_order_relaxed);
  return arch;
}

// Shared memory per block of the forward or backward kernel for dtype and a supported head dim C.
int64_t smem_bytes(DType dtype, int64_t C, bool backward) {
  return backward ? cuda::qkv_attention_bwd_smem_bytes(dtype, C)
                  : cuda::qkv_attention_fwd_smem_bytes(dtype, C);
}
}  // namespace
#endif

int64_t attention_smem_bytes(int64_t element_size, int64_t head_dim, bool backward) {
#ifdef IDDPM_WITH_CUDA
  TORCH_CHECK_VALUE(element_size == 2 || element_size == 4,
                    "element_size: expected 2 (float16, bfloat16) or 4 (float32), got ",
                    element_size);
  TORCH_CHECK_VALUE(cuda::qkv_attention_head_dim_supported(head_dim),
                    "head_dim: expected a multiple of ", cuda::kAttentionHeadDimStep, " from ",
                    cuda::kAttentionHeadDimStep, " to ", cuda::kAttentionMaxHeadDim, ", got ",
                    head_dim);
  return smem_bytes(element_size == 4 ? DType::kFloat32 : DType::kFloat16, head_dim, backward);
#else
  (void)element_size, (void)head_dim, (void)backward;
  return 0;
#endif
}

int64_t attention_kernel_arch(int64_t device_index) {
#ifdef IDDPM_WITH_CUDA
  const int count = c10::cuda::device_count();  // a DeviceIndex (int8): printed as an int
  TORCH_CHECK_VALUE(device_index >= 0 && device_index < count,
                    "device_index: expected a CUDA device index in [0, ", count, "), got ",
                    device_index);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  return kernel_arch();
#else
  (void)device_index;
  return 0;
#endif
}

namespace {

using attn::AttentionShape;

// Checks qkv and num_heads; returns the dimensions. Nothing is allocated or launched before
// every check has passed. No arithmetic here can overflow: num_heads is any int64 (3·num_heads
// is never formed), and qkv's dims may be near 2^63 where another dim is 0.
AttentionShape check_qkv(const at::Tensor& qkv, int64_t num_heads) {
  check_defined(qkv, "qkv");
  check_dim(qkv, "qkv", 3, "[B, 3·num_heads·C, T]");
  TORCH_CHECK_VALUE(num_heads >= 1, "num_heads: expected a positive number of heads, got ",
                    num_heads);
  const int64_t width = qkv.size(1);
  // width % (3·num_heads) == 0 without forming 3·num_heads.
  TORCH_CHECK_VALUE(
      width > 0 && width % 3 == 0 && (width / 3) % num_heads == 0,
      "qkv: expected a channel count (dim 1) that is a positive multiple of 3·num_heads = ",
      product_str(3, num_heads), " (q, k and v of C channels per head), got ", width,
      " channels in shape ", shape_str(qkv));
  AttentionShape d;
  d.B = qkv.size(0);
  d.H = num_heads;
  d.C = width / 3 / num_heads;
  d.T = qkv.size(2);
  if (qkv.is_cuda()) {
    TORCH_CHECK_VALUE(dtype_in(qkv.scalar_type(), cuda::kAttentionDtypes), "qkv: expected dtype ",
                      dtype_names(cuda::kAttentionDtypes), " on CUDA, got ", qkv.scalar_type());
    TORCH_CHECK_VALUE(
        cuda::qkv_attention_head_dim_supported(d.C),
        "qkv: expected a head dim C = channels / (3·num_heads) that is a multiple of ",
        cuda::kAttentionHeadDimStep, " from ", cuda::kAttentionHeadDimStep, " to ",
        cuda::kAttentionMaxHeadDim, " on CUDA, got C = ", d.C, " (", width, " channels, ",
        num_heads, " heads)");
    TORCH_CHECK_VALUE(d.T <= cuda::kAttentionMaxPositions, "qkv: expected at most ",
                      cuda::kAttentionMaxPositions, " positions (dim 2) on CUDA, got ", d.T);
    // One CTA per (batch item, head) along gridDim.x.
    const std::optional<int64_t> bh = checked_mul(d.B, d.H);
    TORCH_CHECK_VALUE(bh && *bh <= cuda::kAttentionMaxBatchHeads, "qkv: expected at most ",
                      cuda::kAttentionMaxBatchHeads, " batch items × heads on CUDA, got ", d.B,
                      " × ", d.H);
  } else {
    TORCH_CHECK_VALUE(qkv.is_cpu(), "qkv: expected a CPU or CUDA tensor, got one on ",
                      qkv.device());
    TORCH_CHECK_VALUE(dtype_in(qkv.scalar_type(), cpu::kAttentionDtypes), "qkv: expected dtype ",
                      dtype_names(cpu::kAttentionDtypes), " on CPU, got ", qkv.scalar_type());
  }
  return d;
}

// Checks a [B, H·C, T] tensor that goes with qkv (grad_out, out).
void check_like_out(const at::Tensor& x, const char* name, const at::Tensor& qkv,
                    const AttentionShape& d) {
  check_defined(x, name);
  check_same_device(x, name, qkv, "qkv");
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) == d.B && x.size(1) == d.H * d.C && x.size(2) == d.T,
                    name, ": expected shape [", d.B, ", ", d.H * d.C, ", ", d.T,
                    "] (that of the attention output), got ", shape_str(x));
  TORCH_CHECK_VALUE(x.scalar_type() == qkv.scalar_type(), name, ": expected dtype ",
                    qkv.scalar_type(), " (that of qkv), got ", x.scalar_type());
}

at::ScalarType lse_dtype(const at::Tensor& qkv) {
  return qkv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_lse(const at::Tensor& lse, const at::Tensor& qkv, const AttentionShape& d) {
  check_defined(lse, "lse");
  check_same_device(lse, "lse", qkv, "qkv");
  check_dtype(lse, "lse", lse_dtype(qkv));
  TORCH_CHECK_VALUE(
      lse.dim() == 3 && lse.size(0) == d.B && lse.size(1) == d.H && lse.size(2) == d.T,
      "lse: expected shape [", d.B, ", ", d.H, ", ", d.T, "], got ", shape_str(lse));
}

// Checks the backward's arguments; returns the dimensions.
AttentionShape check_backward(const at::Tensor& grad_out, const at::Tensor& qkv,
                              const at::Tensor& out, const at::Tensor& lse, int64_t num_heads) {
  const AttentionShape d = check_qkv(qkv, num_heads);
  check_like_out(grad_out, "grad_out", qkv, d);
  check_like_out(out, "out", qkv, d);
  check_lse(lse, qkv, d);
  return d;
}

// The forward's tensors (qkv contiguous) and its params. out: [B, H·C, T] in qkv's dtype;
// lse: [B, H, T] in lse_dtype.
struct Forward {
  at::Tensor qkv, out, lse;
  attn::AttentionFwdParams p;
};

Forward forward(const AttentionShape& d, const at::Tensor& qkv_in, at::ScalarType lse_dtype) {
  Forward f;
  f.qkv = qkv_in.contiguous();
  f.out = at::empty({d.B, d.H * d.C, d.T}, f.qkv.options());
  f.lse = at::empty({d.B, d.H, d.T}, f.qkv.options().dtype(lse_dtype));
  f.p.dtype = dtype_of(f.qkv);
  f.p.s = d;
  f.p.qkv = f.qkv.data_ptr();
  f.p.out = f.out.data_ptr();
  f.p.lse = f.lse.data_ptr();
  return f;
}

// The backward's tensors (inputs contiguous, grad_qkv allocated) and its params (without the
// CUDA workspaces).
struct Backward {
  at::Tensor grad_out, qkv, out, lse, grad_qkv;
  attn::AttentionBwdParams p;
};

Backward backward(const AttentionShape& d, const at::Tensor& grad_out_in, const at::Tensor& qkv_in,
                  const at::Tensor& out_in, const at::Tensor& lse_in) {
  Backward b;
  b.qkv = qkv_in.contiguous();
  b.grad_out = grad_out_in.contiguous();
  b.out = out_in.contiguous();
  b.lse = lse_in.contiguous();
  b.grad_qkv = at::empty_like(b.qkv);
  b.p.dtype = dtype_of(b.qkv);
  b.p.s = d;
  b.p.grad_out = b.grad_out.data_ptr();
  b.p.qkv = b.qkv.data_ptr();
  b.p.out = b.out.data_ptr();
  b.p.lse = b.lse.data_ptr();
  b.p.grad_qkv = b.grad_qkv.data_ptr();
  return b;
}

std::tuple<at::Tensor, at::Tensor> qkv_attention_cpu(const at::Tensor& qkv_in, int64_t num_heads) {
  const AttentionShape d = check_qkv(qkv_in, num_heads);
  const Forward f = forward(d, qkv_in, lse_dtype(qkv_in));
  cpu::qkv_attention_fwd(f.p);
  return {f.out, f.lse};
}

at::Tensor qkv_attention_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& qkv_in,
                                      const at::Tensor& out_in, const at::Tensor& lse_in,
                                      int64_t num_heads) {
  const AttentionShape d = check_backward(grad_out_in, qkv_in, out_in, lse_in, num_heads);
  const Backward b = backward(d, grad_out_in, qkv_in, out_in, lse_in);
  cpu::qkv_attention_bwd(b.p);
  return b.grad_qkv;
}

// The bf16 inference forward: qkv read at its strides (in place where token-major, channel stride
// 1; else the kernel copies k and v per head and q per block); out [B, H·C, T] token-major
// (strides T·H·C, 1, H·C), as torch's SDPA gives it for such a qkv on the CPU.
at::Tensor qkv_attention_bf16_cpu(const at::Tensor& qkv, int64_t num_heads) {
  check_defined(qkv, "qkv");
  check_cpu_only(qkv, "qkv", "qkv_attention_bf16");
  TORCH_CHECK_VALUE(qkv.scalar_type() == at::kBFloat16,
                    "qkv: expected dtype bfloat16 (qkv_attention_bf16 is the bf16 kernel), got ",
                    torch_dtype_name(qkv));
  const AttentionShape d = check_qkv(qkv, num_heads);
  const at::Tensor out = at::empty({d.B, d.T, d.H * d.C}, qkv.options()).transpose(1, 2);
  attn::AttentionBf16Params p;
  p.s = d;
  p.qkv = qkv.data_ptr();
  p.qkv_sb = qkv.stride(0);
  p.qkv_sc = qkv.stride(1);
  p.qkv_st = qkv.stride(2);
  p.out = out.data_ptr();
  p.out_sb = out.stride(0);
  p.out_st = out.stride(2);
  cpu::qkv_attention_bf16_fwd(p);
  return out;
}

}  // namespace

// Whether fp32 products may run on TF32 tensor cores: torch's own setting for CUDA matmuls, read at
// each call as cuBLAS does: torch.backends.cuda.matmul.fp32_precision == "tf32" (what
// torch.set_float32_matmul_precision("high" or "medium"), torch.backends.cuda.matmul.allow_tf32
// = True and torch.backends.fp32_precision = "tf32" set). Otherwise split-TF32 (fp32-accurate).
// Read through the per-backend API where torch has it (2.9 on): its legacy getter,
// allowTF32CuBLAS(), throws once the new API has set the precision. (The sm_80 / sm_90 launches
// read it for fp32 only.)
bool attention_fp32_tf32() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
#else
  return at::globalContext().allowTF32CuBLAS();
#endif
}

namespace {

#ifdef IDDPM_WITH_CUDA

#ifdef IDDPM_WITH_SM90
// Whether the op runs the Hopper (sm_90a) kernels instead of the sm_80 ones (forward and
// backward alike): only when they were built (IDDPM_WITH_SM90: an arch list with 9.0), asked for
// (attention_sm90_enabled(): never the default, they have not run on a card yet), on a device of
// compute capability 9.0 exactly (an sm_90a cubin loads nowhere else), for a dtype and head dim
// they have (fp16 / bf16, C = 64 / 128). Same outputs either way.
bool use_sm90(DType dtype, int64_t C, const at::Tensor& qkv) {
  if (!attention_sm90_enabled()) return false;
  if (!cuda::qkv_attention_sm90_supported(dtype, C)) return false;
  const auto* prop = at::cuda::getDeviceProperties(qkv.device().index());
  return prop->major == 9 && prop->minor == 0;
}
#endif

// The forward kernel for p: the sm_90a one where use_sm90 says so, else the sm_80 one.
int run_forward(const attn::AttentionFwdParams& p, const at::Tensor& qkv) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
#ifdef IDDPM_WITH_SM90
  if (use_sm90(p.dtype, p.s.C, qkv)) return cuda::qkv_attention_fwd_sm90(p, stream);
#else
  (void)qkv;
#endif
  return cuda::qkv_attention_fwd(p, stream);
}

// The backward kernels for p: the sm_90a ones where use_sm90 says so, else the sm_80 ones.
int run_backward(const attn::AttentionBwdParams& p, const at::Tensor& qkv) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
#ifdef IDDPM_WITH_SM90
  if (use_sm90(p.dtype, p.s.C, qkv)) return cuda::qkv_attention_bwd_sm90(p, stream);
#else
  (void)qkv;
#endif
  return cuda::qkv_attention_bwd(p, stream);
}

// The sm_80 kernels' code on qkv's device (the current one) was built for sm_80 or newer: a
// build whose arch list reaches this card only through 7.5 (Turing, or 7.5+PTX) has kernels
// that trap. After every argument check, under qkv's device guard.
void check_kernel_arch(const at::Tensor& qkv) {
  const int arch = kernel_arch();
  if (arch >= cuda::kAttentionMinArch) return;
  const auto* prop = at::cuda::getDeviceProperties(qkv.device().index());
  TORCH_CHECK_VALUE(false,
                    "qkv: the fused CUDA attention needs code built for compute capability 8.0 or "
                    "newer (cp.async, bf16 and TF32 tensor cores); ",
                    qkv.device(), " (", prop->name, ", compute capability ", prop->major, ".",
                    prop->minor, ") runs iddpm_ext's attention built for ", arch / 10, ".",
                    arch % 10,
                    " (a card of 8.0 or newer needs TORCH_CUDA_ARCH_LIST to name it); "
                    "attention_impl(\"auto\") uses einsum there");
}

// The kernel's shared memory for this dtype and head dim fits the device's opt-in limit per
// block (the kernels are sized for the H100; see qkv_attention_fwd_smem_bytes). After the
// argument checks, under qkv's device guard.
void check_shared_memory(const at::Tensor& qkv, const AttentionShape& d, bool backward) {
  const int64_t need = smem_bytes(dtype_of(qkv), d.C, backward);
  const auto* prop = at::cuda::getDeviceProperties(qkv.device().index());
  const int64_t limit = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  TORCH_CHECK_VALUE(need <= limit, "qkv: the fused CUDA attention ",
                    backward ? "backward" : "forward", " for head dim C = ", d.C, " in ",
                    qkv.scalar_type(), " needs ", need, " bytes of shared memory per block; ",
                    qkv.device(), " (", prop->name, ") allows ", limit,
                    " (attention_impl(\"auto\") uses einsum there)");
}

std::tuple<at::Tensor, at::Tensor> qkv_attention_cuda(const at::Tensor& qkv_in, int64_t num_heads) {
  const AttentionShape d = check_qkv(qkv_in, num_heads);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  check_kernel_arch(qkv_in);
  check_shared_memory(qkv_in, d, false);
  Forward f = forward(d, qkv_in, at::kFloat);
  if (f.out.numel() == 0) return {f.out, f.lse};
  f.p.allow_tf32 = qkv_in.scalar_type() == at::kFloat && attention_fp32_tf32();
  f.p.tile_major = attention_tile_major_enabled();
  f.p.sm90_pipelined = attention_sm90_pipelined_enabled();
  const int err = run_forward(f.p, qkv_in);
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  return {f.out, f.lse};
}

at::Tensor qkv_attention_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& qkv_in,
                                       const at::Tensor& out_in, const at::Tensor& lse_in,
                                       int64_t num_heads) {
  const AttentionShape d = check_backward(grad_out_in, qkv_in, out_in, lse_in, num_heads);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  check_kernel_arch(qkv_in);
  check_shared_memory(qkv_in, d, true);
  Backward b = backward(d, grad_out_in, qkv_in, out_in, lse_in);
  if (b.grad_qkv.numel() == 0) return b.grad_qkv;
  const auto f32 = b.qkv.options().dtype(at::kFloat);
  at::Tensor dq_accum = at::empty({d.B * d.H, d.C, d.T}, f32);
  at::Tensor delta = at::empty({d.B * d.H, d.T}, f32);
  b.p.dq_accum = dq_accum.data_ptr<float>();
  b.p.delta = delta.data_ptr<float>();
  b.p.allow_tf32 = qkv_in.scalar_type() == at::kFloat && attention_fp32_tf32();
  b.p.tile_major = attention_tile_major_enabled();
  b.p.sm90_bulk_dq = attention_sm90_bulk_dq_enabled();
  const int err = run_backward(b.p, qkv_in);
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  return b.grad_qkv;
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(iddpm, CPU, m) {
  m.impl("qkv_attention", &qkv_attention_cpu);
  m.impl("qkv_attention_backward", &qkv_attention_backward_cpu);
  m.impl("qkv_attention_bf16", &qkv_attention_bf16_cpu);
}

#ifdef IDDPM_WITH_CUDA
TORCH_LIBRARY_IMPL(iddpm, CUDA, m) {
  m.impl("qkv_attention", &qkv_attention_cuda);
  m.impl("qkv_attention_backward", &qkv_attention_backward_cuda);
  m.impl("qkv_attention_bf16", &qkv_attention_bf16_cpu);  // refuses a CUDA qkv by name
}
#endif

}  // namespace iddpm::ops
