#pragma once
// Finds plugin libraries, checks them, lists them without instantiating anything, and creates
// components by (kind, name). Every object a plugin creates keeps the plugin's library loaded for as
// long as the object lives.
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "neva/component.h"
#include "neva/config.h"
#include "neva/context.h"
#include "neva/error.h"
#include "neva/plugin_abi.h"

namespace neva {

struct PluginInfo {
  std::string kind;
  std::string name;
  std::string version;
  std::string torch_version;
  std::string summary;
  PluginAbiVersion abi{};
  std::filesystem::path path;
};

class LoadedPlugin;  // one library and its descriptor

class NEVA_API Registry {
 public:
  struct Options {
    // Searched first, in order. Must be absolute (callers resolve recipe paths against the recipe).
    std::vector<std::filesystem::path> search_paths;
    // Then NEVA_PLUGIN_PATH (':'-separated absolute directories), then the install directory
    // (<directory of the running executable>/../lib/neva/plugins). The current directory never.
    bool use_environment = true;
    bool use_install_directory = true;
    // Single plugin files loaded first (absolute paths), e.g. the one neva-conformance examines.
    std::vector<std::filesystem::path> plugin_files;
  };

  // Scans every directory and loads every *.so in it. Throws PluginError for a search directory that
  // is missing, relative, or (it or a directory above it) writable by others or owned by another user,
  // and for any problem with a file of `plugin_files`. A file in a directory that cannot be used (a
  // library that fails to load, no entry symbol, an ABI or LibTorch mismatch, an incomplete
  // descriptor, a file writable by others, a duplicate (kind, name)) is listed in broken() instead,
  // and named when a plugin is asked for and not found (or is the duplicate).
  explicit Registry(const Options& options);
  ~Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // The directories searched, in order (existing or not).
  const std::vector<std::filesystem::path>& directories() const { return directories_; }
  std::vector<PluginInfo> list() const;
  struct Broken {
    std::filesystem::path path;
    std::string problem;  // the whole message, naming the file
  };
  const std::vector<Broken>& broken() const { return broken_; }

  // The plugin of `kind` called `name`, or answering to it. Throws PluginError listing those available.
  const PluginInfo& find(const std::string& kind, const std::string& name) const;

  // Runs the plugin's parse_config on `section`. RecipeErrors pass through; anything else the plugin
  // throws becomes a PluginError naming it.
  std::shared_ptr<ComponentConfig> parse_config(const std::string& kind, const std::string& name,
                                                      const ConfigSection& section) const;

  // Builds a component; the result keeps the plugin library loaded.
  template <class Interface>
  std::shared_ptr<Interface> create(const std::string& name, const ComponentConfig& config,
                                    const RuntimeContext& context) const {
    // Named, not a structured binding: the deleter captures them (C++17 cannot capture bindings).
    auto created = create_component(Interface::kKind, name, config, context);
    Component* component = created.first;
    std::shared_ptr<const LoadedPlugin> library = std::move(created.second);
    auto* typed = dynamic_cast<Interface*>(component);
    if (!typed) {
      delete component;
      throw_wrong_type(Interface::kKind, name);
    }
    // Constructed from the typed pointer so that torch::nn::Module's shared_from_this works; the
    // deleter deletes through Component, then releases the library it holds.
    return std::shared_ptr<Interface>(typed, [component, library](Interface*) { delete component; });
  }

  // The host's install plugin directory for the running executable.
  static std::filesystem::path install_directory();

 private:
  std::pair<Component*, std::shared_ptr<const LoadedPlugin>> create_component(
      const std::string& kind, const std::string& name, const ComponentConfig& config,
      const RuntimeContext& context) const;
  const std::shared_ptr<LoadedPlugin>& plugin(const std::string& kind, const std::string& name) const;
  const std::shared_ptr<LoadedPlugin>& unique(const std::shared_ptr<LoadedPlugin>& plugin) const;
  [[noreturn]] void throw_wrong_type(const std::string& kind, const std::string& name) const;

  std::vector<std::filesystem::path> directories_;
  std::vector<std::shared_ptr<LoadedPlugin>> plugins_;
  std::vector<Broken> broken_;
  std::map<std::string, std::string> duplicates_;  // "kind/name" -> the duplicate's message
};

}  // namespace neva
