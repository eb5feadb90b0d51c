#pragma once
// The contract between neva and a plugin library.
//
// A plugin is one shared library exporting exactly one entry: the Boost.DLL alias `neva_plugin`,
// a function returning a pointer to a static PluginDescriptor. The host reads `abi` first and reads
// nothing else unless the major version equals its own and the minor version is not newer.
//
//   Minor version: fields appended at the end of PluginDescriptor or of the structures passed to
//   plugins (RuntimeContext::groups and ParallelGroups grow at their end); older plugins stay loadable.
//   Major version: anything else (a changed field, a changed interface class).
//   2.0: RuntimeContext carries the generator layers initialise from and every
//   process group (last); headers grouped by concern (neva/io, data, nn, model, parallel, train,
//   inference); layers built from the context through neva::nn's factories (docs/plugins.md).
//   2.1: World::timeout (appended), the wait a parallel strategy creates its groups with.
//   2.2: tensor and sequence parallelism: RuntimeContext::sequence_parallel and
//   ::make_vocab_size_divisible_by, ParameterSharding::logical_size and ::tensor_parallel_replicas,
//   BackboneInputs::vocab_parallel_logits (all appended).
//   2.3: pipeline parallelism: RuntimeContext::virtual_pipeline_chunks and ::pipeline_layer_split,
//   BackboneInputs::pipeline_chunk and ::sequence_length (all appended).
//   2.4: nn::LinearKernel and LinearImpl::set_kernel (a member appended after LinearImpl's others):
//   a precision recipe computing linear layers' products (the fp8 recipe).
//   2.5: BackboneInputs::cache_rows and ::cache_lengths (appended; AttentionMask grew at its end):
//   a KV cache whose rows are slots of their own lengths (continuous batching in neva-run serve,
//   which refuses a backbone built against an older minor version).
//
// Plugins must build against the same LibTorch as the host (checked through torch_version), link
// libneva_core, use hidden visibility, and register no operators statically (no TORCH_LIBRARY).
#include <torch/version.h>

#include <cstdint>

#include "neva/component.h"
#include "neva/config.h"
#include "neva/context.h"

namespace neva {

inline constexpr std::uint32_t kPluginAbiMajor = 2;
inline constexpr std::uint32_t kPluginAbiMinor = 5;
inline constexpr const char* kPluginEntrySymbol = "neva_plugin";

struct PluginAbiVersion {
  std::uint32_t major;
  std::uint32_t minor;
};

struct PluginDescriptor {
  PluginAbiVersion abi;       // always first: {kPluginAbiMajor, kPluginAbiMinor} at build time
  const char* kind;           // an interface's kKind: "connector", "language_backbone", ...
  const char* name;           // unique per kind: what recipes name
  const char* version;        // the plugin's own version
  const char* torch_version;  // TORCH_VERSION the plugin was built against
  const char* summary;        // one line for `neva-run plugins`
  // Other names this plugin answers to (e.g. "mlp2x_gelu" for the mlp connector); may be null.
  bool (*answers_to)(const char* name);
  // Reads and validates this plugin's keys from its recipe table; returns a new typed config whose
  // base matches the kind (e.g. ConnectorConfig). Throws RecipeError (via ConfigSection) on bad input.
  // `requested_name` is the name the recipe used (this plugin's name or one it answers to).
  ComponentConfig* (*parse_config)(const char* requested_name, const ConfigSection& section);
  // Builds a component of the kind's interface type from a config parse_config returned.
  Component* (*create)(const ComponentConfig& config, const RuntimeContext& context);
};

using PluginEntry = const PluginDescriptor*();

// Helpers for writing descriptors.
template <class Config>
ComponentConfig* parse_plugin_config(const char* requested_name, const ConfigSection& section) {
  return new Config(Config::parse(requested_name, section));
}
template <class Config, class Impl>
Component* create_plugin_component(const ComponentConfig& config, const RuntimeContext& context) {
  return new Impl(dynamic_cast<const Config&>(config), context);
}

}  // namespace neva

#include <boost/dll/alias.hpp>

// Exports `describe_function` (returning const neva::PluginDescriptor*) as the plugin's entry.
#define NEVA_PLUGIN(describe_function) BOOST_DLL_ALIAS(describe_function, neva_plugin)

// ABI and LibTorch version fields for a descriptor built now.
#define NEVA_PLUGIN_ABI_FIELDS {::neva::kPluginAbiMajor, ::neva::kPluginAbiMinor}
#define NEVA_PLUGIN_TORCH_VERSION TORCH_VERSION
