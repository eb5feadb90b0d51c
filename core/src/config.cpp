#include "neva/config.h"

#include <toml++/toml.h>

#include <algorithm>
#include <cmath>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "neva/error.h"
#include "neva/io/json.h"
#include "neva/suggest.h"

namespace neva {

// Recipe tables never nest deeply; a cap keeps hostile input from recursing far (toml++ caps at 256).
static constexpr int kMaxRecipeDepth = 16;

struct Document {
  toml::table root;
  std::string source_name;
  std::string base_directory;  // where relative paths in the recipe resolve
  // Full dotted key -> the --set argument that gave it (overrides carry no file position).
  std::map<std::string, std::string> overrides;
};

struct ConfigSection::Impl {
  std::shared_ptr<Document> document;
  toml::table* table = nullptr;  // null for a section absent from the recipe
  std::string path;
  int depth = 0;
  std::set<std::string> asked;
  std::map<std::string, std::shared_ptr<Impl>> children;
};

namespace {

std::string dotted(const std::string& path, std::string_view key) {
  return path.empty() ? std::string(key) : path + "." + std::string(key);
}

std::string position(const Document& document, const toml::source_region& region) {
  std::string file = region.path ? *region.path : document.source_name;
  if (region.begin.line == 0) return file;
  return file + ":" + std::to_string(region.begin.line) + ":" + std::to_string(region.begin.column);
}

std::string type_name(const toml::node& node) {
  switch (node.type()) {
    case toml::node_type::string: return "a string";
    case toml::node_type::integer: return "an integer";
    case toml::node_type::floating_point: return "a float";
    case toml::node_type::boolean: return "a boolean";
    case toml::node_type::array: return "an array";
    case toml::node_type::table: return "a table";
    default: return "a date/time";
  }
}

std::string render(const toml::node& node) {
  std::ostringstream out;
  node.visit([&](auto&& value) { out << value; });
  std::string text;  // on one line: toml++ may print an array over several
  for (char c : out.str()) {
    if (c == '\n' || c == '\r' || c == '\t') c = ' ';
    if (c == ' ' && !text.empty() && text.back() == ' ') continue;
    text += c;
  }
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return text;
}

template <class T>
struct Expect;
template <>
struct Expect<bool> {
  static constexpr const char* name = "a boolean";
  static std::optional<bool> from(const toml::node& n) { return n.value_exact<bool>(); }
};
template <>
struct Expect<std::int64_t> {
  static constexpr const char* name = "an integer";
  static std::optional<std::int64_t> from(const toml::node& n) { return n.value_exact<std::int64_t>(); }
};
template <>
struct Expect<double> {
  static constexpr const char* name = "a number";
  static std::optional<double> from(const toml::node& n) {
    if (n.is_integer()) return static_cast<double>(*n.value_exact<std::int64_t>());
    return n.value_exact<double>();
  }
};
template <>
struct Expect<std::string> {
  static constexpr const char* name = "a string";
  static std::optional<std::string> from(const toml::node& n) { return n.value_exact<std::string>(); }
};
template <class Element>
struct Expect<std::vector<Element>> {
  static std::string describe() { return std::string("an array of ") + (Expect<Element>::name + 2) + "s"; }
  static std::optional<std::vector<Element>> from(const toml::node& n) {
    const toml::array* array = n.as_array();
    if (!array) return std::nullopt;
    std::vector<Element> out;
    for (const toml::node& item : *array) {
      auto value = Expect<Element>::from(item);
      if (!value) return std::nullopt;
      out.push_back(std::move(*value));
    }
    return out;
  }
};
template <class T>
std::string expected_name() {
  if constexpr (std::is_same_v<T, std::vector<std::int64_t>> || std::is_same_v<T, std::vector<double>> ||
                std::is_same_v<T, std::vector<std::string>>) {
    return Expect<T>::describe();
  } else {
    return Expect<T>::name;
  }
}

}  // namespace

ConfigSection::ConfigSection(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
ConfigSection::ConfigSection(const ConfigSection&) = default;
ConfigSection& ConfigSection::operator=(const ConfigSection&) = default;
ConfigSection::~ConfigSection() = default;

const std::string& ConfigSection::path() const { return impl_->path; }
std::string ConfigSection::key_path(std::string_view key) const { return dotted(impl_->path, key); }

bool ConfigSection::has(std::string_view key) const {
  impl_->asked.emplace(key);
  return impl_->table && impl_->table->contains(key);
}

bool ConfigSection::empty() const { return !impl_->table || impl_->table->empty(); }

std::string ConfigSection::where(std::string_view key) const {
  const Document& document = *impl_->document;
  if (!key.empty()) {
    auto override_it = document.overrides.find(key_path(key));
    if (override_it != document.overrides.end()) return "--set " + override_it->second;
    if (impl_->table) {
      if (const toml::node* node = impl_->table->get(key)) return position(document, node->source());
    }
  }
  if (impl_->table) return position(document, impl_->table->source());
  return document.source_name;
}

void ConfigSection::fail(std::string_view key, std::string_view what) const {
  std::string subject = key.empty() ? (impl_->path.empty() ? std::string("recipe") : impl_->path) : key_path(key);
  throw RecipeError(where(key) + ": " + subject + ": " + std::string(what));
}

template <class T>
std::optional<T> ConfigSection::optional(std::string_view key) const {
  impl_->asked.emplace(key);
  if (!impl_->table) return std::nullopt;
  const toml::node* node = impl_->table->get(key);
  if (!node) return std::nullopt;
  auto value = Expect<T>::from(*node);
  if (!value) fail(key, "expected " + expected_name<T>() + ", got " + type_name(*node) + " " + render(*node));
  // TOML spells nan and inf; no recipe number means either.
  if constexpr (std::is_same_v<T, double>) {
    if (!std::isfinite(*value)) fail(key, "expected a finite number, got " + render(*node));
  } else if constexpr (std::is_same_v<T, std::vector<double>>) {
    for (double number : *value) {
      if (!std::isfinite(number)) fail(key, "expected finite numbers (no nan or inf), got " + render(*node));
    }
  }
  return value;
}

template <class T>
T ConfigSection::require(std::string_view key) const {
  auto value = optional<T>(key);
  if (!value) fail(key, "missing required key (expected " + expected_name<T>() + ")");
  return std::move(*value);
}

#define NEVA_CONFIG_TYPE(T)                                                     \
  template NEVA_API std::optional<T> ConfigSection::optional<T>(std::string_view) const; \
  template NEVA_API T ConfigSection::require<T>(std::string_view) const;
NEVA_CONFIG_TYPE(bool)
NEVA_CONFIG_TYPE(std::int64_t)
NEVA_CONFIG_TYPE(double)
NEVA_CONFIG_TYPE(std::string)
NEVA_CONFIG_TYPE(std::vector<std::int64_t>)
NEVA_CONFIG_TYPE(std::vector<double>)
NEVA_CONFIG_TYPE(std::vector<std::string>)
#undef NEVA_CONFIG_TYPE

std::string ConfigSection::token(std::string_view key, std::string fallback) const {
  impl_->asked.emplace(key);
  if (!impl_->table) return fallback;
  const toml::node* node = impl_->table->get(key);
  if (!node) return fallback;
  if (auto integer = node->value_exact<std::int64_t>()) return std::to_string(*integer);
  if (auto text = node->value_exact<std::string>()) return *text;
  fail(key, "expected a name (a string or an integer), got " + type_name(*node) + " " + render(*node));
}

std::string ConfigSection::choice(std::string_view key, std::string fallback,
                                  const std::vector<std::string>& allowed) const {
  impl_->asked.emplace(key);
  std::string value = std::move(fallback);
  if (impl_->table) {
    if (const toml::node* node = impl_->table->get(key)) {
      if (!node->value_exact<std::int64_t>() && !node->value_exact<std::string>()) {
        fail(key, "expected one of " + join(allowed) + ", got " + type_name(*node) + " " + render(*node));
      }
      value = token(key, value);
    }
  }
  if (std::find(allowed.begin(), allowed.end(), value) == allowed.end()) {
    fail(key, "expected one of " + join(allowed) + ", got '" + value + "'" + did_you_mean(value, allowed));
  }
  return value;
}

std::int64_t ConfigSection::integer(std::string_view key, std::int64_t fallback, std::int64_t min,
                                    std::int64_t max) const {
  auto given = optional<std::int64_t>(key);
  if (!given) return fallback;  // defaults are the caller's business; only given values are checked
  std::int64_t value = *given;
  if (value < min || value > max) {
    std::string range = max == INT64_MAX ? ">= " + std::to_string(min)
                                         : "in [" + std::to_string(min) + ", " + std::to_string(max) + "]";
    fail(key, "expected an integer " + range + ", got " + std::to_string(value));
  }
  return value;
}

std::optional<std::string> ConfigSection::path_value(std::string_view key) const {
  auto value = optional<std::string>(key);
  if (!value || value->empty()) return value;
  std::filesystem::path path(*value);
  if (path.is_absolute()) return value;
  return (std::filesystem::path(impl_->document->base_directory) / path).lexically_normal().string();
}

std::vector<std::string> ConfigSection::path_list(std::string_view key) const {
  if (!has(key)) return {};
  std::vector<std::string> paths;
  if (impl_->table->get(key)->is_string()) {
    paths.push_back(require<std::string>(key));
  } else {
    paths = require<std::vector<std::string>>(key);
  }
  for (auto& value : paths) {
    if (value.empty()) fail(key, "expected a path, got an empty string");
    std::filesystem::path path(value);
    if (!path.is_absolute()) value = (std::filesystem::path(impl_->document->base_directory) / path).lexically_normal().string();
  }
  return paths;
}

ConfigSection ConfigSection::section(std::string_view key) const {
  impl_->asked.emplace(key);
  auto& child = impl_->children[std::string(key)];
  if (!child) {
    child = std::make_shared<Impl>();
    child->document = impl_->document;
    child->path = key_path(key);
    child->depth = impl_->depth + 1;
    if (impl_->table) {
      if (toml::node* node = impl_->table->get(key)) {
        child->table = node->as_table();
        if (!child->table) fail(key, "expected a table, got " + type_name(*node) + " " + render(*node));
      }
    }
  }
  return ConfigSection(child);
}

void ConfigSection::reject_unknown_keys(bool recursive) const {
  if (!impl_->table) return;
  std::vector<std::string> known(impl_->asked.begin(), impl_->asked.end());
  for (auto&& [key, node] : *impl_->table) {
    std::string name(key.str());
    if (!impl_->asked.count(name)) {
      std::string hint = did_you_mean(name, known);
      if (hint.empty() && !known.empty()) hint = " (known keys here: " + join(known) + ")";
      // Located at the key itself, or at its --set.
      auto override_it = impl_->document->overrides.find(key_path(name));
      std::string where = override_it != impl_->document->overrides.end() ? "--set " + override_it->second
                                                                           : position(*impl_->document, key.source());
      throw RecipeError(where + ": " + key_path(name) + ": unknown key" + hint);
    }
  }
  if (!recursive) return;
  for (const auto& [name, child] : impl_->children) ConfigSection(child).reject_unknown_keys();
}

// ---------------------------------------------------------------------------------------------

namespace {

void check_depth(const toml::node& node, const std::string& source_name, int depth) {
  if (depth > kMaxRecipeDepth) {
    throw RecipeError(position(Document{{}, source_name, {}, {}}, node.source()) +
                      ": recipe nests deeper than " + std::to_string(kMaxRecipeDepth) + " levels");
  }
  if (const toml::table* table = node.as_table()) {
    for (auto&& [key, child] : *table) check_depth(child, source_name, depth + 1);
  } else if (const toml::array* array = node.as_array()) {
    for (const toml::node& child : *array) check_depth(child, source_name, depth + 1);
  }
}

toml::table parse_toml(std::string_view text, const std::string& source_name) {
  try {
    toml::table table = toml::parse(text, std::string_view(source_name));
    check_depth(table, source_name, 0);
    return table;
  } catch (const toml::parse_error& error) {
    const auto& where = error.source();
    throw RecipeError(source_name + ":" + std::to_string(where.begin.line) + ":" +
                      std::to_string(where.begin.column) + ": invalid TOML: " + std::string(error.description()));
  }
}

}  // namespace

ConfigDocument::ConfigDocument(std::shared_ptr<ConfigSection::Impl> root) : root_(std::move(root)) {}

ConfigDocument ConfigDocument::parse(std::string_view text, std::string source_name) {
  auto document = std::make_shared<Document>();
  document->root = parse_toml(text, source_name);
  std::error_code error;
  bool is_file = std::filesystem::is_regular_file(source_name, error);
  document->base_directory = is_file ? std::filesystem::absolute(source_name).parent_path().string()
                                     : std::filesystem::current_path().string();
  document->source_name = std::move(source_name);
  auto root = std::make_shared<ConfigSection::Impl>();
  root->document = document;
  root->table = &document->root;
  return ConfigDocument(root);
}

ConfigDocument ConfigDocument::load(const std::string& path) {
  std::string text;
  try {
    text = read_file(path, "recipe file");
  } catch (const Error& error) {
    throw RecipeError(error.what());  // the user's command line named it
  }
  ConfigDocument document = parse(text, path);
  if (document.root_->table->empty()) {  // nothing but whitespace and comments
    throw RecipeError(path + ": the recipe is empty; a recipe names at least [model.mm_cfg.llm] and run.mode (see "
                      "configs/ for examples and docs/recipes.md for every key)");
  }
  return document;
}

void ConfigDocument::set(std::string_view assignment) {
  std::size_t equals = assignment.find('=');
  std::string shown(assignment);
  if (equals == std::string_view::npos || equals == 0) {
    throw RecipeError("--set " + shown + ": expected section.key=value");
  }
  std::string key_path(assignment.substr(0, equals));
  std::string_view value_text = assignment.substr(equals + 1);

  // The value as TOML when it is one (numbers, booleans, quoted strings, arrays), else a plain string.
  toml::table parsed;
  try {
    std::string snippet = "value = " + std::string(value_text);
    parsed = toml::parse(std::string_view(snippet), std::string_view("--set"));
  } catch (const toml::parse_error&) {
    parsed.insert("value", std::string(value_text));
  }

  std::vector<std::string> parts;
  for (std::size_t start = 0;;) {
    std::size_t dot = key_path.find('.', start);
    parts.push_back(key_path.substr(start, dot - start));
    if (parts.back().empty()) throw RecipeError("--set " + shown + ": empty key segment in '" + key_path + "'");
    if (dot == std::string::npos) break;
    start = dot + 1;
  }

  if (parts.size() > static_cast<std::size_t>(kMaxRecipeDepth)) {
    throw RecipeError("--set " + shown + ": the key nests deeper than " + std::to_string(kMaxRecipeDepth) + " levels");
  }
  Document& document = *root_->document;
  toml::table* table = &document.root;
  std::string walked;
  for (std::size_t i = 0; i + 1 < parts.size(); ++i) {
    walked = dotted(walked, parts[i]);
    toml::node* node = table->get(parts[i]);
    if (!node) node = &table->insert(parts[i], toml::table{}).first->second;
    table = node->as_table();
    if (!table) throw RecipeError("--set " + shown + ": '" + walked + "' is not a table in " + document.source_name);
  }
  if (const toml::node* existing = table->get(parts.back()); existing && existing->is_table()) {
    throw RecipeError("--set " + shown + ": '" + key_path + "' is a table; set one of its keys instead");
  }
  parsed.get("value")->visit([&](auto&& value) { table->insert_or_assign(parts.back(), std::move(value)); });
  document.overrides[key_path] = shown;
}

ConfigSection ConfigDocument::root() const { return ConfigSection(root_); }
const std::string& ConfigDocument::source_name() const { return root_->document->source_name; }

std::string ConfigDocument::canonical() const {
  std::ostringstream out;
  out << toml::toml_formatter(*root_->table, toml::format_flags::none);
  return out.str();
}

}  // namespace neva
