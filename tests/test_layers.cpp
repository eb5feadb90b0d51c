// neva::nn's factories and the context: at tensor-parallel size 1 a factory layer is its torch::nn
// counterpart bitwise, every parameter says how it is sharded, initialisation comes from the
// context's generator alone, and nothing in core or the plugins creates a layer any other way.
#include <doctest/doctest.h>

#include "neva/nn/attention.h"
#include "neva/nn/module.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "neva/context.h"
#include "neva/error.h"
#include "neva/model/decoder.h"
#include "neva/nn/linear.h"
#include "neva/nn/mlp.h"
#include "neva/nn/recompute.h"
#include "neva/nn/intra_op.h"
#include "neva/nn/module.h"
#include "test_support.h"
#include "tiny_decoder.h"

namespace {

namespace fs = std::filesystem;

using neva::test::tiny_decoder;

}  // namespace

TEST_CASE("at tensor-parallel size 1, neva::nn's linear, embedding and conv2d are torch::nn's, bitwise") {
  // torch::nn draws from the global generator seeded with 7, neva::nn from a context seeded with 7:
  // the same stream, so the same weights when the formulas are the same.
  for (bool bias : {true, false}) {
    at::manual_seed(7);
    torch::nn::Linear reference(torch::nn::LinearOptions(24, 10).bias(bias));
    auto linear = neva::nn::linear(neva::RuntimeContext::seeded(7), 24, 10, {bias});
    CHECK(at::equal(linear->weight, reference->weight));
    CHECK(linear->bias.defined() == bias);
    if (bias) CHECK(at::equal(linear->bias, reference->bias));
    const at::Tensor x = at::randn({3, 5, 24});
    CHECK(at::equal(linear->forward(x), reference->forward(x)));
    CHECK(linear->named_parameters().size() == reference->named_parameters().size());
  }
  at::manual_seed(8);
  torch::nn::Embedding reference_embedding(40, 12);
  auto embedding = neva::nn::embedding(neva::RuntimeContext::seeded(8), 40, 12);
  CHECK(at::equal(embedding->weight, reference_embedding->weight));
  const at::Tensor ids = at::randint(0, 40, {2, 6}, at::kLong);
  CHECK(at::equal(embedding->forward(ids), reference_embedding->forward(ids)));

  for (bool bias : {true, false}) {
    at::manual_seed(9);
    torch::nn::Conv2d reference_conv(torch::nn::Conv2dOptions(3, 16, 4).stride(4).bias(bias));
    auto conv = neva::nn::conv2d(neva::RuntimeContext::seeded(9), 3, 16, 4, 4, bias);
    CHECK(at::equal(conv->weight, reference_conv->weight));
    if (bias) CHECK(at::equal(conv->bias, reference_conv->bias));
    const at::Tensor image = at::randn({2, 3, 16, 16});
    CHECK(at::equal(conv->forward(image), reference_conv->forward(image)));
  }
}

