#pragma once
// Reading Hugging Face config.json files with errors that name the file, the key and what was expected.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "neva/config.h"
#include "neva/api.h"
#include "neva/nn/rotary.h"

namespace neva {

class NEVA_API HfConfig {
 public:
  // Loads `path` (a config.json, or a directory holding one). Throws neva::Error.
  static HfConfig load(const std::string& path);
  static HfConfig parse(const std::string& text, const std::string& source_name);
  HfConfig(const HfConfig&);
  HfConfig& operator=(const HfConfig&);
  ~HfConfig();

  const std::string& source() const;
  bool has(const std::string& key) const;  // present and not null
  // T: bool, std::int64_t, double, std::string. Integers are accepted where a double is asked.
  template <class T>
  std::optional<T> optional(const std::string& key) const;
  template <class T>
  T get(const std::string& key, T fallback) const {
    auto value = optional<T>(key);
    return value ? *value : fallback;
  }
  template <class T>
  T require(const std::string& key) const;
  // The largest size any config.json key may give (16,777,216): far above every real model's vocabulary,
  // widths, layer counts and context lengths, far below sizes whose products overflow.
  static constexpr std::int64_t kMaxSize = std::int64_t{1} << 24;
  // An integer in [1, max] (fallback when absent), else an error naming the key.
  std::int64_t positive(const std::string& key, std::int64_t fallback, std::int64_t max = kMaxSize) const;
  // A nested object ("text_config", "vision_config").
  HfConfig child(const std::string& key) const;
  [[noreturn]] void fail(const std::string& key, const std::string& what) const;

  // RoPE settings in either form: top-level rope_theta + rope_scaling {type|rope_type, factor, ...}
  // (transformers 4.x) or rope_parameters {rope_type, rope_theta, ...} (5.x).
  // `default_theta` and `default_max_positions` are the architecture's defaults for absent keys.
  RopeConfig rope(std::int64_t head_dim, double default_theta = 10000.0, std::int64_t default_max_positions = 2048) const;

 private:
  struct Impl;
  explicit HfConfig(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

// Where a Hugging Face plugin's model comes from, read from its recipe table:
//   from_pretrained  a model directory (config.json + weights); for a llava-hf directory the model's
//                    settings are taken from its `llava_sub_config` ("text_config", "vision_config")
//   config           a config.json alone: the same architecture, randomly initialised
struct HfSource {
  HfConfig config;      // this model's settings
  HfConfig file;        // the whole config.json
  std::string weights;  // the directory to load weights from; "" for random initialisation
  std::string key;      // "from_pretrained" or "config": where errors about the file point
};
NEVA_API HfSource read_hf_source(const ConfigSection& section, const std::string& llava_sub_config);

}  // namespace neva
