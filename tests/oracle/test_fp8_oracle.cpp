// FP8 numerics (neva/nn/fp8.h) against torch's float8 dtypes and Transformer Engine's delayed-scaling
// rules written out independently in fp8_oracle.py.
#include <doctest/doctest.h>
#include <torch/types.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "neva/error.h"
#include "neva/io/safetensors.h"
#include "neva/nn/fp8.h"
#include "test_support.h"

namespace fs = std::filesystem;

namespace {

fs::path oracle_directory() { return neva::test::oracle_directory("fp8"); }

c10::ScalarType dtype_named(const std::string& name) { return name == "e4m3" ? at::kFloat8_e4m3fn : at::kFloat8_e5m2; }

// Equal bit patterns (NaN equal to NaN of the same pattern).
bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() &&
         at::equal(a.contiguous().view(at::kByte), b.contiguous().view(at::kByte));
}

}  // namespace

TEST_CASE("fp8: saturating casts equal torch's float8 casts of the clamped, scaled values") {
  neva::SafetensorsFile reference((oracle_directory() / "fp8.safetensors").string());
  const at::Tensor x = reference.tensor("x");
  for (const char* format : {"e4m3", "e5m2"}) {
    for (const char* scale : {"1.0", "0.37", "12.5"}) {
      INFO(format << " scale " << scale);
      const at::Tensor got = neva::fp8::cast(x, at::tensor(std::stof(scale)), dtype_named(format));
      CHECK(same_bits(got, reference.tensor(std::string("q_") + format + "_" + scale)));
      // From bf16 input the same values where x is a bf16 value.
      const at::Tensor x16 = x.to(at::kBFloat16);
      CHECK(same_bits(neva::fp8::cast(x16, at::tensor(std::stof(scale)), dtype_named(format)),
                      neva::fp8::cast(x16.to(at::kFloat), at::tensor(std::stof(scale)), dtype_named(format))));
    }
  }
  CHECK(neva::fp8::max_of(at::kFloat8_e4m3fn) == 448.0);
  CHECK(neva::fp8::max_of(at::kFloat8_e5m2) == 57344.0);
  CHECK((neva::fp8::dtype_for(neva::fp8::Format::Hybrid, true) == at::kFloat8_e5m2));
  CHECK((neva::fp8::dtype_for(neva::fp8::Format::Hybrid, false) == at::kFloat8_e4m3fn));
  CHECK((neva::fp8::dtype_for(neva::fp8::Format::E4M3, true) == at::kFloat8_e4m3fn));
}

TEST_CASE("fp8: the amax history and the scale follow Transformer Engine's update, step by step") {
  std::ifstream in(oracle_directory() / "scale_updates.json");
  const nlohmann::json reference = nlohmann::json::parse(in);
  std::vector<float> amaxes;
  for (const auto& text : reference["amaxes"]) amaxes.push_back(static_cast<float>(std::stod(text.get<std::string>())));
  int sequences = 0;
  for (const auto& [key, steps] : reference["updates"].items()) {
    // key: algorithm_length_margin_interval_format
    std::vector<std::string> part;
    std::stringstream stream(key);
    for (std::string item; std::getline(stream, item, '_');) part.push_back(item);
    const bool most_recent = part[0] == "most";
    if (most_recent) part.erase(part.begin());  // "most_recent"
    const std::int64_t length = std::stoll(part[1]), interval = std::stoll(part[3]);
    const double margin = std::stod(part[2]);
    const c10::ScalarType fp8 = dtype_named(part[4]);
    neva::fp8::ScalingState state = neva::fp8::make_state(length);
    for (std::size_t step = 0; step < amaxes.size(); ++step) {
      INFO(key << " step " << step + 1);
      // A tensor whose amax is the step's (its other entry smaller in magnitude).
      neva::fp8::quantize(torch::tensor({-amaxes[step], amaxes[step] / 4}, at::kFloat), state, fp8);
      neva::fp8::update(state, fp8, margin,
                        most_recent ? neva::fp8::AmaxAlgorithm::MostRecent : neva::fp8::AmaxAlgorithm::Max, interval);
      const auto& expected = steps[step];
      CHECK(state.scale.item<float>() == static_cast<float>(expected["scale"].get<double>()));
      CHECK(state.scale_inv.item<float>() == 1.0f / static_cast<float>(expected["scale"].get<double>()));
      for (std::int64_t i = 0; i < length; ++i) {
        const float want = static_cast<float>(std::stod(expected["history"][i].get<std::string>()));
        const float got = state.amax_history[i].item<float>();
        CHECK(((std::isnan(want) && std::isnan(got)) || want == got));
      }
    }
    ++sequences;
  }
  CHECK(sequences == 32);
  CHECK_THROWS_WITH_AS(neva::fp8::make_state(0), doctest::Contains("amax history length must be at least 1"), neva::Error);
  neva::fp8::ScalingState state = neva::fp8::make_state(2);
  CHECK_THROWS_WITH_AS(neva::fp8::update(state, at::kFloat8_e4m3fn, -1, neva::fp8::AmaxAlgorithm::Max),
                       doctest::Contains("fp8_margin must be at least 0"), neva::Error);
  CHECK_THROWS_WITH_AS(neva::fp8::update(state, at::kFloat8_e4m3fn, 0, neva::fp8::AmaxAlgorithm::Max, 0),
                       doctest::Contains("fp8_interval must be at least 1"), neva::Error);
}

