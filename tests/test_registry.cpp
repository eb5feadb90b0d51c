#include <doctest/doctest.h>
#include <sys/stat.h>

#include <filesystem>

#include "neva/connector.h"
#include "neva/registry.h"
#include "test_support.h"

namespace fs = std::filesystem;
using neva::PluginError;
using neva::Registry;
using neva::test::broken_plugin_directory;
using neva::test::plugin_directory;
using neva::test::TempDir;

namespace {

Registry::Options only(std::vector<fs::path> directories) {
  Registry::Options options;
  options.search_paths = std::move(directories);
  options.use_environment = false;
  options.use_install_directory = false;
  return options;
}

std::string registry_error(const Registry::Options& options) {
  try {
    Registry registry(options);
  } catch (const PluginError& error) {
    return error.what();
  }
  FAIL("expected a PluginError");
  return {};
}

// What a registry over `options` set aside (a plugin file that could not be loaded), all in one text.
std::string broken_problems(const Registry::Options& options) {
  Registry registry(options);
  std::string all;
  for (const auto& broken : registry.broken()) all += broken.problem + "\n";
  if (all.empty()) FAIL("expected a broken plugin file");
  return all;
}

fs::path broken_file(const std::string& fault) {
  return broken_plugin_directory(fault) / ("libneva-test-" + fault + ".so");
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

neva::ConfigDocument sizes_recipe() { return neva::ConfigDocument::parse("input_size = 8\noutput_size = 4\n", "t.toml"); }

}  // namespace

TEST_CASE("the built-in plugins are listed without being instantiated") {
  Registry registry(only({plugin_directory()}));
  auto plugins = registry.list();
  std::vector<std::string> names;
  for (const auto& plugin : plugins) names.push_back(plugin.kind + "/" + plugin.name);
  // Sorted by (kind, name).
  CHECK(names == std::vector<std::string>{"connector/linear", "connector/mlp", "language_backbone/llama",
                                          "language_backbone/mistral", "language_backbone/mixtral",
                                          "language_backbone/nemotron4", "parallel_strategy/megatron",
                                          "precision_recipe/bf16", "precision_recipe/fp32", "precision_recipe/fp8", "vision_encoder/clip",
                                          "vision_encoder/siglip"});
  CHECK(plugins[1].abi.major == neva::kPluginAbiMajor);
  CHECK(plugins[1].torch_version == TORCH_VERSION);
  CHECK(registry.find("connector", "mlp2x_gelu").name == "mlp");  // answers_to
}

TEST_CASE("a created component keeps its library loaded after the registry is gone") {
  std::shared_ptr<neva::Connector> connector;
  {
    Registry registry(only({plugin_directory()}));
    auto config = registry.parse_config("connector", "linear", sizes_recipe().root());
    connector = registry.create<neva::Connector>("linear", *config, neva::RuntimeContext{});
  }
  // Calls into the plugin's code: would crash had the library been unloaded with the registry.
  auto out = connector->forward(torch::ones({1, 3, 8}));
  CHECK(out.sizes() == at::IntArrayRef({1, 3, 4}));
  CHECK(connector->named_parameters().size() == 2);
}

TEST_CASE("ABI major mismatch is refused with both versions named") {
  auto message = broken_problems(only({broken_plugin_directory("abi_major")}));
  CHECK(contains(message, broken_file("abi_major").string()));
  CHECK(contains(message, "plugin ABI 3.0 is incompatible with this neva (plugin ABI 2.5)"));
}

TEST_CASE("a plugin built for plugin ABI 1 is refused with the advice to rebuild it") {
  auto message = broken_problems(only({broken_plugin_directory("abi_1")}));
  CHECK(contains(message, broken_file("abi_1").string()));
  CHECK(contains(message, "plugin ABI 1.1 is incompatible with this neva (plugin ABI 2.5); rebuild the plugin against "
                          "this neva's SDK"));
}

TEST_CASE("a plugin built for a newer minor ABI is refused") {
  auto message = broken_problems(only({broken_plugin_directory("abi_minor")}));
  CHECK(contains(message, "plugin ABI 2.6 is newer than this neva's 2.5"));
}

TEST_CASE("a plugin built against another LibTorch is refused") {
  auto message = broken_problems(only({broken_plugin_directory("torch_version")}));
  CHECK(contains(message, std::string("built against LibTorch 1.13.0, but neva runs LibTorch ") + TORCH_VERSION));
}

TEST_CASE("a library without the entry symbol is not a plugin") {
  auto message = broken_problems(only({broken_plugin_directory("no_entry")}));
  CHECK(contains(message, broken_file("no_entry").string() +
                              " is not a neva plugin: it does not export the entry symbol 'neva_plugin'"));
}

TEST_CASE("a library that fails to load reports the loader's message") {
  SUBCASE("unresolved symbol") {
    auto message = broken_problems(only({broken_plugin_directory("undefined_symbol")}));
    CHECK(contains(message, broken_file("undefined_symbol").string() + " failed to load"));
    CHECK(contains(message, "neva_test_symbol_that_no_library_defines"));
  }
  SUBCASE("not a shared library at all") {
    TempDir dir;
    dir.write("libgarbage.so", std::string(256, 'x'));  // long enough to be read, not ELF
    auto message = broken_problems(only({dir.path()}));
    CHECK(contains(message, "libgarbage.so failed to load"));
    CHECK(contains(message, "invalid ELF header"));
  }
}

TEST_CASE("an incomplete descriptor is refused") {
  auto message = broken_problems(only({broken_plugin_directory("empty_name")}));
  CHECK(contains(message, "descriptor field 'name' is empty"));
}

TEST_CASE("a duplicate (kind, name) names both files when that plugin is asked for") {
  TempDir dir;
  fs::copy_file(plugin_directory() / "libneva-connector-mlp.so", dir.path() / "libcopy-of-mlp.so");
  Registry registry(only({plugin_directory(), dir.path()}));
  const std::string expected = "duplicate connector plugin 'mlp': " +
                               (plugin_directory() / "libneva-connector-mlp.so").string() + " and " +
                               (dir.path() / "libcopy-of-mlp.so").string();
  CHECK_THROWS_WITH_AS(registry.find("connector", "mlp"), doctest::Contains(expected.c_str()), PluginError);
  CHECK(registry.find("connector", "linear").name == "linear");  // the others are unaffected
}

TEST_CASE("a stray or broken .so in a plugin directory does not stop the others, and is named when a plugin is missing") {
  TempDir dir;
  fs::copy_file(plugin_directory() / "libneva-connector-linear.so", dir.path() / "libneva-connector-linear.so");
  dir.write("libstray.so", std::string(256, 'x'));
  fs::copy_file(broken_file("abi_major"), dir.path() / "libold-abi.so");
  Registry registry(only({dir.path()}));
  CHECK(registry.list().size() == 1);
  CHECK(registry.broken().size() == 2);
  CHECK(registry.find("connector", "linear").name == "linear");
  CHECK_THROWS_WITH_AS(registry.find("connector", "mlp"),
                       doctest::Contains(("2 file(s) there could not be loaded, which may be the one meant: plugin file " +
                                          (dir.path() / "libold-abi.so").string() + ": plugin ABI 3.0 is incompatible")
                                             .c_str()),
                       PluginError);
}

TEST_CASE("the same directory named twice is searched once") {
  Registry registry(only({plugin_directory(), plugin_directory() / "." }));
  CHECK(registry.list().size() == Registry(only({plugin_directory()})).list().size());
}

TEST_CASE("plugin files and directories writable by group or others are refused") {
  SUBCASE("file") {
    TempDir dir;
    fs::path copy = dir.path() / "libneva-connector-linear.so";
    fs::copy_file(plugin_directory() / "libneva-connector-linear.so", copy);
    ::chmod(copy.c_str(), 0775);
    auto message = broken_problems(only({dir.path()}));
    CHECK(contains(message, "plugin file " + copy.string() + " is writable by group or others (mode 0775)"));
  }
  SUBCASE("directory") {
    TempDir dir;
    ::chmod(dir.path().c_str(), 0777);
    auto message = registry_error(only({dir.path()}));
    CHECK(contains(message, "plugin directory " + fs::canonical(dir.path()).string() +
                                " is writable by group or others (mode 0777)"));
  }
  SUBCASE("a directory above the plugin directory (whoever may rename it may swap the plugins)") {
    TempDir dir;
    fs::create_directories(dir.path() / "plugins");
    fs::copy_file(plugin_directory() / "libneva-connector-linear.so", dir.path() / "plugins/libneva-connector-linear.so");
    ::chmod(dir.path().c_str(), 0777);
    auto message = registry_error(only({dir.path() / "plugins"}));
    CHECK(contains(message, "plugin directory " + fs::canonical(dir.path() / "plugins").string() +
                                ": its parent directory " + fs::canonical(dir.path()).string() +
                                " is writable by group or others (mode 0777)"));
    ::chmod(dir.path().c_str(), 01777);  // sticky, as /tmp: others cannot rename what is not theirs
    CHECK(Registry(only({dir.path() / "plugins"})).list().size() == 1);
  }
}

TEST_CASE("search paths must exist and be absolute") {
  CHECK(contains(registry_error(only({"/nonexistent/plugins"})),
                 "plugin directory /nonexistent/plugins does not exist or is not a directory"));
  CHECK(contains(registry_error(only({"relative/plugins"})), "plugin directory 'relative/plugins' is not an absolute path"));
}

TEST_CASE("NEVA_PLUGIN_PATH is searched, and relative entries are refused") {
  Registry::Options options = only({});
  options.use_environment = true;
  ::setenv("NEVA_PLUGIN_PATH", plugin_directory().c_str(), 1);
  CHECK(Registry(options).list().size() == Registry(only({plugin_directory()})).list().size());
  ::setenv("NEVA_PLUGIN_PATH", "plugins", 1);
  CHECK(contains(registry_error(options), "NEVA_PLUGIN_PATH entry 'plugins' is not an absolute path"));
  ::unsetenv("NEVA_PLUGIN_PATH");
}

TEST_CASE("an unknown name lists the available plugins of that kind") {
  Registry registry(only({plugin_directory()}));
  try {
    registry.find("connector", "mpl");
    FAIL("expected a PluginError");
  } catch (const PluginError& error) {
    std::string message = error.what();
    CHECK(contains(message, "no connector plugin named 'mpl' (did you mean 'mlp'?); available: linear, mlp"));
  }
  CHECK_THROWS_WITH_AS(registry.find("precision_recipe", "fp16"),
                       doctest::Contains("no precision_recipe plugin named 'fp16'; available: bf16, fp32, fp8"), PluginError);
  CHECK(registry.find("precision_recipe", "fp8:bf16").name == "fp8");  // model.fp8 over trainer.precision
  CHECK(registry.find("precision_recipe", "32").name == "fp32");  // NeMo's spelling answers
  CHECK(registry.find("precision_recipe", "bf16-mixed").name == "bf16");
}

TEST_CASE("a factory that throws becomes a host error naming the plugin") {
  Registry registry(only({broken_plugin_directory("throwing_factory")}));
  auto config = registry.parse_config("connector", "test_throwing_factory", sizes_recipe().root());
  CHECK_THROWS_WITH_AS(registry.create<neva::Connector>("test_throwing_factory", *config, neva::RuntimeContext{}),
                       doctest::Contains(("connector plugin 'test_throwing_factory' (" +
                                          broken_file("throwing_factory").string() +
                                          "): create failed: factory exploded on purpose")
                                             .c_str()),
                       PluginError);
}

TEST_CASE("a config parser that throws becomes a host error naming the plugin") {
  Registry registry(only({broken_plugin_directory("throwing_parse")}));
  CHECK_THROWS_WITH_AS(registry.parse_config("connector", "test_throwing_parse", sizes_recipe().root()),
                       doctest::Contains("parse_config failed: parse exploded"), PluginError);
}

TEST_CASE("a plugin whose object does not implement its kind's interface is refused") {
  Registry registry(only({broken_plugin_directory("wrong_interface")}));
  auto config = registry.parse_config("connector", "test_wrong_interface", sizes_recipe().root());
  CHECK_THROWS_WITH_AS(registry.create<neva::Connector>("test_wrong_interface", *config, neva::RuntimeContext{}),
                       doctest::Contains("does not implement the connector interface"), PluginError);
}

TEST_CASE("the well-formed test plugin loads (the faults above are the only difference)") {
  Registry registry(only({broken_plugin_directory("ok")}));
  auto config = registry.parse_config("connector", "test_ok", sizes_recipe().root());
  auto connector = registry.create<neva::Connector>("test_ok", *config, neva::RuntimeContext{});
  CHECK(connector->input_size() == 8);
}
