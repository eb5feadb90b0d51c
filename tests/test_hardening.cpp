// Hardening regressions (issue 15), unit level: the JSON limits, the loss-spike guard, the image
// decoders and preprocessing budget, config.json ranges, recipe numbers and allocation failures
// (the SentencePiece isolation is tested with a real tokenizer.model in oracle/test_tokenizer_oracle.cpp). End-to-end bad inputs (exit codes, messages) are in test_bad_inputs.cpp.
#include <doctest/doctest.h>

#include <cmath>
#include <random>

#include "neva/config.h"
#include "neva/error.h"
#include "neva/io/hf_config.h"
#include "neva/data/image.h"
#include "neva/io/json.h"
#include "neva/train/loss_spike.h"
#include "test_support.h"

namespace {

using neva::LossSpikeGuard;
using Verdict = neva::LossSpikeGuard::Verdict;

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const neva::Error& error) {
    return error.what();
  }
  FAIL("expected a neva::Error");
  return {};
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

neva::Image solid(int width, int height) {
  neva::Image image;
  image.width = width;
  image.height = height;
  image.rgb.assign(static_cast<std::size_t>(width) * height * 3, 128);
  return image;
}

}  // namespace

// ------------------------------------------------------------------ JSON

TEST_CASE("JSON: a NUL byte, trailing text, a byte-order mark and over-deep nesting are errors with a location") {
  CHECK(neva::parse_json("  {\"a\": [1, 2]}\n\t ", "f.json")["a"][1] == 2);  // whitespace around is fine
  CHECK(error_of([] { neva::parse_json(std::string("{\"a\": 1}\0\0\0\0", 12), "f.json"); }) ==
        "f.json:1:9: invalid JSON: a NUL byte (JSON text cannot hold one; is this a binary file, or was it cut off and "
        "padded?)");
  CHECK(contains(error_of([] { neva::parse_json("{\"a\": 1}\n}", "f.json"); }), "f.json:2:1: invalid JSON: syntax error"));
  CHECK(contains(error_of([] { neva::parse_json("\xEF\xBB\xBF{}", "f.json"); }), "f.json: invalid JSON: the text starts with a UTF-8 byte-order mark"));
  CHECK(contains(error_of([] { neva::parse_json("{\"a\": \"\xC3\x28\"}", "f.json"); }), "f.json:1:9: invalid JSON: syntax error while parsing value - invalid string: ill-formed UTF-8 byte"));
  const std::string deep_ok = std::string(128, '[') + std::string(128, ']');
  CHECK_NOTHROW(neva::parse_json(deep_ok, "f.json"));
  const std::string too_deep = std::string(100000, '[') + std::string(100000, ']');  // a stack overflow before
  CHECK(error_of([&] { neva::parse_json(too_deep, "f.json"); }) ==
        "f.json: invalid JSON: values nest deeper than 128 levels (the limit; no real file of this kind nests this deep)");
  CHECK(contains(error_of([] { neva::parse_json("{\"a\": 1, \"a\": 2}", "f.json", {128, true}); }), "duplicate key 'a'"));
  CHECK_NOTHROW(neva::parse_json("{\"a\": 1, \"a\": 2}", "f.json"));  // Python's json takes the last, as nlohmann
  CHECK(contains(error_of([] { neva::parse_json_line("{\"a\": oops}", "d.jsonl", 7); }), "d.jsonl:7:7: invalid JSON"));
}

TEST_CASE("JSON: a nlohmann type error is reported without its internal tag") {
  try {
    nlohmann::json(3).get<std::string>();
    FAIL("expected a type error");
  } catch (const nlohmann::json::exception& error) {
    CHECK(neva::json_error_reason(error) == "type must be string, but is number");
  }
}

// ------------------------------------------------------------------ the loss-spike guard

TEST_CASE("loss spikes: a converged run's noise near zero loss is never a spike") {
  // The case that stopped a healthy fine-tune: converged to ~0.006, batches log-normally spread,
  // with occasional batches at 10-12x the median (0.069 against 0.006), over 3000 steps.
  LossSpikeGuard guard;
  std::mt19937 random(5);
  std::normal_distribution<double> noise(0.0, 0.8);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (int step = 0; step < 3000; ++step) {
    double loss = 2.0 * std::exp(-step / 150.0) + 0.006 * std::exp(noise(random));
    if (step > 1000 && unit(random) < 0.01) loss = 0.069;
    std::string why;
    const Verdict verdict = guard.judge(loss, &why);
    CHECK_MESSAGE(verdict == Verdict::Accept, "step " << step << ": " << why);
    guard.record(loss, verdict);
  }
  CHECK(guard.skipped() == 0);
}

