#include "neva/registry.h"

#include <c10/util/Exception.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <boost/dll/runtime_symbol_info.hpp>
#include <boost/dll/shared_library.hpp>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "neva/suggest.h"

namespace neva {

namespace fs = std::filesystem;

class LoadedPlugin {
 public:
  boost::dll::shared_library library;
  const PluginDescriptor* descriptor = nullptr;
  PluginInfo info;

  std::string label() const { return info.kind + " plugin '" + info.name + "' (" + info.path.string() + ")"; }
};

namespace {

// Runs plugin code and turns anything it throws into a host error while the library is loaded.
template <class Fn>
auto call_plugin(const LoadedPlugin& plugin, const char* what, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const RecipeError& error) {
    throw RecipeError(error.what());
  } catch (const c10::Error& error) {
    const std::string reason = allocation_failure(error.what_without_backtrace());
    throw PluginError(plugin.label() + ": " + what + " failed: " + (reason.empty() ? error.what_without_backtrace() : reason));
  } catch (const std::bad_alloc&) {
    throw PluginError(plugin.label() + ": " + what + " failed: " + out_of_memory());
  } catch (const std::exception& error) {
    throw PluginError(plugin.label() + ": " + what + " failed: " + error.what());
  } catch (...) {
    throw PluginError(plugin.label() + ": " + what + " failed with an exception that is not a std::exception");
  }
}

std::string octal_mode(mode_t mode) {
  std::ostringstream out;
  out << "0" << std::oct << (mode & 07777);
  return out.str();
}

// The sudo rule for loadable code: only from files and directories that nobody but their owner can
// change, owned by the current user or root; and the same for every directory above them, since
// whoever can rename a parent can put other files in the plugin's place. A parent writable by others
// passes only with the sticky bit and a trusted owner (/tmp: others cannot rename what is not theirs).
void check_trusted(const fs::path& path, const char* what) {
  auto refuse = [&](const fs::path& culprit, const std::string& why) {
    const bool self = culprit == path;
    throw PluginError(std::string(what) + " " + path.string() + (self ? "" : ": its parent directory " + culprit.string()) +
                      " " + why + "; refusing to load plugins from it");
  };
  const fs::path canonical = fs::weakly_canonical(path);
  for (fs::path current = canonical;; current = current.parent_path()) {
    struct stat status {};
    if (::stat(current.c_str(), &status) != 0) {
      throw PluginError(std::string(what) + " " + current.string() + ": cannot stat: " + std::strerror(errno));
    }
    const bool self = current == canonical;
    const bool trusted_owner = status.st_uid == 0 || status.st_uid == ::geteuid();
    if (!trusted_owner) {
      refuse(self ? path : current, "is owned by uid " + std::to_string(status.st_uid) + ", neither you nor root");
    }
    const bool sticky_shared = !self && S_ISDIR(status.st_mode) && (status.st_mode & S_ISVTX);
    if ((status.st_mode & (S_IWGRP | S_IWOTH)) && !sticky_shared) {
      refuse(self ? path : current, "is writable by group or others (mode " + octal_mode(status.st_mode) +
                                        ") (fix: chmod go-w '" + (self ? path : current).string() + "')");
    }
    if (current == current.parent_path()) break;
  }
}

std::shared_ptr<LoadedPlugin> load_plugin(const fs::path& path) {
  check_trusted(path, "plugin file");
  auto plugin = std::make_shared<LoadedPlugin>();
  plugin->info.path = path;
  try {
    // Resolve every symbol now, so a broken library fails here with the loader's message.
    plugin->library.load(path.string(), boost::dll::load_mode::rtld_now | boost::dll::load_mode::rtld_local);
  } catch (const std::exception& error) {
    throw PluginError("plugin file " + path.string() + " failed to load: " + error.what());
  }
  if (!plugin->library.has(kPluginEntrySymbol)) {
    throw PluginError("plugin file " + path.string() + " is not a neva plugin: it does not export the entry symbol '" +
                      kPluginEntrySymbol + "' (declare it with NEVA_PLUGIN(...))");
  }
  auto& entry = plugin->library.get_alias<PluginEntry>(kPluginEntrySymbol);
  const PluginDescriptor* descriptor = entry();
  if (!descriptor) throw PluginError("plugin file " + path.string() + ": its entry returned no descriptor");

  // Nothing past `abi` is read unless the ABI is compatible.
  const PluginAbiVersion abi = descriptor->abi;
  std::string abi_text = std::to_string(abi.major) + "." + std::to_string(abi.minor);
  std::string host_abi = std::to_string(kPluginAbiMajor) + "." + std::to_string(kPluginAbiMinor);
  if (abi.major != kPluginAbiMajor) {
    throw PluginError("plugin file " + path.string() + ": plugin ABI " + abi_text +
                      " is incompatible with this neva (plugin ABI " + host_abi +
                      "); rebuild the plugin against this neva's SDK");
  }
  if (abi.minor > kPluginAbiMinor) {
    throw PluginError("plugin file " + path.string() + ": plugin ABI " + abi_text + " is newer than this neva's " +
                      host_abi + "; upgrade neva or rebuild the plugin against this SDK");
  }
  for (auto [field, value] : {std::pair{"kind", descriptor->kind}, {"name", descriptor->name},
                              {"version", descriptor->version}, {"torch_version", descriptor->torch_version}}) {
    if (!value || !*value) {
      throw PluginError("plugin file " + path.string() + ": descriptor field '" + field + "' is empty");
    }
  }
  if (!descriptor->parse_config || !descriptor->create) {
    throw PluginError("plugin file " + path.string() + ": descriptor has no parse_config or create function");
  }
  if (std::strcmp(descriptor->torch_version, TORCH_VERSION) != 0) {
    throw PluginError("plugin file " + path.string() + ": built against LibTorch " + descriptor->torch_version +
                      ", but neva runs LibTorch " + TORCH_VERSION + "; rebuild the plugin against LibTorch " +
                      TORCH_VERSION);
  }
  plugin->descriptor = descriptor;
  plugin->info = PluginInfo{descriptor->kind,
                            descriptor->name,
                            descriptor->version,
                            descriptor->torch_version,
                            descriptor->summary ? descriptor->summary : "",
                            abi,
                            path};
  return plugin;
}

std::vector<fs::path> split_path_list(const std::string& list) {
  std::vector<fs::path> out;
  std::size_t start = 0;
  while (start <= list.size()) {
    std::size_t colon = list.find(':', start);
    if (colon == std::string::npos) colon = list.size();
    if (colon > start) out.emplace_back(list.substr(start, colon - start));
    start = colon + 1;
  }
  return out;
}

}  // namespace