TEST_CASE("fp8: current scaling takes the scale from the tensor's own amax") {
  neva::fp8::ScalingState state = neva::fp8::make_state(1);
  const at::Tensor x = torch::tensor({3.0f, -7.0f, 0.5f});
  const at::Tensor q = neva::fp8::quantize_current(x, state, at::kFloat8_e4m3fn, 1);
  CHECK(state.scale.item<float>() == 448.0f / 7.0f / 2.0f);
  CHECK(same_bits(q, (x * (448.0f / 7.0f / 2.0f)).to(at::kFloat8_e4m3fn)));
  neva::fp8::quantize_current(torch::zeros({3}), state, at::kFloat8_e4m3fn, 1);
  CHECK(state.scale.item<float>() == 448.0f / 7.0f / 2.0f);  // amax 0: the scale kept
}

TEST_CASE("fp8: the GEMM equals dequantise-then-matmul in float32, and its bfloat16 rounding") {
  neva::SafetensorsFile reference((oracle_directory() / "fp8.safetensors").string());
  for (const char* pair : {"e4m3_e4m3", "e4m3_e5m2", "e5m2_e4m3"}) {
    INFO(pair);
    const std::string name(pair);
    const at::Tensor a = reference.tensor("mm_a_" + name), b = reference.tensor("mm_b_" + name);
    const at::Tensor inv_a = reference.tensor("mm_inv_a_" + name), inv_b = reference.tensor("mm_inv_b_" + name);
    CHECK(at::equal(neva::fp8::scaled_mm(a, inv_a, b, inv_b, at::kFloat), reference.tensor("mm_f32_" + name)));
    CHECK(at::equal(neva::fp8::scaled_mm(a, inv_a, b, inv_b, at::kBFloat16), reference.tensor("mm_bf16_" + name)));
    // The emulation (what runs where LibTorch's kernel does not take the operands) gives the same.
    CHECK(at::equal(neva::fp8::scaled_mm_emulated(a, inv_a, b, inv_b, at::kFloat), reference.tensor("mm_f32_" + name)));
    CHECK(at::equal(neva::fp8::scaled_mm_emulated(a, inv_a, b, inv_b, at::kBFloat16), reference.tensor("mm_bf16_" + name)));
    CHECK(at::equal(neva::fp8::scaled_mm(a, inv_a, b, inv_b, at::kDouble),
                    reference.tensor("mm_f32_" + name).to(at::kDouble)));
  }
  CHECK_THROWS_WITH_AS(neva::fp8::scaled_mm(torch::ones({2, 3}), torch::ones({}), torch::ones({2, 3}), torch::ones({}), at::kFloat),
                       doctest::Contains("expected float8 matrices"), neva::Error);
}

