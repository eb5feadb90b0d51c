#include "neva/io/hf_config.h"

#include <cmath>
#include <filesystem>

#include "neva/error.h"
#include "neva/io/json.h"

namespace neva {

using nlohmann::json;

struct HfConfig::Impl {
  std::shared_ptr<const json> document;  // keeps the whole file alive for children
  const json* object = nullptr;
  std::string source;  // "path/config.json" or "path/config.json: text_config"
};

HfConfig::HfConfig(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
HfConfig::HfConfig(const HfConfig&) = default;
HfConfig& HfConfig::operator=(const HfConfig&) = default;
HfConfig::~HfConfig() = default;

HfConfig HfConfig::parse(const std::string& text, const std::string& source_name) {
  auto document = std::make_shared<json>(parse_json(text, source_name));
  if (!document->is_object()) throw Error(source_name + ": expected a JSON object");
  auto impl = std::make_shared<Impl>();
  impl->document = document;
  impl->object = document.get();
  impl->source = source_name;
  return HfConfig(impl);
}

HfConfig HfConfig::load(const std::string& path) {
  std::filesystem::path file(path);
  if (std::filesystem::is_directory(file)) file /= "config.json";
  return parse(read_file(file.string()), file.string());
}

const std::string& HfConfig::source() const { return impl_->source; }

bool HfConfig::has(const std::string& key) const {
  auto found = impl_->object->find(key);
  return found != impl_->object->end() && !found->is_null();
}

void HfConfig::fail(const std::string& key, const std::string& what) const {
  throw Error(impl_->source + ": " + key + ": " + what);
}

template <class T>
std::optional<T> HfConfig::optional(const std::string& key) const {
  if (!has(key)) return std::nullopt;
  const json& value = impl_->object->at(key);
  if constexpr (std::is_same_v<T, bool>) {
    if (value.is_boolean()) return value.get<bool>();
    fail(key, "expected a boolean, got " + json_excerpt(value));
  } else if constexpr (std::is_same_v<T, std::int64_t>) {
    if (value.is_number_integer()) return value.get<std::int64_t>();
    fail(key, "expected an integer, got " + json_excerpt(value));
  } else if constexpr (std::is_same_v<T, double>) {
    if (!value.is_number()) fail(key, "expected a number, got " + json_excerpt(value));
    const double number = value.get<double>();
    // JSON has no NaN or infinity, but a literal like 1e999 parses to infinity.
    if (!std::isfinite(number)) fail(key, "expected a finite number, got " + json_excerpt(value));
    return number;
  } else {
    if (value.is_string()) return value.get<std::string>();
    fail(key, "expected a string, got " + json_excerpt(value));
  }
}

template <class T>
T HfConfig::require(const std::string& key) const {
  auto value = optional<T>(key);
  if (!value) fail(key, "missing required key");
  return *value;
}

template NEVA_API std::optional<bool> HfConfig::optional<bool>(const std::string&) const;
template NEVA_API std::optional<std::int64_t> HfConfig::optional<std::int64_t>(const std::string&) const;
template NEVA_API std::optional<double> HfConfig::optional<double>(const std::string&) const;
template NEVA_API std::optional<std::string> HfConfig::optional<std::string>(const std::string&) const;
template NEVA_API bool HfConfig::require<bool>(const std::string&) const;
template NEVA_API std::int64_t HfConfig::require<std::int64_t>(const std::string&) const;
template NEVA_API double HfConfig::require<double>(const std::string&) const;
template NEVA_API std::string HfConfig::require<std::string>(const std::string&) const;

std::int64_t HfConfig::positive(const std::string& key, std::int64_t fallback, std::int64_t max) const {
  std::int64_t value = get<std::int64_t>(key, fallback);
  if (value <= 0 || value > max) {
    fail(key, "expected an integer in [1, " + std::to_string(max) + "], got " + std::to_string(value));
  }
  return value;
}

HfSource read_hf_source(const ConfigSection& section, const std::string& llava_sub_config) {
  auto pretrained = section.path_value("from_pretrained");
  auto config_file = section.path_value("config");
  if (pretrained && config_file) section.fail("config", "give from_pretrained or config, not both");
  if (!pretrained && !config_file) {
    section.fail("from_pretrained", "missing: a Hugging Face model directory (or `config`, a config.json for a "
                                    "randomly initialised model)");
  }
  const std::string key = pretrained ? "from_pretrained" : "config";
  try {
    HfConfig file = HfConfig::load(pretrained ? *pretrained : *config_file);
    bool llava = file.get<std::string>("model_type", "") == "llava";
    HfConfig config = llava ? file.child(llava_sub_config) : file;
    return HfSource{config, file, pretrained.value_or(""), key};
  } catch (const Error& error) {
    section.fail(key, error.what());
  }
}

HfConfig HfConfig::child(const std::string& key) const {
  if (!has(key) || !impl_->object->at(key).is_object()) fail(key, "expected an object");
  auto impl = std::make_shared<Impl>();
  impl->document = impl_->document;
  impl->object = &impl_->object->at(key);
  impl->source = impl_->source + ": " + key;
  return HfConfig(impl);
}

RopeConfig HfConfig::rope(std::int64_t head_dim, double default_theta, std::int64_t default_max_positions) const {
  RopeConfig rope;
  rope.head_dim = head_dim;
  rope.max_position_embeddings = positive("max_position_embeddings", default_max_positions);
  rope.theta = get<double>("rope_theta", default_theta);
  rope.partial_rotary_factor = get<double>("partial_rotary_factor", rope.partial_rotary_factor);

  // 5.x: rope_parameters; 4.x: rope_scaling (whose "type" older files spell instead of "rope_type").
  std::string key = has("rope_parameters") ? "rope_parameters" : "rope_scaling";
  if (has(key)) {
    HfConfig parameters = child(key);
    rope.theta = parameters.get<double>("rope_theta", rope.theta);
    rope.partial_rotary_factor = parameters.get<double>("partial_rotary_factor", rope.partial_rotary_factor);
    rope.type = parameters.get<std::string>("rope_type", parameters.get<std::string>("type", "default"));
    if (rope.type != "default") {
      rope.factor = parameters.require<double>("factor");
      if (!(rope.factor > 0)) parameters.fail("factor", "expected a number > 0, got " + std::to_string(rope.factor));
    }
    if (rope.type == "llama3") {
      rope.low_freq_factor = parameters.require<double>("low_freq_factor");
      rope.high_freq_factor = parameters.require<double>("high_freq_factor");
      parameters.require<std::int64_t>("original_max_position_embeddings");
      rope.original_max_position_embeddings = parameters.positive("original_max_position_embeddings", 1);
      if (!(rope.low_freq_factor > 0) || !(rope.high_freq_factor > rope.low_freq_factor)) {
        parameters.fail("high_freq_factor", "expected 0 < low_freq_factor < high_freq_factor, got " +
                                                std::to_string(rope.low_freq_factor) + " and " +
                                                std::to_string(rope.high_freq_factor));
      }
    }
    if (rope.type != "default" && rope.type != "linear" && rope.type != "dynamic" && rope.type != "llama3") {
      parameters.fail("rope_type", "unsupported rope type '" + rope.type + "' (supported: default, linear, dynamic, llama3)");
    }
  }
  if (!(rope.theta > 0)) fail("rope_theta", "expected a number > 0, got " + std::to_string(rope.theta));
  if (!(rope.partial_rotary_factor > 0) || rope.partial_rotary_factor > 1) {
    fail("partial_rotary_factor", "expected a number in (0, 1], got " + std::to_string(rope.partial_rotary_factor));
  }
  return rope;
}

}  // namespace neva
