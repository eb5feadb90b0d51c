// Linear layers on the CPU without autograd: products of up to 8 rows (decoding) on neva's GEMV
// (gemv.cpp, fp32 and bf16), larger fp32 ones through OpenBLAS (Debian's libopenblas0).
//
// Why OpenBLAS: the LibTorch wheel's fp32 GEMM is MKL's, and MKL picks slow code paths on AMD
// processors: measured on the project's 2-vCPU EPYC (docs/benchmarks.md, the decode section), MKL's
// GEMV read weights at 16 GB/s where OpenBLAS's read 32 GB/s in the same minute, and OpenBLAS's GEMM was
// 1.2-1.5x MKL's from 4 to 1024 rows (prefill, image towers). Its GEMV has since given way to neva's,
// which reads faster still (gemv.cpp).
//
// How: libopenblas.so.0 is opened with RTLD_LOCAL and only its cblas_* entry points are looked up.
// Both libraries export the Fortran names (sgemm_, sgemv_): linking OpenBLAS normally could bind
// LibTorch's own BLAS calls to it, depending on load order. RTLD_LOCAL keeps OpenBLAS's symbols out of
// the global scope, so LibTorch keeps MKL and only these calls reach OpenBLAS.
//
// Threads: one pool. OpenBLAS is set to compute on the calling thread only, and each product is split
// by rows of the weight over LibTorch's OpenMP threads (intra_op_for). OpenBLAS's own pool (its
// default) and LibTorch's would take turns on the same cores: under libgomp's spinning wait each
// slowed the other to below MKL's speed, and the passive wait neva used to set instead made every
// parallel region pay a wake-up (bf16 decode 12 against 16 tokens/s; docs/benchmarks.md).
//
// When: fp32 products of more than 8 rows, whenever libopenblas.so.0 is installed.
// NEVA_CPU_BLAS=openblas requires it (an error when it cannot be opened), NEVA_CPU_BLAS=aten forces
// at::linear (bitwise LibTorch's results). Never while autograd records, under CPU autocast or inside an
// AtenLinearScope: at::linear's then.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <cblas.h>
#include <dlfcn.h>

#include <climits>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "gemv.h"
#include "neva/error.h"
#include "neva/nn/intra_op.h"
#include "neva/nn/linear.h"

namespace neva::nn {

namespace {

struct OpenBlas {
  decltype(&cblas_sgemm) sgemm = nullptr;
  decltype(&openblas_set_num_threads) set_num_threads = nullptr;
  decltype(&openblas_get_config) config = nullptr;
  std::once_flag once;

  bool aten = false;    // NEVA_CPU_BLAS=aten: every product at::linear's
  std::string error;    // why NEVA_CPU_BLAS cannot be honoured
  std::string why_not;  // why OpenBLAS is not used, by default

  OpenBlas() {
    const char* choice = std::getenv("NEVA_CPU_BLAS");
    const std::string wanted = choice ? choice : "";
    if (wanted == "aten") {
      aten = true;
      why_not = "NEVA_CPU_BLAS=aten";
      return;
    }
    if (!wanted.empty() && wanted != "openblas") {
      error = "NEVA_CPU_BLAS is '" + wanted + "': expected 'openblas' or 'aten' (or unset: OpenBLAS when installed)";
      return;
    }
    void* handle = ::dlopen("libopenblas.so.0", RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
      why_not = "libopenblas.so.0 not found";
      if (!wanted.empty()) error = std::string("NEVA_CPU_BLAS=openblas, but libopenblas.so.0 cannot be opened: ") + ::dlerror();
      return;
    }
    sgemm = reinterpret_cast<decltype(sgemm)>(::dlsym(handle, "cblas_sgemm"));
    set_num_threads = reinterpret_cast<decltype(set_num_threads)>(::dlsym(handle, "openblas_set_num_threads"));
    config = reinterpret_cast<decltype(config)>(::dlsym(handle, "openblas_get_config"));
    if (!sgemm || !set_num_threads || !config) {
      sgemm = nullptr;  // not OpenBLAS: unused
      if (!wanted.empty()) error = "NEVA_CPU_BLAS=openblas, but libopenblas.so.0 lacks cblas_sgemm";
    }
  }
  bool loaded() const { return sgemm != nullptr; }