TEST_CASE("without autograd, fp32 linear layers of more than 8 rows on the CPU go through OpenBLAS: the product to fp32 rounding, in every layout") {
  // scripts/setup.sh installs Debian's libopenblas: then OpenBLAS computes, whatever the OpenMP wait
  // policy; NEVA_CPU_BLAS=aten (at::linear always) is the one way out.
  const char* choice = std::getenv("NEVA_CPU_BLAS");
  const std::string blas = neva::nn::cpu_blas_name();
  CAPTURE(blas);
  if (choice && std::string(choice) == "aten") CHECK(blas == "ATen (MKL): NEVA_CPU_BLAS=aten");
  else CHECK(blas.rfind("OpenBLAS (", 0) == 0);
  auto linear = neva::nn::linear(neva::RuntimeContext::seeded(3), 37, 19, {true});
  // (Up to 8 rows are neva's GEMV's: the cases below.)
  const at::Tensor wide = at::randn({12, 37, 6});
  const std::vector<at::Tensor> inputs = {at::randn({9, 37}), at::randn({2, 5, 37}), wide.select(2, 1), wide.transpose(1, 2)};
  for (const at::Tensor& x : inputs) {
    for (bool bias : {true, false}) {
      const at::Tensor b = bias ? linear->bias : at::Tensor();
      const at::Tensor exact = at::linear(x.to(at::kDouble), linear->weight.to(at::kDouble), bias ? b.to(at::kDouble) : b);
      at::Tensor fast;
      {
        at::NoGradGuard no_grad;
        fast = neva::nn::linear_product(x, linear->weight, b);
        if (bias) CHECK(at::equal(linear->forward(x), fast));
      }
      CAPTURE(x.sizes());
      CHECK(fast.sizes() == exact.sizes());
      CHECK((fast.scalar_type() == at::kFloat));
      CHECK(!fast.requires_grad());
      CHECK((fast.to(at::kDouble) - exact).abs().max().item<double>() < 1e-5);
      // Recorded by autograd: at::linear itself, bitwise, with its gradient.
      const at::Tensor recorded = neva::nn::linear_product(x, linear->weight, b);
      CHECK(recorded.requires_grad());
      CHECK(at::equal(recorded, at::linear(x, linear->weight, b)));
    }
  }
  // Products split over two threads by rows of the weight, the last piece partial: one piece per thread
  // (128 + 22 rows); the same on one thread.
  const int threads = at::get_num_threads();
  auto tall = neva::nn::linear(neva::RuntimeContext::seeded(4), 300, 150, {true});
  for (const int use : {2, 1}) {
    at::set_num_threads(use);
    for (const std::int64_t rows : {9, 40}) {
      at::NoGradGuard no_grad;
      const at::Tensor x = at::randn({rows, 300});
      const at::Tensor exact = at::linear(x.to(at::kDouble), tall->weight.to(at::kDouble), tall->bias.to(at::kDouble));
      CAPTURE(use);
      CAPTURE(rows);
      CHECK((neva::nn::linear_product(x, tall->weight, tall->bias).to(at::kDouble) - exact).abs().max().item<double>() < 1e-5);
    }
  }
  at::set_num_threads(threads);
  // Other dtypes are at::linear's, and so is everything under autocast (it casts at::linear's inputs) or
  // in an AtenLinearScope (activation recomputation's first pass).
  at::NoGradGuard no_grad;
  {
    neva::nn::AtenLinearScope exact;
    const at::Tensor wide_input = at::randn({9, 37});
    CHECK(at::equal(neva::nn::linear_product(wide_input, linear->weight), at::linear(wide_input, linear->weight)));
  }
  {
    at::autocast::set_autocast_enabled(at::kCPU, true);
    at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
    const at::Tensor cast = neva::nn::linear_product(inputs[2], linear->weight, linear->bias);
    const at::Tensor reference = at::linear(inputs[2], linear->weight, linear->bias);
    at::autocast::set_autocast_enabled(at::kCPU, false);
    at::autocast::clear_cache();
    CHECK((cast.scalar_type() == at::kBFloat16));
    CHECK(at::equal(cast, reference));
  }
  const at::Tensor x = at::randn({3, 37}, at::kDouble);
  CHECK(at::equal(neva::nn::linear_product(x, linear->weight.to(at::kDouble)), at::linear(x, linear->weight.to(at::kDouble))));
}

TEST_CASE("neva's own CPU kernels split their work over LibTorch's intra-op threads") {
  // at::parallel_for called from a translation unit built without -fopenmp runs the whole range on the
  // caller's thread, silently; neva's kernels (the bf16 GEMV) go through intra_op_for, built with it.
  const int before = at::get_num_threads();
  at::set_num_threads(2);
  std::mutex mutex;
  std::set<std::thread::id> threads;
  std::int64_t covered = 0;
  neva::nn::intra_op_for(64, 8, [&](std::int64_t first, std::int64_t last) {
    std::lock_guard<std::mutex> lock(mutex);
    threads.insert(std::this_thread::get_id());
    covered += last - first;
  });
  at::set_num_threads(before);
  CHECK(covered == 64);
  CHECK(threads.size() == 2);
  // One grain of work or less stays on the caller's thread.
  threads.clear();
  neva::nn::intra_op_for(5, 8, [&](std::int64_t, std::int64_t) { threads.insert(std::this_thread::get_id()); });
  CHECK(threads.size() == 1);
  at::set_num_threads(2);
  // Nested inside a chunk: that chunk's thread runs the inner range itself, whole.
  std::int64_t nested = 0;
  neva::nn::intra_op_for(2, 1, [&](std::int64_t first, std::int64_t) {
    if (first != 0) return;
    const std::thread::id outer = std::this_thread::get_id();
    neva::nn::intra_op_for(64, 1, [&](std::int64_t a, std::int64_t b) {
      CHECK(std::this_thread::get_id() == outer);
      nested += b - a;
    });
  });
  CHECK(nested == 64);
  // A chunk's exception reaches the caller once the region has ended.
  CHECK_THROWS_WITH_AS(neva::nn::intra_op_for(64, 8,
                                              [&](std::int64_t first, std::int64_t) {
                                                if (first > 0) throw neva::Error("second chunk failed");
                                              }),
                       "second chunk failed", neva::Error);
  at::set_num_threads(before);
}

