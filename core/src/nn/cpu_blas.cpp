// fp32 linear layers on the CPU without autograd, through OpenBLAS (Debian's libopenblas0).
//
// Why: the LibTorch wheel's fp32 GEMM is MKL's, and MKL picks slow code paths on AMD processors:
// measured on the project's 2-vCPU EPYC (docs/benchmarks.md, the decode section), MKL's GEMV read
// weights at 16 GB/s where OpenBLAS's read 32 GB/s in the same minute, and OpenBLAS's GEMM was 1.2-1.5x
// MKL's from 4 to 1024 rows. Decoding reads every weight once per token, so the GEMV's bandwidth is the
// decode speed.
//
// How: libopenblas.so.0 is opened with RTLD_LOCAL and only its cblas_* entry points are looked up.
// Both libraries export the Fortran names (sgemm_, sgemv_): linking OpenBLAS normally could bind
// LibTorch's own BLAS calls to it, depending on load order. RTLD_LOCAL keeps OpenBLAS's symbols out of
// the global scope, so LibTorch keeps MKL and only these calls reach OpenBLAS. OpenBLAS runs its own
// thread pool, sized to LibTorch's intra-op threads at each call.
//
// When: by default only when OMP_WAIT_POLICY is "passive" (neva-run sets it: prefer_passive_openmp).
// With libgomp's default spinning wait LibTorch's idle OpenMP threads hold the cores OpenBLAS's threads
// need, and the switch is slower than MKL; a program embedding libneva_core without that setting keeps
// at::linear. NEVA_CPU_BLAS=openblas forces OpenBLAS (an error when it cannot be opened),
// NEVA_CPU_BLAS=aten forces at::linear (bitwise LibTorch's results). Never while autograd records,
// under CPU autocast, inside a parallel region or an AtenLinearScope: at::linear's then.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <cblas.h>
#include <dlfcn.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <cstdlib>
#include <strings.h>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "bf16_gemv.h"
#include "neva/error.h"
#include "neva/nn/linear.h"

namespace neva::nn {

namespace {

struct OpenBlas {
  decltype(&cblas_sgemm) sgemm = nullptr;
  decltype(&cblas_sgemv) sgemv = nullptr;
  decltype(&openblas_set_num_threads) set_num_threads = nullptr;
  decltype(&openblas_get_config) config = nullptr;
  std::atomic<int> threads{0};
  std::mutex resizing;

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
      error = "NEVA_CPU_BLAS is '" + wanted + "': expected 'openblas' or 'aten' (or unset: OpenBLAS when installed " +
              "and OMP_WAIT_POLICY is passive)";
      return;
    }
    if (wanted.empty()) {
      const char* policy = std::getenv("OMP_WAIT_POLICY");
      if (!policy || ::strcasecmp(policy, "passive") != 0) {
        why_not = "OMP_WAIT_POLICY is not passive";
        return;
      }
    }
    void* handle = ::dlopen("libopenblas.so.0", RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
      why_not = "libopenblas.so.0 not found";
      if (!wanted.empty()) error = std::string("NEVA_CPU_BLAS=openblas, but libopenblas.so.0 cannot be opened: ") + ::dlerror();
      return;
    }
    sgemm = reinterpret_cast<decltype(sgemm)>(::dlsym(handle, "cblas_sgemm"));
    sgemv = reinterpret_cast<decltype(sgemv)>(::dlsym(handle, "cblas_sgemv"));
    set_num_threads = reinterpret_cast<decltype(set_num_threads)>(::dlsym(handle, "openblas_set_num_threads"));
    config = reinterpret_cast<decltype(config)>(::dlsym(handle, "openblas_get_config"));
    if (!sgemm || !sgemv || !set_num_threads || !config) {
      sgemm = nullptr;  // not OpenBLAS: unused
      if (!wanted.empty()) error = "NEVA_CPU_BLAS=openblas, but libopenblas.so.0 lacks cblas_sgemm/cblas_sgemv";
    }
  }
  bool loaded() const { return sgemm != nullptr; }

