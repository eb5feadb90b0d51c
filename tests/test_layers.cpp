// neva::nn's factories and the context: at tensor-parallel size 1 a factory layer is its torch::nn
// counterpart bitwise, every parameter says how it is sharded, initialisation comes from the
// context's generator alone, and nothing in core or the plugins creates a layer any other way.
#include <doctest/doctest.h>

#include <ATen/ATen.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>

#include "neva/context.h"
#include "neva/error.h"
#include "neva/model/decoder.h"
#include "neva/nn/linear.h"
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
        const std::string code = line.substr(0, line.find("//"));  // comments may name them
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
