#pragma once
// Reading Hugging Face config.json files with errors that name the file, the key and what was expected.
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "neva/export.h"
#include "neva/nn/rotary.h"

namespace neva {

class NEVA_API HfConfig {
 public:
  // Loads `path` (a config.json, or a directory holding one). Throws neva::Error.
  static HfConfig load(const std::string& path);
  static HfConfig parse(const std::string& text, const std::string& source_name);
  HfConfig(const HfConfig&);
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
  // A nested object ("text_config", "vision_config").
  HfConfig child(const std::string& key) const;
  [[noreturn]] void fail(const std::string& key, const std::string& what) const;

  // RoPE settings in either form: top-level rope_theta + rope_scaling {type|rope_type, factor, ...}
  // (transformers 4.x) or rope_parameters {rope_type, rope_theta, ...} (5.x).
  RopeConfig rope(std::int64_t head_dim) const;

 private:
  struct Impl;
  explicit HfConfig(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

}  // namespace neva