  // OpenBLAS's pool follows LibTorch's intra-op thread count (at::set_num_threads, OMP_NUM_THREADS).
  void follow_threads() {
    const int wanted = at::get_num_threads();
    if (threads.load(std::memory_order_relaxed) == wanted) return;
    std::lock_guard<std::mutex> lock(resizing);
    if (threads.load() == wanted) return;
    set_num_threads(wanted);
    threads.store(wanted);
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

std::string cpu_bf16_gemv_name() {
  const std::string isa = detail::bf16_gemv_isa();  // a bad NEVA_BF16_GEMV is an error even when unused
  if (openblas().aten) return "ATen (oneDNN): NEVA_CPU_BLAS=aten";
  return "neva's GEMV (" + isa + ") up to " + std::to_string(detail::kBf16GemvMaxRows) + " rows, ATen (oneDNN) beyond";
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

// bf16 with up to kBf16GemvMaxRows rows (decoding): neva's GEMV (bf16_gemv.cpp); a GEMM stays oneDNN's.
std::optional<at::Tensor> bf16_gemv_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (x.scalar_type() != at::kBFloat16 || !may_leave_aten(x, weight, bias)) return std::nullopt;
  const std::int64_t n = weight.size(0), k = weight.size(1);
  if (x.size(-1) != k || k == 0 || n == 0 || !weight.is_contiguous()) return std::nullopt;
  const std::int64_t m = x.numel() / k;
  if (m < 1 || m > detail::kBf16GemvMaxRows) return std::nullopt;
  const at::Tensor y = detail::bf16_rows_times_weight(x.reshape({m, k}).contiguous(), weight,
                                                      bias.defined() ? bias.contiguous() : bias);
  return y.view(output_shape(x, n));
}

std::optional<at::Tensor> openblas_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (x.scalar_type() != at::kFloat || !may_leave_aten(x, weight, bias)) return std::nullopt;
  if (at::in_parallel_region()) return std::nullopt;  // no second pool inside LibTorch's threads
  OpenBlas& library = openblas();
  if (!library.loaded()) return std::nullopt;
  const std::int64_t n = weight.size(0), k = weight.size(1);
  if (x.size(-1) != k || !weight.is_contiguous() || !fits_int(n) || !fits_int(k)) return std::nullopt;
  const std::int64_t m = x.numel() / k;
  if (!fits_int(m) || !fits_int(m * n)) return std::nullopt;
  library.follow_threads();

  const at::Tensor input = x.contiguous();
  const std::vector<std::int64_t> shape = output_shape(x, n);
  // A fresh output holding the bias (or zeros) that the product is added to (beta = 1): never
  // bias.expand().contiguous(), which for a single row is the bias itself; never uninitialised memory,
  // which some OpenBLAS releases let through as NaN even with beta = 0.
  at::Tensor y = bias.defined() ? bias.expand(shape).clone(at::MemoryFormat::Contiguous) : at::zeros(shape, x.options());
  const float beta = 1.0f;
  const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
  if (m == 1) {
    library.sgemv(CblasRowMajor, CblasNoTrans, N, K, 1.0f, weight.const_data_ptr<float>(), K,
                  input.const_data_ptr<float>(), 1, beta, y.mutable_data_ptr<float>(), 1);
  } else {
    library.sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, input.const_data_ptr<float>(), K,
                  weight.const_data_ptr<float>(), K, beta, y.mutable_data_ptr<float>(), N);
  }
  return y;
}
}  // namespace

void prefer_passive_openmp(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return;  // the user's choice, or already re-executed
  if (::setenv("OMP_WAIT_POLICY", "passive", 1) != 0) return;
  ::execv("/proc/self/exe", argv);  // returns only on failure: then run on as started
  ::unsetenv("OMP_WAIT_POLICY");
}

at::Tensor linear_product(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (auto y = openblas_linear(x, weight, bias)) return *std::move(y);
  if (auto y = bf16_gemv_linear(x, weight, bias)) return *std::move(y);
  return at::linear(x, weight, bias);
}

}  // namespace neva::nn