namespace {

void check_close(const at::Tensor& actual, const at::Tensor& expected, const std::string& what) {
  INFO(what);
  REQUIRE(actual.sizes() == expected.sizes());
  // The GEMMs are the reference's arithmetic; only the matmul's summation order may differ.
  const double scale = expected.abs().max().item<double>();
  CHECK((actual.to(at::kFloat) - expected).abs().max().item<double>() <= 1e-6 * std::max(scale, 1e-30));
}

}  // namespace

TEST_CASE("fp8: a linear layer trains three steps as Transformer Engine's does (forward, both gradients, scales)") {
  neva::SafetensorsFile reference((oracle_directory() / "fp8.safetensors").string());
  for (const auto& [format, name] : {std::pair{neva::fp8::Format::Hybrid, "e5m2"}, std::pair{neva::fp8::Format::E4M3, "e4m3"}}) {
    INFO(name);
    neva::fp8::LinearConfig config;
    config.format = format;
    config.margin = 1;
    neva::fp8::LinearState state(2);
    for (int i = 0; i < 3; ++i) {
      const std::string step = std::to_string(i), key = std::string(name) + "_" + step;
      const at::Tensor x = reference.tensor("lin_x_" + step).requires_grad_();
      const at::Tensor w = reference.tensor("lin_w_" + step).requires_grad_();
      const at::Tensor b = reference.tensor("lin_b_" + step).requires_grad_();
      const at::Tensor y = neva::fp8::linear(x, w, b, state, config);
      CHECK((y.scalar_type() == at::kFloat));
      y.backward(reference.tensor("lin_g_" + step));
      check_close(y.detach(), reference.tensor("lin_y_" + key), "y " + key);
      check_close(x.grad(), reference.tensor("lin_dx_" + key), "dx " + key);
      check_close(w.grad(), reference.tensor("lin_dw_" + key), "dw " + key);
      check_close(b.grad(), reference.tensor("lin_db_" + key), "db " + key);
      neva::fp8::update(state, config, neva::fp8::AmaxAlgorithm::Max, 1);
      const at::Tensor scales = at::stack({state.input.scale, state.weight.scale, state.grad_output.scale});
      CHECK(at::equal(scales, reference.tensor("lin_scales_" + key)));
    }
  }
  SUBCASE("current scaling") {
    neva::fp8::LinearConfig config;
    config.format = neva::fp8::Format::E4M3;
    config.current_scaling = true;
    config.margin = 1;
    neva::fp8::LinearState state(1);
    const at::Tensor x = reference.tensor("lin_x_0").requires_grad_(), w = reference.tensor("lin_w_0").requires_grad_();
    const at::Tensor y = neva::fp8::linear(x, w, reference.tensor("lin_b_0"), state, config);
    y.backward(reference.tensor("lin_g_0"));
    check_close(y.detach(), reference.tensor("lin_y_current"), "y");
    check_close(x.grad(), reference.tensor("lin_dx_current"), "dx");
    check_close(w.grad(), reference.tensor("lin_dw_current"), "dw");
  }
  SUBCASE("the weight is cast once while it and its scale stay the same") {
    neva::fp8::LinearConfig config;
    neva::fp8::LinearState state(1);
    const at::Tensor w = reference.tensor("lin_w_0");
    const at::Tensor x = reference.tensor("lin_x_0");
    neva::fp8::linear(x, w, at::Tensor(), state, config);
    const void* first = state.weight_fp8.unsafeGetTensorImpl();
    neva::fp8::linear(x * 2, w, at::Tensor(), state, config);  // a second micro-batch
    CHECK(state.weight_fp8.unsafeGetTensorImpl() == first);
    {
      at::NoGradGuard no_grad;
      w.mul_(0.5);  // an optimizer step (in place: the version counter moves)
    }
    neva::fp8::linear(x, w, at::Tensor(), state, config);
    CHECK(state.weight_fp8.unsafeGetTensorImpl() != first);
    const void* second = state.weight_fp8.unsafeGetTensorImpl();
    neva::fp8::update(state, config, neva::fp8::AmaxAlgorithm::MostRecent, 1);  // a new weight scale
    neva::fp8::linear(x, w, at::Tensor(), state, config);
    CHECK(state.weight_fp8.unsafeGetTensorImpl() != second);
  }
}