fs::path Registry::install_directory() {
  return boost::dll::program_location().parent_path().parent_path().native() + std::string("/lib/neva/plugins");
}

Registry::Registry(const Options& options) {
  // Files named one by one are required: any problem with them is an error now.
  for (const auto& file : options.plugin_files) {
    if (!file.is_absolute()) throw PluginError("plugin file '" + file.string() + "' is not an absolute path");
    if (!fs::is_regular_file(file)) throw PluginError("plugin file " + file.string() + " does not exist");
    check_trusted(file.parent_path(), "plugin directory");
    plugins_.push_back(load_plugin(file));
  }
  // (directory, required): explicitly named directories must exist; the install directory may not.
  std::vector<std::pair<fs::path, bool>> candidates;
  for (const auto& path : options.search_paths) {
    if (!path.is_absolute()) {
      throw PluginError("plugin directory '" + path.string() + "' is not an absolute path");
    }
    candidates.emplace_back(path, true);
  }
  if (options.use_environment) {
    if (const char* list = std::getenv("NEVA_PLUGIN_PATH")) {
      for (const auto& path : split_path_list(list)) {
        if (!path.is_absolute()) {
          throw PluginError("NEVA_PLUGIN_PATH entry '" + path.string() +
                            "' is not an absolute path (the current directory is never searched implicitly)");
        }
        candidates.emplace_back(path, true);
      }
    }
  }
  if (options.use_install_directory) candidates.emplace_back(install_directory(), false);

  for (const auto& [path, required] : candidates) {
    std::error_code error;
    if (!fs::is_directory(path, error)) {
      if (required) throw PluginError("plugin directory " + path.string() + " does not exist or is not a directory");
      directories_.push_back(path);
      continue;
    }
    fs::path canonical = fs::canonical(path);
    if (std::find(directories_.begin(), directories_.end(), canonical) != directories_.end()) continue;
    directories_.push_back(canonical);
    check_trusted(canonical, "plugin directory");

    std::vector<fs::path> files;
    for (const auto& entry : fs::directory_iterator(canonical)) {
      if (entry.path().extension() != ".so") continue;
      std::error_code unreadable;
      if (entry.is_regular_file(unreadable)) {
        files.push_back(entry.path());
      } else if (unreadable) {  // e.g. a symlink loop or a dangling link: set aside like a broken file
        broken_.push_back({entry.path(), "plugin file " + entry.path().string() + ": cannot stat: " + unreadable.message()});
      }
    }
    std::sort(files.begin(), files.end());
    // A file found in a directory that cannot be used is set aside with its reason, and only an
    // error when something asks for a plugin (a stray or broken .so must not stop every command).
    for (const auto& file : files) {
      if (std::any_of(plugins_.begin(), plugins_.end(), [&](const auto& p) {
            std::error_code ignored;
            return fs::equivalent(p->info.path, file, ignored);
          })) {
        continue;  // already loaded as a single file
      }
      std::shared_ptr<LoadedPlugin> plugin;
      try {
        plugin = load_plugin(file);
      } catch (const PluginError& error) {
        broken_.push_back({file, error.what()});
        continue;
      } catch (const std::exception& error) {  // a filesystem error while checking it
        broken_.push_back({file, "plugin file " + file.string() + ": " + error.what()});
        continue;
      }
      const auto other = std::find_if(plugins_.begin(), plugins_.end(), [&](const auto& p) {
        return p->info.kind == plugin->info.kind && p->info.name == plugin->info.name;
      });
      if (other != plugins_.end()) {
        const std::string problem = "duplicate " + plugin->info.kind + " plugin '" + plugin->info.name + "': " +
                                    (*other)->info.path.string() + " and " + file.string() + " (remove one of them)";
        broken_.push_back({file, problem});
        duplicates_.emplace(plugin->info.kind + "/" + plugin->info.name, problem);
        continue;
      }
      plugins_.push_back(std::move(plugin));
    }
  }
}