namespace {
// neva's GEMV against the float64 product of the same values: it sums in fp32 (and rounds bf16 results
// once, to nearest even), so it is within the fp32 sum's error bound of the reference (plus half a bf16
// step for bf16). tests/CMakeLists.txt runs both dtypes' cases again under NEVA_GEMV=avx2 and =scalar.
void check_gemv(at::ScalarType dtype) {
  const bool bf16 = dtype == at::kBFloat16;
  const char* choice = std::getenv("NEVA_CPU_BLAS");
  const bool aten = choice && std::string(choice) == "aten";
  const std::string kernel = bf16 ? neva::nn::cpu_bf16_gemv_name() : neva::nn::cpu_fp32_gemv_name();
  CAPTURE(kernel);
  CHECK(kernel.rfind(aten ? "ATen (" : "neva's GEMV (", 0) == 0);
  // The kernel NEVA_GEMV allows is the one named (bf16 at avx512: AVX512-BF16 where the CPU has it); the
  // scalar one sums in k's order, which the test repeats below to the bit (proof that it, not a
  // library, computed).
  const char* asked = std::getenv("NEVA_GEMV");
  const std::string wanted = asked ? asked : "";
  const std::map<std::string, std::string> names = {
      {"avx512", bf16 ? "AVX512-BF16" : "AVX-512"}, {"avx2", "AVX2"}, {"scalar", "scalar"}};
  if (!aten && names.count(wanted) && !(bf16 && wanted == "avx512")) {
    CHECK(kernel.find("(" + names.at(wanted) + ")") != std::string::npos);
  }
  const bool scalar = !aten && wanted == "scalar";
  at::manual_seed(5);
  at::NoGradGuard no_grad;
  // K: fewer than a vector step, whole vector steps, a tail, a decoder's width; N: fewer rows than a
  // block, a whole block of 8 and one more, several blocks.
  for (const std::int64_t k : {5, 64, 100, 2048}) {
    for (const std::int64_t n : {1, 7, 8, 9, 64}) {
      const at::Tensor weight = at::randn({n, k}).to(dtype);
      const at::Tensor bias = at::randn({n}).to(dtype);
      for (const std::int64_t m : {1, 2, 3, 4, 5, 8}) {
        for (bool with_bias : {true, false}) {
          const at::Tensor b = with_bias ? bias : at::Tensor();
          const at::Tensor x = at::randn({m, k}).to(dtype);
          const at::Tensor exact =
              at::linear(x.to(at::kDouble), weight.to(at::kDouble), with_bias ? b.to(at::kDouble) : b);
          const at::Tensor fast = neva::nn::linear_product(x, weight, b);
          CAPTURE(k);
          CAPTURE(n);
          CAPTURE(m);
          CAPTURE(with_bias);
          REQUIRE(fast.sizes() == exact.sizes());
          CHECK((fast.scalar_type() == dtype));
          // The fp32 sum's error bound, plus half a bf16 step (2^-8 of the value) for bf16.
          const at::Tensor magnitude =
              at::linear(x.to(at::kDouble).abs(), weight.to(at::kDouble).abs(), with_bias ? b.to(at::kDouble).abs() : b);
          const at::Tensor allowed =
              (bf16 ? exact.abs() * std::ldexp(1.0, -8) : at::zeros_like(exact)) + magnitude * (k + 1) * std::ldexp(1.0, -24);
          CHECK(((fast.to(at::kDouble) - exact).abs() <= allowed).all().item<bool>());
          // And LibTorch's at::linear (oneDNN, MKL) agrees as closely.
          const at::Tensor library = at::linear(x, weight, b).to(at::kDouble);
          CHECK(((fast.to(at::kDouble) - library).abs() <= 2 * allowed).all().item<bool>());
          if (scalar) {  // the scalar kernel's sums, in its order: fp32, k ascending, bias last, one rounding
            const at::Tensor xs = x.to(at::kFloat).contiguous(), ws = weight.to(at::kFloat).contiguous();
            const float* xv = xs.const_data_ptr<float>();
            const float* wv = ws.const_data_ptr<float>();
            at::Tensor ordered = at::empty({m, n}, at::kFloat);
            for (std::int64_t i = 0; i < m; ++i) {
              for (std::int64_t j = 0; j < n; ++j) {
                float sum = 0.0f;
                for (std::int64_t l = 0; l < k; ++l) sum += xv[i * k + l] * wv[j * k + l];
                if (with_bias) sum += bias[j].item<float>();
                ordered[i][j] = sum;
              }
            }
            CHECK(at::equal(fast, ordered.to(dtype)));
          }
        }
      }
    }
  }
  const at::Tensor weight = at::randn({24, 40}).to(dtype);
  const at::Tensor rows = at::randn({3, 40}).to(dtype);
  if (!aten) {  // properties of neva's GEMV (LibTorch's GEMV and GEMM paths round differently)
    // Layouts: a vector, a [batch, 1, K] decode step, a non-contiguous input: the same values as
    // contiguous rows.
    const at::Tensor reference = neva::nn::linear_product(rows, weight);
    CHECK(at::equal(neva::nn::linear_product(rows[1], weight), reference[1]));
    CHECK(at::equal(neva::nn::linear_product(rows.view({3, 1, 40}), weight), reference.view({3, 1, 24})));
    const at::Tensor spread = at::empty({40, 3}, dtype).t().copy_(rows);
    CHECK(!spread.is_contiguous());
    CHECK(at::equal(neva::nn::linear_product(spread, weight), reference));
    // A row's sums do not depend on the rows beside it (every row through the same tile order, 1 to 8
    // rows): a sequence decodes to the same bits alone or batched.
    const at::Tensor eight = at::randn({8, 100}).to(dtype);
    const at::Tensor uneven = at::randn({19, 100}).to(dtype);  // two blocks of 8 and a partial one
    const at::Tensor together = neva::nn::linear_product(eight, uneven);
    for (std::int64_t m = 1; m < 8; ++m) {
      CAPTURE(m);
      CHECK(at::equal(neva::nn::linear_product(eight.narrow(0, 8 - m, m), uneven), together.narrow(0, 8 - m, m)));
    }
  }
  // More than 8 rows is a GEMM: oneDNN's for bf16, bitwise (fp32: OpenBLAS's, the case above); so is
  // anything under autograd or in an AtenLinearScope (at::linear's).
  const at::Tensor many = at::randn({9, 40}).to(dtype);
  if (bf16) CHECK(at::equal(neva::nn::linear_product(many, weight), at::linear(many, weight)));
  {
    neva::nn::AtenLinearScope exact;
    CHECK(at::equal(neva::nn::linear_product(rows, weight), at::linear(rows, weight)));
  }
  {
    at::AutoGradMode recording(true);
    const at::Tensor trained = weight.clone().requires_grad_(true);
    const at::Tensor recorded = neva::nn::linear_product(rows, trained);
    CHECK(recorded.requires_grad());
    CHECK(at::equal(recorded, at::linear(rows, weight)));
  }
}
}  // namespace

