#include <doctest/doctest.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/linear.h>

#include "neva/connector.h"
#include "neva/registry.h"
#include "neva/io/safetensors.h"
#include "builtin_plugins.h"
#include "test_support.h"

namespace F = torch::nn::functional;

namespace {

std::shared_ptr<neva::Connector> build(const std::string& type, const std::string& extra = "",
                                       neva::RuntimeContext context = {}) {
  neva::Registry::Options options = neva::test::builtin_plugins();
  neva::Registry registry(options);
  auto document = neva::ConfigDocument::parse("input_size = 12\noutput_size = 20\n" + extra, "c.toml");
  auto config = registry.parse_config("connector", type, document.root());
  document.root().reject_unknown_keys();
  return registry.create<neva::Connector>(type, *config, context);
}

std::map<std::string, at::Tensor> parameters(const neva::Connector& connector) {
  std::map<std::string, at::Tensor> out;
  for (const auto& item : connector.named_parameters()) out[item.key()] = item.value();
  return out;
}

}  // namespace

TEST_CASE("mlp2x_gelu is Linear -> exact GELU -> Linear with LLaVA's parameter names") {
  torch::manual_seed(0);
  auto connector = build("mlp2x_gelu");
  auto p = parameters(*connector);
  REQUIRE(p.size() == 4);
  CHECK(p["0.weight"].sizes() == at::IntArrayRef({20, 12}));
  CHECK(p["2.weight"].sizes() == at::IntArrayRef({20, 20}));
  at::Tensor x = torch::randn({2, 5, 12});
  // The formula written out: GELU with erf, not the tanh approximation.
  at::Tensor hidden = F::linear(x, p["0.weight"], p["0.bias"]);
  hidden = 0.5 * hidden * (1 + torch::erf(hidden / std::sqrt(2.0)));
  at::Tensor expected = F::linear(hidden, p["2.weight"], p["2.bias"]);
  CHECK(torch::allclose(connector->forward(x), expected, 1e-5, 1e-6));
}

TEST_CASE("mlpNx_gelu stacks N linears, and the plain name takes a depth key") {
  CHECK(parameters(*build("mlp3x_gelu")).size() == 6);
  CHECK(parameters(*build("mlp", "depth = 1\n")).size() == 2);
  CHECK(parameters(*build("mlp")).size() == 4);  // default depth 2
}

TEST_CASE("linear is one affine map") {
  torch::manual_seed(0);
  auto connector = build("linear");
  auto p = parameters(*connector);
  at::Tensor x = torch::randn({1, 3, 12});
  CHECK(torch::allclose(connector->forward(x), F::linear(x, p["weight"], p["bias"])));
  CHECK(connector->output_size() == 20);
}

TEST_CASE("connectors build in the dtype the context asks for") {
  neva::RuntimeContext context;
  context.dtypes.params = c10::ScalarType::BFloat16;
  auto connector = build("mlp2x_gelu", "", context);
  for (const auto& parameter : connector->parameters()) CHECK((parameter.scalar_type() == c10::ScalarType::BFloat16));
  CHECK((connector->forward(torch::randn({1, 2, 12}, at::kBFloat16)).scalar_type() == c10::ScalarType::BFloat16));
}

TEST_CASE("gradients reach every connector parameter") {
  auto connector = build("mlp2x_gelu");
  connector->forward(torch::randn({2, 3, 12})).pow(2).sum().backward();
  for (const auto& item : connector->named_parameters()) {
    CAPTURE(item.key());
    REQUIRE(item.value().grad().defined());
    CHECK(item.value().grad().abs().sum().item<double>() > 0);
  }
}

TEST_CASE("connectors load LLaVA's projector names from a safetensors file") {
  neva::test::TempDir dir;
  torch::manual_seed(3);
  auto path = (dir.path() / "mm_projector.safetensors").string();
  at::Tensor w0 = torch::randn({20, 12}), b0 = torch::randn({20}), w2 = torch::randn({20, 20}), b2 = torch::randn({20});
  neva::write_safetensors(path, {{"model.mm_projector.0.weight", w0}, {"model.mm_projector.0.bias", b0},
                                 {"model.mm_projector.2.weight", w2}, {"model.mm_projector.2.bias", b2}});
  neva::Registry::Options options = neva::test::builtin_plugins();
  neva::Registry registry(options);
  auto document = neva::ConfigDocument::parse("input_size = 12\noutput_size = 20\n", "c.toml");
  auto config = registry.parse_config("connector", "mlp2x_gelu", document.root());
  dynamic_cast<neva::ConnectorConfig&>(*config).weights = path;
  auto connector = registry.create<neva::Connector>("mlp2x_gelu", *config, neva::RuntimeContext{});
  auto p = parameters(*connector);
  CHECK(torch::equal(p["0.weight"], w0));
  CHECK(torch::equal(p["2.bias"], b2));

  neva::write_safetensors(path, {{"model.mm_projector.0.weight", w0}, {"model.mm_projector.0.bias", b0}});
  CHECK_THROWS_WITH_AS(registry.create<neva::Connector>("mlp2x_gelu", *config, neva::RuntimeContext{}),
                       doctest::Contains("missing tensor 'model.mm_projector.2.weight'"), neva::PluginError);
}
