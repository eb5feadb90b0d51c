// Image decoding and preprocessing against Pillow and transformers' PIL image processors
// (reference data: image_oracle.py).
#include <doctest/doctest.h>
#include <torch/types.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "neva/error.h"
#include "neva/data/image.h"
#include "neva/io/safetensors.h"
#include "test_support.h"

namespace fs = std::filesystem;

namespace {

fs::path oracle_directory() { return neva::test::oracle_directory("images"); }

std::vector<std::string> image_names() {
  std::ifstream in(oracle_directory() / "images.json");
  return nlohmann::json::parse(in).get<std::vector<std::string>>();
}

neva::ImageProcessorConfig processor(const std::string& name) {
  neva::ImageProcessorConfig config;
  config.size = config.crop_size = 48;
  if (name == "llava_pad") config.aspect_ratio = "pad";
  if (name == "clip_keep") config.aspect_ratio = "keep";
  if (name == "siglip") {
    config.resize = neva::ImageProcessorConfig::Resize::Exact;
    config.size = 40;
    config.mean = {0.5f, 0.5f, 0.5f};
    config.std = {0.5f, 0.5f, 0.5f};
  }
  return config;
}

}  // namespace

TEST_CASE("JPEG and PNG decode to Pillow's RGB pixels exactly") {
  neva::SafetensorsFile reference((oracle_directory() / "reference.safetensors").string());
  for (const auto& name : image_names()) {
    CAPTURE(name);
    neva::Image image = neva::load_image((oracle_directory() / name).string());
    at::Tensor expected = reference.tensor(name + "/rgb");
    REQUIRE(image.height == expected.size(0));
    REQUIRE(image.width == expected.size(1));
    at::Tensor ours = torch::from_blob(image.rgb.data(), {image.height, image.width, 3}, at::kByte);
    CHECK(torch::equal(ours, expected));
  }
}

TEST_CASE("CLIP, LLaVA-pad, SigLIP and NeMo-keep preprocessing give transformers' pixel_values within 1/255") {
  neva::SafetensorsFile reference((oracle_directory() / "reference.safetensors").string());
  for (const auto& name : image_names()) {
    neva::Image image = neva::load_image((oracle_directory() / name).string());
    for (const char* processor_name : {"clip", "llava_pad", "siglip", "clip_keep"}) {
      std::string label = name + " / " + processor_name;
      CAPTURE(label);
      at::Tensor expected = reference.tensor(name + "/" + processor_name);
      at::Tensor ours = neva::preprocess_image(image, processor(processor_name));
      REQUIRE(ours.sizes() == expected.sizes());
      double difference = (ours - expected).abs().max().item<double>();
      CHECK(difference <= 1.0 / 255);
    }
  }
}

TEST_CASE("bad images give one clear error naming the file") {
  neva::test::TempDir dir;
  auto not_image = dir.write("notes.png", "this is not an image at all");
  CHECK_THROWS_WITH_AS(neva::load_image(not_image.string()), (not_image.string() + ": not a JPEG or PNG image").c_str(),
                       neva::Error);
  std::ifstream in(oracle_directory() / "photo.jpg", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto truncated = dir.write("truncated.jpg", bytes.substr(0, 200));
  CHECK_THROWS_WITH_AS(neva::load_image(truncated.string()), doctest::Contains("truncated.jpg: corrupt JPEG"),
                       neva::Error);
  std::ifstream png_in(oracle_directory() / "wide.png", std::ios::binary);
  std::string png((std::istreambuf_iterator<char>(png_in)), std::istreambuf_iterator<char>());
  auto broken = dir.write("broken.png", png.substr(0, png.size() / 2));
  CHECK_THROWS_WITH_AS(neva::load_image(broken.string()), doctest::Contains("broken.png: corrupt PNG"), neva::Error);
  CHECK_THROWS_WITH_AS(neva::load_image((dir.path() / "absent.png").string()), doctest::Contains("absent.png: cannot open image"),
                       neva::Error);
}

TEST_CASE("the pixel budget is checked from the header, before decoding") {
  auto path = (oracle_directory() / "photo.jpg").string();  // 150 x 101
  CHECK_THROWS_WITH_AS(neva::load_image(path, 10000), doctest::Contains("image of 150x101 pixels exceeds the budget of 10000"),
                       neva::Error);
  auto png = (oracle_directory() / "wide.png").string();  // 131 x 77
  CHECK_THROWS_WITH_AS(neva::load_image(png, 10000), doctest::Contains("image of 131x77 pixels exceeds the budget"),
                       neva::Error);
  CHECK_NOTHROW(neva::load_image(path, 150 * 101));
}