Registry::~Registry() = default;

std::vector<PluginInfo> Registry::list() const {
  std::vector<PluginInfo> out;
  for (const auto& plugin : plugins_) out.push_back(plugin->info);
  std::sort(out.begin(), out.end(),
            [](const PluginInfo& a, const PluginInfo& b) { return std::tie(a.kind, a.name) < std::tie(b.kind, b.name); });
  return out;
}

// `plugin`, unless another file holds a plugin of the same kind and name: then neither is used.
const std::shared_ptr<LoadedPlugin>& Registry::unique(const std::shared_ptr<LoadedPlugin>& plugin) const {
  auto duplicate = duplicates_.find(plugin->info.kind + "/" + plugin->info.name);
  if (duplicate != duplicates_.end()) throw PluginError(duplicate->second);
  return plugin;
}

const std::shared_ptr<LoadedPlugin>& Registry::plugin(const std::string& kind, const std::string& name) const {
  std::vector<const std::shared_ptr<LoadedPlugin>*> answering;
  std::vector<std::string> available;
  for (const auto& plugin : plugins_) {
    if (plugin->info.kind != kind) continue;
    if (plugin->info.name == name) return unique(plugin);
    available.push_back(plugin->info.name);
    if (plugin->descriptor->answers_to &&
        call_plugin(*plugin, "answers_to", [&] { return plugin->descriptor->answers_to(name.c_str()); })) {
      answering.push_back(&plugin);
    }
  }
  if (answering.size() == 1) return unique(*answering.front());
  if (answering.size() > 1) {
    throw PluginError("several " + kind + " plugins answer to '" + name + "': " + (*answering[0])->label() + " and " +
                      (*answering[1])->label());
  }
  std::sort(available.begin(), available.end());
  std::string searched;
  for (const auto& directory : directories_) searched += (searched.empty() ? "" : ", ") + directory.string();
  std::string unusable;
  for (const auto& broken : broken_) unusable += (unusable.empty() ? "" : "; ") + broken.problem;
  throw PluginError("no " + kind + " plugin named '" + name + "'" + did_you_mean(name, available) + "; available: " +
                    (available.empty() ? std::string("none") : join(available)) + " (searched: " + searched + ")" +
                    (unusable.empty() ? "" : "; " + std::to_string(broken_.size()) + " file(s) there could not be " +
                                                 "loaded, which may be the one meant: " + unusable));
}

const PluginInfo& Registry::find(const std::string& kind, const std::string& name) const {
  return plugin(kind, name)->info;
}

std::shared_ptr<ComponentConfig> Registry::parse_config(const std::string& kind, const std::string& name,
                                                              const ConfigSection& section) const {
  std::shared_ptr<const LoadedPlugin> library = plugin(kind, name);
  const LoadedPlugin& found = *library;
  ComponentConfig* config = call_plugin(found, "parse_config", [&] { return found.descriptor->parse_config(name.c_str(), section); });
  if (!config) throw PluginError(found.label() + ": parse_config returned nothing");
  return std::shared_ptr<ComponentConfig>(config, [library](ComponentConfig* c) { delete c; });
}

std::pair<Component*, std::shared_ptr<const LoadedPlugin>> Registry::create_component(
    const std::string& kind, const std::string& name, const ComponentConfig& config,
    const RuntimeContext& context) const {
  std::shared_ptr<const LoadedPlugin> library = plugin(kind, name);
  const LoadedPlugin& found = *library;
  Component* component = call_plugin(found, "create", [&] { return found.descriptor->create(config, context); });
  if (!component) throw PluginError(found.label() + ": create returned nothing");
  return {component, std::move(library)};
}

void Registry::throw_wrong_type(const std::string& kind, const std::string& name) const {
  throw PluginError(plugin(kind, name)->label() + ": create returned an object that does not implement the " + kind +
                    " interface");
}

}  // namespace neva
