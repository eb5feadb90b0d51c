// One deliberately faulty plugin per build of this file; NEVA_FAULT selects the fault.
// The registry tests prove each fault gives its own clear error instead of a crash.
#include <stdexcept>

#include "neva/connector.h"
#include "neva/plugin_abi.h"

#define FAULT_NONE 0
#define FAULT_ABI_MAJOR 1
#define FAULT_ABI_MINOR 2
#define FAULT_TORCH_VERSION 3
#define FAULT_NO_ENTRY 4
#define FAULT_UNDEFINED_SYMBOL 5
#define FAULT_THROWING_FACTORY 6
#define FAULT_EMPTY_NAME 7
#define FAULT_WRONG_INTERFACE 8
#define FAULT_THROWING_PARSE 9
#define FAULT_ABI_1 10  // built for plugin ABI 1.1, before the 2.0 context

#if NEVA_FAULT == FAULT_UNDEFINED_SYMBOL
extern "C" int neva_test_symbol_that_no_library_defines();
#endif

namespace {

struct Config : neva::ConnectorConfig {
  static Config parse(const char*, const neva::ConfigSection& section) {
#if NEVA_FAULT == FAULT_THROWING_PARSE
    throw std::logic_error("parse exploded");
#endif
    Config config;
    config.read_sizes(section);
    return config;
  }
};

class Identity : public neva::Connector {
 public:
  Identity(const Config& config, const neva::RuntimeContext&) : size_(config.input_size) {
#if NEVA_FAULT == FAULT_THROWING_FACTORY
    throw std::runtime_error("factory exploded on purpose");
#endif
  }
  at::Tensor forward(const at::Tensor& x) override { return x; }
  std::int64_t input_size() const override { return size_; }
  std::int64_t output_size() const override { return size_; }

 private:
  std::int64_t size_;
};

class NotAConnector : public neva::Component {};

neva::Component* create(const neva::ComponentConfig& config, const neva::RuntimeContext& context) {
#if NEVA_FAULT == FAULT_UNDEFINED_SYMBOL
  neva_test_symbol_that_no_library_defines();
#endif
#if NEVA_FAULT == FAULT_WRONG_INTERFACE
  return new NotAConnector();
#else
  return new Identity(dynamic_cast<const Config&>(config), context);
#endif
}

const neva::PluginDescriptor* describe() {
  static const neva::PluginDescriptor descriptor{
#if NEVA_FAULT == FAULT_ABI_MAJOR
      {neva::kPluginAbiMajor + 1, 0},
#elif NEVA_FAULT == FAULT_ABI_1
      {1, 1},
#elif NEVA_FAULT == FAULT_ABI_MINOR
      {neva::kPluginAbiMajor, neva::kPluginAbiMinor + 1},
#else
      NEVA_PLUGIN_ABI_FIELDS,
#endif
      neva::Connector::kKind,
#if NEVA_FAULT == FAULT_EMPTY_NAME
      "",
#else
      NEVA_TEST_PLUGIN_NAME,
#endif
      "0.0.1",
#if NEVA_FAULT == FAULT_TORCH_VERSION
      "1.13.0",
#else
      NEVA_PLUGIN_TORCH_VERSION,
#endif
      "test plugin with a deliberate fault",
      nullptr,
      &neva::parse_plugin_config<Config>,
      &create,
  };
  return &descriptor;
}

}  // namespace

#if NEVA_FAULT != FAULT_NO_ENTRY
NEVA_PLUGIN(describe)
#else
// Exported, but not under the entry name.
extern "C" __attribute__((visibility("default"))) const void* not_the_entry() { return describe(); }
#endif