TEST_CASE("without autograd, bf16 linear layers of up to 8 rows on the CPU go through neva's GEMV: the product to bf16 rounding") {
  check_gemv(at::kBFloat16);
}

TEST_CASE("without autograd, fp32 linear layers of up to 8 rows on the CPU go through neva's GEMV: the product to fp32 rounding") {
  check_gemv(at::kFloat);
}

TEST_CASE("inside UninitialisedParameters nothing is drawn: the generator stays where it was") {
  const neva::RuntimeContext skipped = neva::RuntimeContext::seeded(4), fresh = neva::RuntimeContext::seeded(4);
  {
    neva::nn::UninitialisedParameters loaded_next;
    auto unused = neva::nn::linear(skipped, 16, 8, {true});
    CHECK(unused->weight.sizes() == at::IntArrayRef({8, 16}));
    CHECK(unused->bias.sizes() == at::IntArrayRef({8}));
    CHECK(neva::nn::embedding(skipped, 10, 4)->weight.sizes() == at::IntArrayRef({10, 4}));
    // Allocated in the dtype the model holds its weights in: its conversion is then a no-op, and the
    // memory stays untouched until a checkpoint fills it (drawn weights are fp32, then converted).
    neva::RuntimeContext bf16 = neva::RuntimeContext::seeded(4);
    bf16.dtypes.params = at::kBFloat16;
    auto held = neva::nn::linear(bf16, 16, 8, {true});
    CHECK((held->weight.scalar_type() == at::kBFloat16));
    CHECK((held->bias.scalar_type() == at::kBFloat16));
  }
  // Afterwards (and in an inactive scope) every draw is what a fresh generator gives.
  neva::nn::UninitialisedParameters inactive(false);
  CHECK(at::equal(neva::nn::linear(skipped, 16, 8, {true})->weight, neva::nn::linear(fresh, 16, 8, {true})->weight));
  CHECK(at::equal(neva::nn::embedding(skipped, 10, 4)->weight, neva::nn::embedding(fresh, 10, 4)->weight));
}

TEST_CASE("every parameter of a decoder says how it would be split over tensor parallelism and to which expert it belongs") {
  for (const std::string mlp : {"gated", "moe"}) {
    neva::DecoderBackbone backbone(tiny_decoder(mlp), neva::RuntimeContext::seeded(1));
    std::map<std::string, neva::nn::ParameterSharding> shardings;
    for (auto& [name, sharding] : neva::nn::parameter_shardings(backbone)) shardings[name] = sharding;
    CHECK(shardings.size() == backbone.named_parameters().size());
    auto dim = [&](const std::string& name) {
      REQUIRE_MESSAGE(shardings.count(name), name);
      return shardings.at(name).tensor_parallel_dim;
    };
    CHECK(dim("model.embed_tokens.weight") == 0);  // vocabulary-parallel rows
    CHECK(dim("lm_head.weight") == 0);
    CHECK(dim("model.norm.weight") == -1);
    for (const std::string projection : {"q_proj", "k_proj", "v_proj"}) {
      CHECK(dim("model.layers.1.self_attn." + projection + ".weight") == 0);  // column: heads split
    }
    CHECK(dim("model.layers.1.self_attn.o_proj.weight") == 1);  // row: its input split
    CHECK(dim("model.layers.0.input_layernorm.weight") == -1);
    if (mlp == "gated") {
      CHECK(dim("model.layers.0.mlp.gate_proj.weight") == 0);
      CHECK(dim("model.layers.0.mlp.up_proj.weight") == 0);
      CHECK(dim("model.layers.0.mlp.down_proj.weight") == 1);
      for (auto& [name, sharding] : shardings) CHECK_MESSAGE(sharding.expert == -1, name);
    } else {
      CHECK(shardings.at("model.layers.0.block_sparse_moe.gate.weight").expert == -1);  // the router is dense
      CHECK(dim("model.layers.0.block_sparse_moe.gate.weight") == -1);
      for (std::int64_t e = 0; e < tiny_decoder("moe").num_experts; ++e) {
        for (const std::string w : {"w1", "w2", "w3"}) {
          const std::string name = "model.layers.1.block_sparse_moe.experts." + std::to_string(e) + "." + w + ".weight";
          CHECK_MESSAGE(shardings.at(name).expert == e, name);
        }
      }
      CHECK(dim("model.layers.3.block_sparse_moe.experts.2.w2.weight") == 1);
    }
    for (auto& [name, sharding] : shardings) CHECK_MESSAGE(sharding.pipeline_stage == 0, name);
    neva::nn::set_pipeline_stage(backbone, 1);
    for (auto& [name, sharding] : neva::nn::parameter_shardings(backbone)) CHECK_MESSAGE(sharding.pipeline_stage == 1, name);
  }
}