  // OpenBLAS computes on the calling thread only: neva splits each product over LibTorch's OpenMP
  // threads (intra_op_for), so one pool runs everything and no second one waits for the cores.
  void single_threaded() {
    std::call_once(once, [this] { set_num_threads(1); });
  }
};

OpenBlas& openblas() {
  static OpenBlas library;
  if (!library.error.empty()) throw Error(library.error);
  return library;
}

bool fits_int(std::int64_t n) { return n > 0 && n <= INT_MAX; }

thread_local int aten_scopes = 0;

}  // namespace

AtenLinearScope::AtenLinearScope() { ++aten_scopes; }
AtenLinearScope::~AtenLinearScope() { --aten_scopes; }

std::string cpu_blas_name() {
  OpenBlas& library = openblas();
  if (library.loaded()) return std::string("OpenBLAS (") + library.config() + ")";
  return "ATen (MKL)" + (library.why_not.empty() ? std::string() : ": " + library.why_not);
}

std::string cpu_fp32_gemv_name() {
  const std::string isa = detail::gemv_isa(at::kFloat);  // a bad NEVA_GEMV is an error even when unused
  if (openblas().aten) return "ATen (MKL): NEVA_CPU_BLAS=aten";
  return "neva's GEMV (" + isa + ") up to " + std::to_string(detail::kGemvMaxRows) + " rows, " + cpu_blas_name() +
         " beyond";
}

std::string cpu_bf16_gemv_name() {
  const std::string isa = detail::gemv_isa(at::kBFloat16);  // a bad NEVA_GEMV is an error even when unused
  if (openblas().aten) return "ATen (oneDNN): NEVA_CPU_BLAS=aten";
  return "neva's GEMV (" + isa + ") up to " + std::to_string(detail::kGemvMaxRows) + " rows, ATen (oneDNN) beyond";
}

namespace {
// What every path past at::linear needs: CPU tensors of x's dtype that autograd does not record,
// a 2-D weight and a 1-D bias that fit, outside an AtenLinearScope and CPU autocast.
bool may_leave_aten(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (!x.defined() || !weight.defined() || !x.device().is_cpu() || !weight.device().is_cpu()) return false;
  if (weight.scalar_type() != x.scalar_type() || weight.dim() != 2 || x.dim() < 1) return false;
  if (bias.defined() && (!bias.device().is_cpu() || bias.scalar_type() != x.scalar_type() || bias.dim() != 1 ||
                         bias.size(0) != weight.size(0))) {
    return false;
  }
  if (at::GradMode::is_enabled() &&
      (x.requires_grad() || weight.requires_grad() || (bias.defined() && bias.requires_grad()))) {
    return false;  // autograd records at::linear
  }
  if (aten_scopes > 0) return false;
  if (at::autocast::is_autocast_enabled(at::kCPU)) return false;  // autocast casts at::linear's inputs
  return !openblas().aten;
}

std::vector<std::int64_t> output_shape(const at::Tensor& x, std::int64_t n) {
  std::vector<std::int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

// fp32 or bf16 with up to kGemvMaxRows rows (decoding): neva's GEMV (gemv.cpp); a GEMM is OpenBLAS's
// (fp32) or oneDNN's (bf16).
std::optional<at::Tensor> gemv_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if ((x.scalar_type() != at::kBFloat16 && x.scalar_type() != at::kFloat) || !may_leave_aten(x, weight, bias)) {
    return std::nullopt;
  }
  const std::int64_t n = weight.size(0), k = weight.size(1);
  if (x.size(-1) != k || k == 0 || n == 0 || !weight.is_contiguous()) return std::nullopt;
  const std::int64_t m = x.numel() / k;
  if (m < 1 || m > detail::kGemvMaxRows) return std::nullopt;
  const at::Tensor y =
      detail::rows_times_weight(x.reshape({m, k}).contiguous(), weight, bias.defined() ? bias.contiguous() : bias);
  return y.view(output_shape(x, n));
}

std::optional<at::Tensor> openblas_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (x.scalar_type() != at::kFloat || !may_leave_aten(x, weight, bias)) return std::nullopt;
  OpenBlas& library = openblas();
  if (!library.loaded()) return std::nullopt;
  const std::int64_t n = weight.size(0), k = weight.size(1);
  if (x.size(-1) != k || !weight.is_contiguous() || !fits_int(n) || !fits_int(k)) return std::nullopt;
  const std::int64_t m = x.numel() / k;
  if (!fits_int(m) || !fits_int(m * n)) return std::nullopt;
  library.single_threaded();

  const at::Tensor input = x.contiguous();
  const std::vector<std::int64_t> shape = output_shape(x, n);
  // A fresh output holding the bias (or zeros) that the product is added to (beta = 1): never
  // bias.expand().contiguous(), which for a single row is the bias itself; never uninitialised memory,
  // which some OpenBLAS releases let through as NaN even with beta = 0.
  at::Tensor y = bias.defined() ? bias.expand(shape).clone(at::MemoryFormat::Contiguous) : at::zeros(shape, x.options());
  const float beta = 1.0f;
  const int M = static_cast<int>(m), K = static_cast<int>(k);
  const float* w = weight.const_data_ptr<float>();
  const float* a = input.const_data_ptr<float>();
  float* out = y.mutable_data_ptr<float>();
  // Each thread its own rows of the weight (columns of y), in units of 64 rows; intra_op_for gives each
  // thread at most one piece (the GEMM then packs its part of the weight once), never more than 32
  // pieces (OpenBLAS's per-call buffers are finite).
  const std::int64_t unit = 64;
  const std::int64_t units = (n + unit - 1) / unit;
  intra_op_for(units, (units + 31) / 32, [&](std::int64_t first, std::int64_t last) {
    const std::int64_t n0 = first * unit, rows = std::min(last * unit, n) - n0;
    library.sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, static_cast<int>(rows), K, 1.0f, a, K, w + n0 * k, K,
                  beta, out + n0, static_cast<int>(n));
  });
  return y;
}
}  // namespace

at::Tensor linear_product(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (auto y = gemv_linear(x, weight, bias)) return *std::move(y);
  if (auto y = openblas_linear(x, weight, bias)) return *std::move(y);
  return at::linear(x, weight, bias);
}

}  // namespace neva::nn