TEST_CASE("loss spikes: one spike is skipped and counted, a run that keeps spiking is stopped, NaN always stops") {
  LossSpikeGuard guard;
  for (int i = 0; i < 50; ++i) guard.record(0.1 + 0.01 * (i % 5), Verdict::Accept);
  CHECK(guard.median() == doctest::Approx(0.12));
  std::string why;
  CHECK(guard.judge(0.6, &why) == Verdict::Accept);  // 5x the median, but only 0.48 nats above it
  CHECK(guard.judge(3.2, &why) == Verdict::Skip);     // 27x, +3.1 nats: the measured spike of the demo test
  CHECK(contains(why, "the loss spiked to 3.2 (26.6667x the median 0.12 of the last 50 steps)"));
  for (int i = 0; i < 10; ++i) {
    REQUIRE(guard.judge(3.2) == Verdict::Skip);
    guard.record(3.2, Verdict::Skip);
  }
  CHECK(guard.skipped() == 10);
  CHECK(guard.judge(3.2, &why) == Verdict::Stop);  // the 11th in a row: diverged
  CHECK(contains(why, "11 spikes in a row (more than trainer.loss_spike_max_consecutive = 10): the run has diverged"));
  guard.record(0.11, Verdict::Accept);
  CHECK(guard.consecutive() == 0);
  CHECK(guard.judge(std::nan(""), &why) == Verdict::Stop);
  CHECK(why == "the loss is NaN");
  CHECK(guard.judge(INFINITY, &why) == Verdict::Stop);

  neva::LossSpikeConfig stop;
  stop.skip = false;
  LossSpikeGuard strict(stop);
  for (int i = 0; i < 20; ++i) strict.record(0.1, Verdict::Accept);
  CHECK(strict.judge(3.2) == Verdict::Stop);
  neva::LossSpikeConfig off;
  off.factor = 0;
  LossSpikeGuard disabled(off);
  for (int i = 0; i < 20; ++i) disabled.record(0.1, Verdict::Accept);
  CHECK(disabled.judge(1e6) == Verdict::Accept);
  CHECK(disabled.judge(std::nan("")) == Verdict::Stop);  // never disabled
}

TEST_CASE("loss spikes: nothing is judged before the warmup, and a restored window judges as the original") {
  LossSpikeGuard guard;
  for (int i = 0; i < 9; ++i) {
    CHECK(guard.judge(i == 4 ? 50.0 : 0.1) == Verdict::Accept);
    guard.record(i == 4 ? 50.0 : 0.1, Verdict::Accept);
  }
  guard.record(0.1, Verdict::Accept);
  CHECK(guard.judge(50.0) == Verdict::Skip);  // the early outlier does not move the median
  LossSpikeGuard copy;
  copy.restore(guard.window(), guard.skipped(), guard.consecutive());
  CHECK(copy.median() == guard.median());
  CHECK(copy.judge(50.0) == Verdict::Skip);
  neva::LossSpikeConfig small;
  small.window = 3;
  small.warmup = 3;
  LossSpikeGuard windowed(small);
  for (double loss : {5.0, 5.0, 5.0, 0.1, 0.1, 0.1}) windowed.record(loss, Verdict::Accept);
  CHECK(windowed.median() == doctest::Approx(0.1));  // only the last 3
}

// ------------------------------------------------------------------ images

TEST_CASE("images: a truncated or corrupt JPEG is an error naming it, not grey padding") {
  const std::string jpeg = neva::test::encode_jpeg(64, 64);
  CHECK(neva::decode_image(jpeg, "ok.jpg").width == 64);
  const std::string truncated = jpeg.substr(0, jpeg.size() * 2 / 3);
  CHECK(contains(error_of([&] { neva::decode_image(truncated, "cut.jpg"); }), "cut.jpg: corrupt JPEG: Premature end of JPEG file"));
  std::string scrambled = jpeg;
  for (std::size_t i = jpeg.size() / 2; i < jpeg.size() / 2 + 40; ++i) scrambled[i] = static_cast<char>(0xFF);
  CHECK(contains(error_of([&] { neva::decode_image(scrambled, "bad.jpg"); }), "bad.jpg: corrupt JPEG: "));
}

TEST_CASE("images: a progressive JPEG of more than 500 scans is refused, one of 100 decodes") {
  CHECK(neva::decode_image(neva::test::encode_jpeg(16, 16, 100), "p.jpg").height == 16);
  CHECK(contains(error_of([] { neva::decode_image(neva::test::encode_jpeg(16, 16, 600), "many.jpg"); }),
                 "many.jpg: corrupt JPEG: more than 500 progressive scans"));
}