TEST_CASE("a model's initialisation comes from its context's generator alone, drawn in construction order") {
  auto parameters = [](const neva::DecoderBackbone& backbone) {
    std::vector<at::Tensor> out;
    for (const auto& item : backbone.named_parameters()) out.push_back(item.value().clone());
    return out;
  };
  at::manual_seed(1);
  auto first = parameters(neva::DecoderBackbone(tiny_decoder("moe"), neva::RuntimeContext::seeded(3)));
  at::manual_seed(2);  // the global generator plays no part
  auto second = parameters(neva::DecoderBackbone(tiny_decoder("moe"), neva::RuntimeContext::seeded(3)));
  auto other = parameters(neva::DecoderBackbone(tiny_decoder("moe"), neva::RuntimeContext::seeded(4)));
  REQUIRE(first.size() == second.size());
  bool all_same_seed_equal = true, any_other_seed_differs = false;
  for (std::size_t i = 0; i < first.size(); ++i) {
    all_same_seed_equal = all_same_seed_equal && at::equal(first[i], second[i]);
    any_other_seed_differs = any_other_seed_differs || !at::equal(first[i], other[i]);
  }
  CHECK(all_same_seed_equal);
  CHECK(any_other_seed_differs);

  // Copies of a context share one stream: two layers built from copies differ, as two layers of one model do.
  const neva::RuntimeContext context = neva::RuntimeContext::seeded(5);
  const neva::RuntimeContext copy = context;
  auto a = neva::nn::linear(context, 8, 8), b = neva::nn::linear(copy, 8, 8);
  CHECK_FALSE(at::equal(a->weight, b->weight));
}

TEST_CASE("marking the parameters of a module that is not built from neva::nn is refused by name") {
  torch::nn::Linear plain(4, 4);
  CHECK_THROWS_WITH_AS(neva::nn::set_expert(*plain, 0),
                       doctest::Contains("is not a neva::nn::Module (build it with neva::nn's factories)"), neva::Error);
  CHECK_THROWS_WITH_AS(neva::nn::linear(neva::RuntimeContext{}, 0, 4), "a linear layer needs positive sizes, got 0 -> 4",
                       neva::Error);
}

