#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "neva/api.h"

namespace neva {

// One table of a recipe (e.g. "model.mm_cfg.llm"), read with types and source locations.
//
// Every key read through a section is remembered; reject_unknown_keys() then turns any key nobody
// read into an error with a did-you-mean. Errors name the file, line and column, the full dotted key
// and what was expected. Values given with --set report "--set" as their source.
//
// The host and plugins read their own keys from the same section; copies share that bookkeeping.
class NEVA_API ConfigSection {
 public:
  struct Impl;
  explicit ConfigSection(std::shared_ptr<Impl> impl);
  ConfigSection(const ConfigSection&);
  ConfigSection& operator=(const ConfigSection&);
  ~ConfigSection();

  // Dotted path of this table from the recipe's root ("" for the root).
  const std::string& path() const;
  // The dotted path of `key` inside this table.
  std::string key_path(std::string_view key) const;
  bool has(std::string_view key) const;
  bool empty() const;

  // T is one of: bool, std::int64_t, double, std::string, std::vector<std::int64_t>,
  // std::vector<double>, std::vector<std::string>. An integer is accepted where a double is asked.
  template <class T>
  std::optional<T> optional(std::string_view key) const;
  template <class T>
  T get(std::string_view key, T fallback) const {
    auto value = optional<T>(key);
    return value ? std::move(*value) : std::move(fallback);
  }
  template <class T>
  T require(std::string_view key) const;

  // A name: a string, or an integer read as its decimal spelling (NeMo writes trainer.precision = 32).
  std::string token(std::string_view key, std::string fallback) const;
  // A string that must be one of `allowed` (error lists them, with a did-you-mean).
  std::string choice(std::string_view key, std::string fallback, const std::vector<std::string>& allowed) const;
  // An integer in [min, max] when given; `fallback` (unchecked) when absent.
  std::int64_t integer(std::string_view key, std::int64_t fallback, std::int64_t min,
                       std::int64_t max = INT64_MAX) const;

  // A filesystem path: relative values resolve against the recipe file's directory (the current
  // directory for recipes that are not files).
  std::optional<std::string> path_value(std::string_view key) const;
  // One path or a list of paths, resolved as path_value does; empty when absent.
  std::vector<std::string> path_list(std::string_view key) const;

  // A sub-table; an empty section when absent. Error when `key` holds something that is not a table.
  ConfigSection section(std::string_view key) const;

  // Raises a RecipeError located at `key` (or at this table when the key is absent).
  [[noreturn]] void fail(std::string_view key, std::string_view what) const;
  // "file:line:column" of `key`, or of this table.
  std::string where(std::string_view key = {}) const;

  // Errors for keys present here (and, when `recursive`, in sub-sections opened through section())
  // that were never read.
  void reject_unknown_keys(bool recursive = true) const;

 private:
  std::shared_ptr<Impl> impl_;
};

// A whole recipe document: a TOML file plus --set overrides.
class NEVA_API ConfigDocument {
 public:
  // Parses `text` (TOML) named `source_name` in messages. Throws RecipeError with file:line:column.
  static ConfigDocument parse(std::string_view text, std::string source_name);
  static ConfigDocument load(const std::string& path);

  // Applies "section.key=value": value is read as a TOML value (number, bool, string, array), and as
  // a plain string when it is not one. Intermediate tables are created; a non-table on the path is an error.
  void set(std::string_view assignment);

  ConfigSection root() const;
  const std::string& source_name() const;
  // The document as TOML, overrides applied, keys in sorted order: equal for equal recipes whatever
  // their formatting (what ranks compare to know they run the same recipe).
  std::string canonical() const;

 private:
  explicit ConfigDocument(std::shared_ptr<ConfigSection::Impl> root);
  std::shared_ptr<ConfigSection::Impl> root_;
};

}  // namespace neva