TEST_CASE("images: the pixel budget holds for every intermediate image, and extreme aspect ratios are refused") {
  neva::ImageProcessorConfig clip;  // shortest edge 224, crop 224
  neva::ImageProcessorConfig pad = clip;
  pad.aspect_ratio = "pad";
  // 1 x 20000 under pad would be a 20000 x 20000 canvas (1.2 GB): refused by the aspect ratio first.
  CHECK(error_of([&] { neva::preprocess_image(solid(1, 20000), pad); }) ==
        "image of 1x20000 pixels has an aspect ratio above 200:1");
  // 150 x 20000 (133:1) padded: 20000 x 20000 = 400 M pixels, over the 67 M pixel budget.
  CHECK(error_of([&] { neva::preprocess_image(solid(150, 20000), pad); }) ==
        "padding to a square would make an image of 20000x20000 pixels, over the budget of 67108864 pixels");
  CHECK(error_of([&] { neva::preprocess_image(solid(100, 10000), clip, 1000000); }) ==
        "resizing to the shortest edge would make an image of 224x22400 pixels, over the budget of 1000000 pixels");
  CHECK(neva::preprocess_image(solid(100, 10000), clip).sizes() == at::IntArrayRef({3, 224, 224}));
  CHECK(neva::preprocess_image(solid(300, 200), pad).sizes() == at::IntArrayRef({3, 224, 224}));
  // Through the file: the message names it.
  neva::test::TempDir dir;
  const auto strip = dir.write("strip.png", neva::encode_png(solid(1, 500)));
  CHECK(error_of([&] { neva::load_and_preprocess_image(strip.string(), clip); }) ==
        strip.string() + ": image of 1x500 pixels has an aspect ratio above 200:1");
}

// ------------------------------------------------------------------ config.json and recipe numbers

TEST_CASE("config.json: every size is range-checked and no number may be infinite") {
  auto config = [](const std::string& text) { return neva::HfConfig::parse(text, "config.json"); };
  CHECK(error_of([&] { config("{\"max_position_embeddings\": 0}").rope(64); }) ==
        "config.json: max_position_embeddings: expected an integer in [1, 16777216], got 0");
  CHECK(error_of([&] { config("{\"max_position_embeddings\": -5}").rope(64); }) ==
        "config.json: max_position_embeddings: expected an integer in [1, 16777216], got -5");
  CHECK(error_of([&] { config("{\"vocab_size\": 1000000000000}").positive("vocab_size", 1); }) ==
        "config.json: vocab_size: expected an integer in [1, 16777216], got 1000000000000");
  CHECK(error_of([&] { config("{\"rope_theta\": 1e999}").rope(64); }) ==
        "config.json: invalid JSON: number overflow parsing '1e999'");
  CHECK(error_of([&] { config("{\"rope_theta\": -1}").rope(64); }) == "config.json: rope_theta: expected a number > 0, got -1.000000");
  CHECK(contains(error_of([&] { config("{\"rope_scaling\": {\"rope_type\": \"linear\", \"factor\": 0}}").rope(64); }),
                 "config.json: rope_scaling: factor: expected a number > 0"));
}

TEST_CASE("recipes: nan and inf are refused for every float key, with the key's position") {
  for (const char* text : {"lr = nan", "lr = inf", "lr = -inf", "betas = [0.9, nan]"}) {
    CAPTURE(text);
    auto document = neva::ConfigDocument::parse(std::string("[optim]\n") + text + "\n", "r.toml");
    const auto optim = document.root().section("optim");
    std::string message;
    try {
      if (std::string(text).rfind("betas", 0) == 0) {
        optim.get<std::vector<double>>("betas", {});
      } else {
        optim.get<double>("lr", 0.0);
      }
    } catch (const neva::RecipeError& error) {
      message = error.what();
    }
    INFO(message);
    CHECK(contains(message, "r.toml:2:"));
    CHECK(contains(message, "finite number"));
  }
}

// ------------------------------------------------------------------ allocation failures, SentencePiece

TEST_CASE("a failed allocation is reported with its size") {
  CHECK(neva::allocation_failure("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                                 "memory: you tried to allocate 256000000000000 bytes. Error code 12")
            .rfind("out of memory: cannot allocate 256000000000000 bytes (232.8 TiB) for one tensor; this machine has ", 0) == 0);
  CHECK(neva::allocation_failure("std::bad_alloc").empty());  // caught by type instead
  CHECK(neva::allocation_failure("data.json: a path with bad_alloc in it").empty());
  CHECK(neva::out_of_memory().rfind("out of memory (an allocation failed; this machine has ", 0) == 0);
  CHECK(neva::allocation_failure("something else").empty());
  CHECK_THROWS_AS(at::empty({std::int64_t{1} << 50}, at::kFloat), c10::Error);  // an exception, not abort()
}