TEST_CASE("core, the plugins and the example create linear layers, embeddings, convolutions and norms only through neva::nn, and draw no global random numbers") {
  const fs::path root = neva::test::source_directory();
  // torch::nn's layer classes (and their option structs) and the global generator.
  const std::regex layer(R"(torch::nn::(Linear|Bilinear|Embedding|EmbeddingBag|Conv[123]d|ConvTranspose[123]d|LayerNorm|GroupNorm)(Options)?\b)");
  const std::regex global_random(R"(\b(at|torch)::(manual_seed|randn|rand|randint|randperm|normal|bernoulli)\s*\(|getDefaultCPUGenerator)");
  std::vector<std::string> offences;
  std::size_t files = 0;
  for (const char* directory : {"core", "plugins", "examples"}) {
    for (const auto& entry : fs::recursive_directory_iterator(root / directory)) {
      const auto extension = entry.path().extension();
      if (!entry.is_regular_file() || (extension != ".cpp" && extension != ".h")) continue;
      ++files;
      std::ifstream in(entry.path());
      std::string line;
      for (int number = 1; std::getline(in, line); ++number) {
        // Comments and messages may name them: string literals emptied, then the comment cut.
        const std::string bare = std::regex_replace(line, std::regex(R"("(?:[^"\\]|\\.)*")"), "\"\"");
        const std::string code = bare.substr(0, bare.find("//"));
        // precision.cpp recognises third-party torch::nn layers by type (dynamic_cast): not a creation.
        if (code.find("dynamic_cast") != std::string::npos) continue;
        std::smatch match;
        if (std::regex_search(code, match, layer) || std::regex_search(code, match, global_random)) {
          offences.push_back(fs::relative(entry.path(), root).string() + ":" + std::to_string(number) + ": " +
                             match.str());
        }
      }
    }
  }
  CHECK(files > 50);
  std::ostringstream list;
  for (const auto& offence : offences) list << "\n  " << offence;
  CHECK_MESSAGE(offences.empty(), "created outside neva::nn or drawn from the global generator:" << list.str());
}

TEST_CASE("tensor parallelism: heads split whole, KV heads fewer than the ranks are replicated, and shards round-trip") {
  auto split = neva::split_heads(32, 8, 4);
  CHECK((split.heads == 8 && split.kv_heads == 2 && split.kv_replicas == 1));
  split = neva::split_heads(32, 2, 8);  // two KV heads over eight ranks: each on four
  CHECK((split.heads == 4 && split.kv_heads == 1 && split.kv_replicas == 4));
  CHECK_THROWS_WITH_AS(neva::split_heads(4, 4, 3), doctest::Contains("4 attention heads do not split over 3 tensor-parallel ranks"),
                       neva::Error);
  CHECK_THROWS_WITH_AS(neva::split_heads(24, 3, 4), doctest::Contains("3 KV heads do not split over 4 tensor-parallel ranks"),
                       neva::Error);
  // A decoder's sizes, checked before it is built: heads, KV heads, FFN; its config.json named.
  neva::DecoderConfig config = neva::test::tiny_decoder();  // 4 heads, 2 KV heads, FFN 128
  CHECK_NOTHROW(neva::check_tensor_parallel_split(config, 4));
  CHECK_THROWS_WITH_AS(neva::check_tensor_parallel_split(config, 3),
                       "test: 4 attention heads do not split over 3 tensor-parallel ranks (num_attention_heads must be "
                       "a multiple of tensor_model_parallel_size)",
                       neva::Error);
  config.intermediate_size = 130;
  CHECK_THROWS_WITH_AS(neva::check_tensor_parallel_split(config, 4),
                       doctest::Contains("test: intermediate_size 130 does not split over 4 tensor-parallel ranks"), neva::Error);
  // shard_of: an even split, a padded vocabulary (the padding rows zero), a strided (fused) split and
  // a shard shared by two ranks.
  const at::Tensor whole = torch::arange(10 * 3, at::kFloat).view({10, 3});
  neva::nn::ParameterSharding rows;
  rows.tensor_parallel_dim = 0;
  CHECK(torch::equal(neva::nn::shard_of(whole, rows, 1, 2, 5), whole.narrow(0, 5, 5)));
  neva::nn::ParameterSharding padded = rows;
  padded.logical_size = 10;
  const at::Tensor last = neva::nn::shard_of(whole, padded, 2, 3, 4);  // rows 8, 9 and two zero rows
  CHECK(torch::equal(last.narrow(0, 0, 2), whole.narrow(0, 8, 2)));
  CHECK(last.narrow(0, 2, 2).abs().sum().item<float>() == 0);
  neva::nn::ParameterSharding strided = rows;
  strided.partition_stride = 2;  // [gate; up] of 6 rows each, each split in two
  const at::Tensor fused = torch::arange(12 * 3, at::kFloat).view({12, 3});
  CHECK(torch::equal(neva::nn::shard_of(fused, strided, 1, 2, 6),
                     torch::cat({fused.narrow(0, 3, 3), fused.narrow(0, 9, 3)})));
  neva::nn::ParameterSharding shared = rows;
  shared.tensor_parallel_replicas = 2;  // ranks 2 and 3 of 4 hold the second half
  CHECK(torch::equal(neva::nn::shard_of(whole, shared, 3, 4, 5), whole.narrow(0, 5, 5)));
  CHECK(neva::nn::whole_shape(last, padded, 3) == std::vector<std::int64_t>{10, 3});
  CHECK(neva::nn::whole_shape(neva::nn::shard_of(whole, shared, 0, 4, 5), shared, 4) == std::vector<std::int64_t>{10, 3});
}

TEST_CASE("MoE token dropping: Megatron's capacity ceil(tokens x top_k / experts x factor), by probability or position") {
  // A naive reference in the test: every expert's assignments listed, sorted by the policy, cut at
  // the capacity; each token's output the weighted sum of its kept experts' outputs (weights as
  // routed, not renormalised), as megatron.core's topk_softmax_with_capacity + the dispatcher.
  const std::int64_t hidden = 8, experts = 4, top_k = 2, tokens = 10;
  neva::RuntimeContext context = neva::RuntimeContext::seeded(21);
  neva::SparseMoE moe(context, hidden, 16, experts, top_k, "silu");
  moe.to(at::kDouble);
  const at::Tensor x = at::randn({1, tokens, hidden}, neva::make_generator(5), at::kDouble);
  std::map<std::string, at::Tensor> parameters;
  for (const auto& item : moe.named_parameters()) parameters[item.key()] = item.value();
  std::map<std::int64_t, std::shared_ptr<neva::GatedMLP>> expert_modules;
  for (const auto& item : moe.named_modules("", /*include_self=*/false)) {
    const std::string prefix = "experts.";
    if (item.key().rfind(prefix, 0) == 0 && item.key().find('.', prefix.size()) == std::string::npos) {
      expert_modules[std::stoll(item.key().substr(prefix.size()))] = std::dynamic_pointer_cast<neva::GatedMLP>(item.value());
    }
  }
  REQUIRE(expert_modules.size() == static_cast<std::size_t>(experts));
  auto reference = [&](double factor, bool by_probability, std::int64_t* dropped) {
    at::NoGradGuard no_grad;
    const at::Tensor flat = x.reshape({tokens, hidden});
    // The routing softmax in fp32, as transformers' Mixtral computes it.
    const at::Tensor probabilities = at::linear(flat, parameters.at("gate.weight")).softmax(-1, at::kFloat);
    const auto routed = probabilities.topk(top_k, -1);
    const at::Tensor selected = std::get<1>(routed);
    const at::Tensor weights = (std::get<0>(routed) / std::get<0>(routed).sum(-1, true)).to(at::kDouble);
    const auto capacity = static_cast<std::size_t>(std::ceil(double(tokens * top_k) / double(experts) * factor));
    at::Tensor out = at::zeros_like(flat);
    *dropped = 0;
    for (std::int64_t e = 0; e < experts; ++e) {
      std::vector<std::pair<std::int64_t, std::int64_t>> mine;  // (token, slot), token-major
      for (std::int64_t t = 0; t < tokens; ++t) {
        for (std::int64_t s = 0; s < top_k; ++s) {
          if (selected[t][s].item<std::int64_t>() == e) mine.emplace_back(t, s);
        }
      }
      if (by_probability) {
        std::stable_sort(mine.begin(), mine.end(), [&](const std::pair<std::int64_t, std::int64_t>& a, const std::pair<std::int64_t, std::int64_t>& b) {
          return weights[a.first][a.second].item<double>() > weights[b.first][b.second].item<double>();
        });
      }
      if (mine.size() > capacity) {
        *dropped += static_cast<std::int64_t>(mine.size() - capacity);
        mine.resize(capacity);
      }
      for (const auto& [t, s] : mine) {
        out[t] += weights[t][s] * expert_modules.at(e)->forward(flat[t].unsqueeze(0))[0];
      }
    }
    return out.reshape({1, tokens, hidden});
  };
  for (const double factor : {0.5, 0.75, 100.0}) {
    for (const std::string policy : {"probs", "position"}) {
      CAPTURE(factor);
      CAPTURE(policy);
      moe.set_capacity(factor, policy);
      std::int64_t expected_dropped = 0;
      const at::Tensor expected = reference(factor, policy == "probs", &expected_dropped);
      const at::Tensor got = moe.forward(x);
      CHECK((got - expected).abs().max().item<double>() < 1e-12);
      CHECK(moe.take_dropped() == expected_dropped);
      CHECK(moe.take_dropped() == 0);  // taken
      if (factor == 0.5) CHECK(expected_dropped > 0);
      if (factor == 100.0) CHECK(expected_dropped == 0);
    }
  }
  {  // A recomputed forward (activation checkpointing) counts its drops once, not twice.
    moe.set_capacity(0.5, "probs");
    std::int64_t expected_dropped = 0;
    (void)reference(0.5, true, &expected_dropped);
    const at::Tensor input = x.clone().requires_grad_(true);
    const auto outputs = neva::recomputed(
        [&moe](const std::vector<at::Tensor>& in) { return std::vector<at::Tensor>{moe.forward(in[0])}; }, {input});
    outputs[0].sum().backward();  // runs the forward again
    CHECK(moe.take_dropped() == expected_dropped);
  }
  {  // The two policies keep different assignments here (the test tells them apart).
    std::int64_t a = 0, b = 0;
    CHECK((reference(0.5, true, &a) - reference(0.5, false, &b)).abs().max().item<double>() > 1e-3);
  }
  // Dropless (the default): every assignment runs.
  moe.set_capacity(0, "probs");
  std::int64_t none = 0;
  CHECK((moe.forward(x) - reference(1e9, true, &none)).abs().max().item<double>() < 1e-12);
  CHECK_THROWS_WITH_AS(moe.set_capacity(1.0, "random"), doctest::Contains("\"probs\" or \"position\""), neva::Error);
}

TEST_CASE("a KV cache's rows as slots: sequences of other lengths decoded together each get their own logits") {
  // The reference is each sequence alone through the whole decoder without a cache (the decoder
  // itself is checked against transformers by the oracle tests). In bf16 a decode step attends in fp32
  // (the cache widened) where the reference runs bf16 SDPA: the two agree to bf16's precision.
  for (const std::string variant : {"gated", "moe", "window", "gated bf16"}) {
    CAPTURE(variant);
    const bool bf16 = variant == "gated bf16";
    const double tolerance = bf16 ? 3e-2 : 1e-5;
    auto allclose = [tolerance](const at::Tensor& a, const at::Tensor& b) {
      return at::allclose(a.to(at::kFloat), b.to(at::kFloat), tolerance, tolerance);
    };
    neva::DecoderConfig config = tiny_decoder(variant == "moe" ? "moe" : "gated");
    if (variant == "window") config.sliding_window = 4;
    neva::RuntimeContext context = neva::RuntimeContext::seeded(5);
    if (bf16) context.dtypes.params = context.dtypes.compute = at::kBFloat16;
    neva::DecoderBackbone backbone(config, context);
    at::NoGradGuard no_grad;
    auto generator = at::make_generator<at::CPUGeneratorImpl>(11);
    std::vector<at::Tensor> sequences;  // each a prompt then 3 more tokens
    for (std::int64_t length : {5, 9, 3, 7}) sequences.push_back(at::randint(97, {length + 3}, generator, at::kLong));
    auto alone = [&](const at::Tensor& ids) {
      neva::BackboneInputs inputs;
      inputs.embeddings = backbone.embed(ids.view({1, -1}));
      return backbone.forward(inputs).logits[0];
    };
    auto cache = backbone.new_cache(4, 16);
    auto run = [&](std::vector<std::int64_t> rows, std::vector<std::int64_t> lengths, const std::vector<at::Tensor>& ids) {
      neva::BackboneInputs inputs;
      inputs.embeddings = backbone.embed(at::stack(ids));
      inputs.cache = cache.get();
      inputs.cache_rows = at::tensor(rows, at::kLong);
      inputs.cache_lengths = at::tensor(lengths, at::kLong);
      return backbone.forward(inputs).logits;
    };
    std::vector<at::Tensor> expected;
    for (const auto& ids : sequences) expected.push_back(alone(ids));
    auto prompt = [&](std::size_t i) { return sequences[i].narrow(0, 0, sequences[i].size(0) - 3); };
    // Prefill one slot at a time, in rows out of order; the fourth sequence waits.
    const std::vector<std::int64_t> row_of{2, 0, 3, 1};
    for (std::size_t i = 0; i < 3; ++i) {
      at::Tensor logits = run({row_of[i]}, {0}, {prompt(i)})[0];
      CHECK(allclose(logits, expected[i].narrow(0, 0, prompt(i).size(0))));
    }
    // Decode the three together (rows 2, 0, 3: gathered), then two of them (rows 3, 0 after the first
    // ends) with the fourth joining by a prefill into row 1 in between.
    std::vector<std::int64_t> length{5, 9, 3};
    at::Tensor step = run({2, 0, 3}, length, {sequences[0].narrow(0, 5, 1), sequences[1].narrow(0, 9, 1), sequences[2].narrow(0, 3, 1)});
    for (std::size_t i = 0; i < 3; ++i) CHECK(allclose(step[i][0], expected[i][length[i]]));
    at::Tensor joined = run({1}, {0}, {prompt(3)})[0];
    CHECK(allclose(joined, expected[3].narrow(0, 0, 7)));
    // Rows 0 and 1 are consecutive: a view of the cache, not a gather. Two tokens at once each.
    step = run({0, 1}, {10, 7}, {sequences[1].narrow(0, 10, 2), sequences[3].narrow(0, 7, 2)});
    CHECK(allclose(step[0], expected[1].narrow(0, 10, 2)));
    CHECK(allclose(step[1], expected[3].narrow(0, 7, 2)));
    // A slot reused by a shorter sequence: the longer one's leftovers stay hidden.
    at::Tensor reused = run({0}, {0}, {prompt(2)})[0];
    CHECK(allclose(reused, expected[2].narrow(0, 0, 3)));
    step = run({0}, {3}, {sequences[2].narrow(0, 3, 1)});
    CHECK(allclose(step[0][0], expected[2][3]));
  }
  // Bad slots are refused by name.
  neva::DecoderBackbone backbone(tiny_decoder(), neva::RuntimeContext::seeded(5));
  auto cache = backbone.new_cache(2, 8);
  neva::BackboneInputs inputs;
  inputs.embeddings = backbone.embed(at::zeros({2, 1}, at::kLong));
  inputs.cache = cache.get();
  inputs.cache_rows = at::tensor(std::vector<std::int64_t>{1, 1}, at::kLong);
  inputs.cache_lengths = at::tensor(std::vector<std::int64_t>{0, 0}, at::kLong);
  CHECK_THROWS_WITH_AS(backbone.forward(inputs), "cache_rows[1] = 1: expected a distinct row of the 2 in the KV cache", neva::Error);
  inputs.cache_rows = at::tensor(std::vector<std::int64_t>{0, 1}, at::kLong);
  inputs.cache_lengths = at::tensor(std::vector<std::int64_t>{0, 8}, at::kLong);
  CHECK_THROWS_WITH_AS(backbone.forward(inputs),
                       "cache_lengths[1] = 8 plus 1 new tokens does not fit the KV cache's 8 tokens per row", neva::Error);
  inputs.cache_lengths = at::tensor(std::vector<std::int64_t>{0}, at::kLong);
  CHECK_THROWS_WITH_AS(backbone.forward(inputs), doctest::Contains("expected [2] int64 (one per row of the batch)"), neva::Error);
}
