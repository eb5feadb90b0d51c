#include "neva/recipe.h"

#include "neva/nn/module.h"

#include <c10/core/Device.h>

#include <functional>

#include "neva/data/conversation.h"
#include "neva/error.h"
#include "neva/io/hf_config.h"
#include "neva/model/llava.h"
#include "neva/language_backbone.h"
#include "neva/vision_encoder.h"

namespace neva {

namespace fs = std::filesystem;

namespace {

const std::vector<std::string> kModes = {"inspect", "train", "generate", "score", "serve"};

RunConfig parse_run(const ConfigSection& run, const fs::path& base_directory) {
  RunConfig config;
  config.mode = run.choice("mode", config.mode, kModes);
  config.seed = static_cast<std::uint64_t>(run.integer("seed", static_cast<std::int64_t>(config.seed), 0));
  config.device = run.get<std::string>("device", config.device);
  try {
    c10::Device device(config.device);
    if (!device.is_cpu() && !device.is_cuda()) run.fail("device", "expected cpu, cuda or cuda:N, got '" + config.device + "'");
  } catch (const c10::Error&) {
    run.fail("device", "expected cpu, cuda or cuda:N, got '" + config.device + "'");
  }
  for (const auto& path : run.get<std::vector<std::string>>("plugin_paths", {})) {
    fs::path resolved = fs::path(path).is_absolute() ? fs::path(path) : base_directory / path;
    config.plugin_paths.push_back(resolved.lexically_normal());
  }
  return config;
}

ParallelSizes parse_parallel(const ConfigSection& model) {
  ParallelSizes sizes;
  sizes.tensor = model.integer("tensor_model_parallel_size", 1, 1);
  sizes.pipeline = model.integer("pipeline_model_parallel_size", 1, 1);
  sizes.virtual_pipeline = model.integer("virtual_pipeline_model_parallel_size", 1, 1);
  sizes.context = model.integer("context_parallel_size", 1, 1);
  sizes.expert = model.integer("expert_model_parallel_size", 1, 1);
  if (sizes.context > 1 && sizes.expert > 1) {
    model.fail("context_parallel_size", "context parallelism together with expert parallelism is not implemented "
                                        "yet: set one of them to 1");
  }
  if (sizes.expert > 1 && sizes.tensor > 1) {
    model.fail("expert_model_parallel_size", "expert parallelism together with tensor parallelism (experts split "
                                             "over both) is not implemented yet: set one of them to 1");
  }
  sizes.sequence_parallel = model.get<bool>("sequence_parallel", false);
  if (sizes.sequence_parallel && sizes.tensor == 1) {
    model.fail("sequence_parallel", "sequence parallelism splits activations across the tensor-parallel group; "
                                    "it needs tensor_model_parallel_size > 1");
  }
  if (sizes.virtual_pipeline > 1 && sizes.pipeline == 1) {
    model.fail("virtual_pipeline_model_parallel_size", "interleaved pipelining needs pipeline_model_parallel_size > 1");
  }
  return sizes;
}

// Resolves `name` to a plugin of `kind`; an unknown name is the recipe's fault, located at `key`.
void require_plugin(const Registry& registry, const ConfigSection& where, const std::string& key,
                    const std::string& kind, const std::string& name) {
  try {
    registry.find(kind, name);
  } catch (const PluginError& error) {
    where.fail(key, error.what());
  }
}

// A model component's table: host keys (plugin, from_pretrained, freeze), then the plugin's own.
std::optional<ComponentSpec> parse_component(const Registry& registry, const ConfigSection& parent,
                                             const std::string& key, const std::string& kind, bool default_freeze) {
  if (!parent.has(key)) return std::nullopt;
  ConfigSection table = parent.section(key);
  ComponentSpec spec;
  spec.kind = kind;
  spec.section = table.path();
  spec.plugin = table.require<std::string>("plugin");
  spec.from_pretrained = table.path_value("from_pretrained").value_or("");
  spec.hf_config = table.path_value("config").value_or(spec.from_pretrained);
  spec.freeze = table.get<bool>("freeze", default_freeze);
  require_plugin(registry, table, "plugin", kind, spec.plugin);
  spec.config = registry.parse_config(kind, spec.plugin, table);
  return spec;
}

void check_connector_size(const ConfigSection& table, const char* key, std::int64_t value, const char* source) {
  if (value <= 0) {
    table.fail(key, std::string("required while the recipe has no ") + source + " to take it from (expected an integer >= 1)");
  }
}

}  // namespace

Recipe parse_recipe(const ConfigDocument& document, const fs::path& base_directory,
                    const Registry::Options& registry_options) {
  ConfigSection root = document.root();
  // A misspelt top-level table ([modle]) is named first: every later error would be a consequence.
  for (const char* table : {"run", "trainer", "exp_manager", "model", "inference", "serve"}) root.section(table);
  root.reject_unknown_keys(/*recursive=*/false);
  Recipe recipe;
  recipe.source = document.source_name();
  recipe.fingerprint = std::hash<std::string>{}(document.canonical());
  recipe.run = parse_run(root.section("run"), base_directory);

  Registry::Options options = registry_options;
  options.search_paths.insert(options.search_paths.begin(), recipe.run.plugin_paths.begin(),
                              recipe.run.plugin_paths.end());
  recipe.registry = std::make_shared<Registry>(options);
  const Registry& registry = *recipe.registry;

  ConfigSection trainer = root.section("trainer");
  recipe.trainer.precision = trainer.token("precision", recipe.trainer.precision);
  try {
    registry.find(PrecisionRecipe::kKind, recipe.trainer.precision);
  } catch (const PluginError& error) {
    trainer.fail("precision", std::string(error.what()) + "; NeMo's spellings 32 and bf16-mixed answer to fp32 and bf16");
  }
  recipe.trainer.max_steps = trainer.integer("max_steps", 0, 1);
  recipe.trainer.log_every_n_steps = trainer.integer("log_every_n_steps", recipe.trainer.log_every_n_steps, 1);
  recipe.trainer.exit_interval = trainer.integer("exit_interval", 0, 0);
  recipe.trainer.gradient_clip_val = trainer.get<double>("gradient_clip_val", recipe.trainer.gradient_clip_val);
  if (recipe.trainer.gradient_clip_val < 0) trainer.fail("gradient_clip_val", "expected a number >= 0 (0: no clipping)");
  if (trainer.has("loss_explosion_factor")) {
    trainer.fail("loss_explosion_factor", "replaced by trainer.loss_spike_factor and loss_spike_min_increase: a spike "
                                          "is now judged against the running median with an absolute floor, and "
                                          "skipped by default (docs/recipes.md)");
  }
  LossSpikeConfig& spike = recipe.trainer.loss_spike;
  spike.factor = trainer.get<double>("loss_spike_factor", spike.factor);
  if (spike.factor != 0 && !(spike.factor > 1)) trainer.fail("loss_spike_factor", "expected a number > 1 (0: no spike judging)");
  spike.min_increase = trainer.get<double>("loss_spike_min_increase", spike.min_increase);
  if (spike.min_increase < 0) trainer.fail("loss_spike_min_increase", "expected a number >= 0 (nats)");
  spike.window = trainer.integer("loss_spike_window", spike.window, 1, 100000);
  spike.warmup = std::min(spike.warmup, spike.window);
  spike.skip = trainer.choice("loss_spike_action", "skip", {"skip", "stop"}) == "skip";
  spike.max_consecutive = trainer.integer("loss_spike_max_consecutive", spike.max_consecutive, 1);
  recipe.trainer.distributed_timeout_minutes =
      trainer.get<double>("distributed_timeout_minutes", recipe.trainer.distributed_timeout_minutes);
  if (!(recipe.trainer.distributed_timeout_minutes > 0) || recipe.trainer.distributed_timeout_minutes > 24 * 60) {
    trainer.fail("distributed_timeout_minutes", "expected a number of minutes in (0, 1440]");
  }
  recipe.trainer.profile = trainer.get<bool>("profile", false);
  recipe.trainer.profile_step_start = trainer.integer("profile_step_start", recipe.trainer.profile_step_start, 0);
  recipe.trainer.profile_step_end = trainer.integer("profile_step_end", recipe.trainer.profile_step_end, 1);
  if (recipe.trainer.profile_step_end <= recipe.trainer.profile_step_start) {
    trainer.fail("profile_step_end", "expected a step after profile_step_start (" +
                                         std::to_string(recipe.trainer.profile_step_start) + ")");
  }

  ConfigSection exp = root.section("exp_manager");
  ExpManagerConfig& exp_manager = recipe.exp_manager;
  exp_manager.explicit_log_dir = exp.path_value("explicit_log_dir").value_or("");
  exp_manager.resume_if_exists = exp.get<bool>("resume_if_exists", exp_manager.resume_if_exists);
  exp_manager.export_hf = exp.get<bool>("export_hf", exp_manager.export_hf);
  ConfigSection checkpoints = exp.section("checkpoint_callback_params");
  exp_manager.every_n_train_steps = checkpoints.integer("every_n_train_steps", 0, 0);
  exp_manager.save_top_k = checkpoints.integer("save_top_k", exp_manager.save_top_k, 1);
  exp_manager.async_save = checkpoints.get<bool>("async_save", exp_manager.async_save);

  ConfigSection model = root.section("model");
  recipe.model.parallel = parse_parallel(model);
  if (recipe.model.parallel.context > 1 && recipe.run.mode != "train") {
    model.fail("context_parallel_size", "context parallelism splits training sequences; run.mode = \"" +
                                            recipe.run.mode + "\" runs without it (set it to 1)");
  }
  recipe.model.micro_batch_size = model.integer("micro_batch_size", 1, 1);
  recipe.model.global_batch_size = model.integer("global_batch_size", recipe.model.micro_batch_size, 1);
  if (recipe.model.global_batch_size % recipe.model.micro_batch_size != 0) {
    model.fail("global_batch_size", "must be a multiple of micro_batch_size (" +
                                        std::to_string(recipe.model.micro_batch_size) + "), got " +
                                        std::to_string(recipe.model.global_batch_size));
  }
  // The precision recipe reads its keys from the model section (NeMo keeps megatron_amp_O2 there).
  // model.fp8 (NeMo's key) puts the fp8 recipe over trainer.precision: it is asked for as
  // "fp8:<trainer.precision>". Off, NeMo's fp8_* keys that configs carry along are accepted as they are.
  std::string precision_plugin = recipe.trainer.precision;
  if (model.get<bool>("fp8", false)) {
    precision_plugin = "fp8:" + recipe.trainer.precision;
    if (recipe.run.mode != "train") {
      if (model.get<bool>("fp8_hybrid", false)) {
        model.fail("fp8_hybrid", "E5M2 is for gradients, and run.mode = \"" + recipe.run.mode +
                                     "\" computes none: use fp8_e4m3 = true (or model.fp8 = false)");
      }
      if (model.get<std::string>("fp8_recipe", "delayed") == "delayed") {
        model.fail("fp8_recipe", "delayed scaling takes each scale from earlier training steps' amaxes, and run.mode = \"" +
                                     recipe.run.mode + "\" has no steps: set fp8_recipe = \"tensorwise\" (each tensor "
                                     "scaled by its own amax), or model.fp8 = false");
      }
    }
  } else {
    for (const char* key : {"fp8_e4m3", "fp8_hybrid"}) model.get<bool>(key, false);
    for (const char* key : {"fp8_margin", "fp8_interval", "fp8_amax_history_len"}) model.get<std::int64_t>(key, 0);
    model.get<std::string>("fp8_amax_compute_algo", "");
  }
  try {
    registry.find(PrecisionRecipe::kKind, precision_plugin);
  } catch (const PluginError& error) {
    model.fail("fp8", std::string(error.what()) + " (model.fp8 needs the fp8 precision_recipe plugin)");
  }
  recipe.precision = recipe.registry->create<PrecisionRecipe>(
      precision_plugin, *registry.parse_config(PrecisionRecipe::kKind, precision_plugin, model), RuntimeContext());
  {
    ConfigSection strategy = model.section("parallel_strategy");
    const std::string name = strategy.get<std::string>("name", "megatron");
    require_plugin(registry, strategy, "name", ParallelStrategy::kKind, name);
    recipe.parallel_strategy = recipe.registry->create<ParallelStrategy>(
        name, *registry.parse_config(ParallelStrategy::kKind, name, strategy), RuntimeContext());
  }

  recipe.model.encoder_seq_length = model.integer("encoder_seq_length", recipe.model.encoder_seq_length, 2);
  recipe.model.make_vocab_size_divisible_by =
      model.integer("make_vocab_size_divisible_by", recipe.model.make_vocab_size_divisible_by, 1, 1 << 20);
  recipe.model.pipeline_layer_split = model.get<std::vector<std::int64_t>>("pipeline_layer_split", {});
  if (!recipe.model.pipeline_layer_split.empty()) {
    const ParallelSizes& sizes = recipe.model.parallel;
    const auto chunks = static_cast<std::size_t>(sizes.pipeline * sizes.virtual_pipeline);
    if (recipe.model.pipeline_layer_split.size() != chunks) {
      model.fail("pipeline_layer_split", "expected one layer count per pipeline chunk (pipeline_model_parallel_size x "
                                         "virtual_pipeline_model_parallel_size = " + std::to_string(chunks) + "), got " +
                                         std::to_string(recipe.model.pipeline_layer_split.size()));
    }
    for (auto layers : recipe.model.pipeline_layer_split) {
      if (layers < 1) model.fail("pipeline_layer_split", "every pipeline chunk needs at least one layer, got " + std::to_string(layers));
    }
  }
  ActivationCheckpointConfig& recompute = recipe.model.activations_checkpoint;
  recompute.granularity = model.choice("activations_checkpoint_granularity", "", {"", "full", "selective"});
  recompute.method = model.choice("activations_checkpoint_method", recompute.method, {"uniform", "block"});
  recompute.num_layers = model.integer("activations_checkpoint_num_layers", recompute.num_layers, 1);

  ConfigSection optim = model.section("optim");
  OptimizerConfig& adam = recipe.model.optim;
  // NeMo's names; fused_adam is AdamW (LibTorch's fused kernel where the device has it).
  // distributed_fused_adam is ZeRO-1: the optimizer state sharded over the data-parallel ranks.
  adam.distributed = optim.choice("name", "adamw", {"adamw", "fused_adam", "distributed_fused_adam"}) ==
                     "distributed_fused_adam";
  if (adam.distributed && recipe.model.parallel.expert > 1) {
    optim.fail("name", "distributed_fused_adam (ZeRO-1) with expert parallelism is not implemented yet: use adamw, "
                       "or expert_model_parallel_size = 1");
  }
  adam.lr = optim.get<double>("lr", adam.lr);
  if (!(adam.lr > 0)) optim.fail("lr", "expected a learning rate > 0");
  adam.weight_decay = optim.get<double>("weight_decay", adam.weight_decay);
  if (adam.weight_decay < 0) optim.fail("weight_decay", "expected a number >= 0");
  auto betas = optim.get<std::vector<double>>("betas", {adam.beta1, adam.beta2});
  if (betas.size() != 2 || betas[0] < 0 || betas[0] >= 1 || betas[1] < 0 || betas[1] >= 1) {
    optim.fail("betas", "expected two numbers in [0, 1)");
  }
  adam.beta1 = betas[0];
  adam.beta2 = betas[1];
  adam.eps = optim.get<double>("eps", adam.eps);
  if (!(adam.eps > 0)) optim.fail("eps", "expected a number > 0");
  adam.bucket_cap_mb = optim.integer("bucket_cap_mb", adam.bucket_cap_mb, 1, 1 << 20);
  adam.overlap_grad_sync = optim.get<bool>("overlap_grad_sync", adam.overlap_grad_sync);
  ConfigSection sched = optim.section("sched");
  sched.choice("name", "CosineAnnealing", {"CosineAnnealing"});
  adam.warmup_steps = sched.integer("warmup_steps", 0, 0);
  adam.min_lr = sched.get<double>("min_lr", std::min(adam.min_lr, adam.lr));
  if (adam.min_lr < 0 || adam.min_lr > adam.lr) sched.fail("min_lr", "expected a number in [0, lr]");
  adam.max_steps = recipe.trainer.max_steps;
  adam.clip_grad = recipe.trainer.gradient_clip_val;

  ConfigSection mm = model.section("mm_cfg");
  MultimodalConfig& mm_cfg = recipe.model.mm_cfg;
  mm_cfg.use_im_start_end = mm.get<bool>("use_im_start_end", false);
  mm_cfg.pretrain_mm_mlp_adapter = mm.path_value("pretrain_mm_mlp_adapter").value_or("");
  // NeVA's stage defaults: the language model and the vision tower start frozen only when asked.
  mm_cfg.llm = parse_component(registry, mm, "llm", LanguageBackbone::kKind, false);
  mm_cfg.vision_encoder = parse_component(registry, mm, "vision_encoder", VisionEncoder::kKind, true);
  if (!mm_cfg.llm && recipe.run.mode != "inspect") {  // before anything that would be derived from it
    root.section("run").fail("mode", "mode '" + recipe.run.mode + "' needs a language model: add [model.mm_cfg.llm]");
  }
  mm_cfg.image_token_index = mm.get<std::int64_t>("image_token_index", -1);  // any id: placeholders are never embedded
  if (!mm.has("image_token_index") && mm_cfg.llm && !mm_cfg.llm->from_pretrained.empty()) {
    try {  // a llava-hf directory says which token its images fill
      HfConfig llava = HfConfig::load(mm_cfg.llm->from_pretrained);
      if (llava.get<std::string>("model_type", "") == "llava") {
        mm_cfg.image_token_index = llava.get<std::int64_t>("image_token_index", llava.get<std::int64_t>("image_token_id", -1));
      }
    } catch (const Error&) {
      // Not a directory with a config.json: the llm plugin has already said what it needs.
    }
  }
  if (mm_cfg.vision_encoder && !mm.has("image_token_index") && mm_cfg.image_token_index < 0) {
    mm.fail("image_token_index", "missing: the token id image features replace (e.g. 32000 for llava-1.5)");
  }

  mm_cfg.mm_mlp_adapter_type = mm.get<std::string>("mm_mlp_adapter_type", mm_cfg.mm_mlp_adapter_type);
  require_plugin(registry, mm, "mm_mlp_adapter_type", Connector::kKind, mm_cfg.mm_mlp_adapter_type);
  ConfigSection adapter = mm.section("mm_mlp_adapter");
  ComponentSpec& connector = mm_cfg.connector;
  connector.kind = Connector::kKind;
  connector.plugin = mm_cfg.mm_mlp_adapter_type;
  connector.section = adapter.path();
  connector.freeze = adapter.get<bool>("freeze", false);
  auto adapter_weights = adapter.path_value("from_pretrained");
  if (adapter_weights && !mm_cfg.pretrain_mm_mlp_adapter.empty()) {
    adapter.fail("from_pretrained", "give the connector's weights once: here or in model.mm_cfg.pretrain_mm_mlp_adapter");
  }
  connector.from_pretrained = adapter_weights.value_or(mm_cfg.pretrain_mm_mlp_adapter);
  connector.config = registry.parse_config(Connector::kKind, connector.plugin, adapter);
  auto* sizes = dynamic_cast<ConnectorConfig*>(connector.config.get());
  if (!sizes) {
    throw PluginError(registry.find(Connector::kKind, connector.plugin).path.string() +
                      ": parse_config did not return a ConnectorConfig");
  }
  sizes->weights = connector.from_pretrained;
  // The connector's widths come from the components it joins; given explicitly, they must agree.
  auto derive = [&](const char* key, std::int64_t& size, std::int64_t from, const std::string& source) {
    if (size > 0 && size != from) {
      adapter.fail(key, std::to_string(size) + " disagrees with " + source + " (" + std::to_string(from) + ")");
    }
    size = from;
  };
  if (mm_cfg.vision_encoder) {
    auto* encoder = dynamic_cast<VisionEncoderConfig*>(mm_cfg.vision_encoder->config.get());
    if (!encoder || encoder->hidden_size <= 0) throw PluginError(mm_cfg.vision_encoder->plugin + ": parse_config did not give a VisionEncoderConfig with its hidden_size");
    derive("input_size", sizes->input_size, encoder->hidden_size, "the vision encoder's hidden size");
  } else if (!mm_cfg.llm) {  // a connector alone (inspect): its widths are all there is
    check_connector_size(adapter, "input_size", sizes->input_size, "vision_encoder");
  }  // a language model without a vision encoder runs text only: no connector is built
  if (mm_cfg.llm) {
    auto* llm = dynamic_cast<LanguageBackboneConfig*>(mm_cfg.llm->config.get());
    if (!llm || llm->hidden_size <= 0) throw PluginError(mm_cfg.llm->plugin + ": parse_config did not give a LanguageBackboneConfig with its hidden_size");
    derive("output_size", sizes->output_size, llm->hidden_size, "the language model's hidden size");
  } else {
    check_connector_size(adapter, "output_size", sizes->output_size, "llm");
  }

  // Tokenizer (NeMo: model.tokenizer.model) and data keys; generation needs a language model.
  recipe.model.tokenizer = model.section("tokenizer").path_value("model").value_or("");
  if (recipe.model.tokenizer.empty() && mm_cfg.llm) recipe.model.tokenizer = mm_cfg.llm->from_pretrained;
  ConfigSection data = model.section("data");
  recipe.model.data.conv_template = data.choice("conv_template", recipe.model.data.conv_template,
                                                conversation_template_names());
  recipe.model.data.image_aspect_ratio = data.choice("image_aspect_ratio", "square", {"square", "pad", "keep"});
  recipe.model.data.image_folder = data.path_value("image_folder").value_or("");
  recipe.model.data.data_path = data.path_list("data_path");
  recipe.model.data.data_weights = data.get<std::vector<double>>("data_weights", {});
  if (!recipe.model.data.data_weights.empty() && recipe.model.data.data_weights.size() != recipe.model.data.data_path.size()) {
    data.fail("data_weights", "expected one weight per data_path entry (" + std::to_string(recipe.model.data.data_path.size()) + ")");
  }
  for (double weight : recipe.model.data.data_weights) {
    if (!(weight > 0)) data.fail("data_weights", "weights must be > 0");
  }
  recipe.model.data.skip_bad_samples = data.choice("bad_samples", "skip", {"skip", "fail"}) == "skip";
  recipe.model.data.packed_sequence = data.get<bool>("packed_sequence", false);
  recipe.model.data.prefetch = data.integer("prefetch", recipe.model.data.prefetch, 1, 1024);

  ConfigSection inference = root.section("inference");
  InferenceConfig& infer = recipe.inference;
  infer.greedy = inference.get<bool>("greedy", infer.greedy);
  infer.top_k = inference.integer("top_k", infer.top_k, 0);
  infer.top_p = inference.get<double>("top_p", infer.top_p);
  if (infer.top_p <= 0 || infer.top_p > 1) inference.fail("top_p", "expected a number in (0, 1]");
  infer.temperature = inference.get<double>("temperature", infer.temperature);
  if (infer.temperature <= 0) inference.fail("temperature", "expected a number > 0");
  infer.repetition_penalty = inference.get<double>("repetition_penalty", infer.repetition_penalty);
  if (infer.repetition_penalty <= 0) inference.fail("repetition_penalty", "expected a number > 0");
  infer.tokens_to_generate = inference.integer("tokens_to_generate", infer.tokens_to_generate, 1);
  infer.end_strings = inference.get<std::vector<std::string>>("end_strings", {});
  infer.system = inference.get<std::string>("system", "");
  infer.prompts = inference.get<std::vector<std::string>>("prompts", {});
  infer.images = inference.get<std::vector<std::string>>("images", {});
  infer.input_file = inference.path_value("input_file").value_or("");
  infer.output_file = inference.path_value("output_file").value_or("");
  infer.max_image_pixels = inference.integer("max_image_pixels", 0, 1);
  if (!infer.images.empty() && infer.images.size() != infer.prompts.size()) {
    inference.fail("images", "expected one entry per prompt (" + std::to_string(infer.prompts.size()) + "), got " +
                                 std::to_string(infer.images.size()) + " (use \"\" for a prompt without an image)");
  }
  if (!infer.input_file.empty() && !infer.prompts.empty()) {
    inference.fail("input_file", "give requests either as prompts or in input_file, not both");
  }
  ConfigSection serve = root.section("serve");
  ServeConfig& server = recipe.serve;
  server.host = serve.get<std::string>("host", server.host);
  server.port = serve.integer("port", server.port, 0, 65535);
  server.parallel = serve.integer("parallel", server.parallel, 1, 256);
  server.max_queue = serve.integer("max_queue", server.max_queue, 0, 1 << 20);
  server.context_length = serve.integer("context_length", 0, 0);
  server.max_tokens = serve.integer("max_tokens", 0, 0);
  server.max_body_bytes = serve.integer("max_body_bytes", server.max_body_bytes, 1024);
  server.max_connections = serve.integer("max_connections", server.max_connections, 1, 1 << 20);
  server.read_timeout = serve.get<double>("read_timeout", server.read_timeout);
  if (!(server.read_timeout > 0)) serve.fail("read_timeout", "expected seconds > 0");
  server.shutdown_timeout = serve.get<double>("shutdown_timeout", server.shutdown_timeout);
  if (!(server.shutdown_timeout >= 0)) serve.fail("shutdown_timeout", "expected seconds >= 0");
  server.allowed_image_dir = serve.path_value("allowed_image_dir").value_or("");
  server.model_name = serve.get<std::string>("model_name", "");

  if (recipe.inference_mode()) {
    ConfigSection run = root.section("run");
    if (!mm_cfg.llm) run.fail("mode", "mode '" + recipe.run.mode + "' needs a language model: add [model.mm_cfg.llm]");
    if (recipe.model.tokenizer.empty()) {
      model.section("tokenizer").fail("model", "missing: mode '" + recipe.run.mode + "' needs a tokenizer (a directory "
                                               "with tokenizer.json or tokenizer.model)");
    }
    if (recipe.run.mode == "score" && infer.input_file.empty()) {
      inference.fail("input_file", "missing: mode 'score' reads requests {\"prompt\", \"continuation\", \"image\"} "
                                   "from a JSONL file");
    }
    if (recipe.run.mode == "generate" && infer.input_file.empty() && infer.prompts.empty()) {
      inference.fail("prompts", "missing: mode 'generate' needs prompts (or input_file)");
    }
  }

  if (recipe.run.mode == "train") {
    ConfigSection run = root.section("run");
    if (!mm_cfg.llm) run.fail("mode", "mode 'train' needs a language model: add [model.mm_cfg.llm]");
    if (recipe.model.tokenizer.empty()) model.section("tokenizer").fail("model", "missing: mode 'train' needs a tokenizer");
    if (recipe.model.data.data_path.empty()) data.fail("data_path", "missing: mode 'train' needs LLaVA data (.json or .jsonl)");
    if (recipe.trainer.max_steps < 1) trainer.fail("max_steps", "missing: mode 'train' needs the number of optimizer steps");
    if (recipe.exp_manager.explicit_log_dir.empty()) {
      exp.fail("explicit_log_dir", "missing: mode 'train' writes checkpoints and metrics into a run directory");
    }
    if (recipe.model.optim.warmup_steps > recipe.trainer.max_steps) {
      sched.fail("warmup_steps", "longer than trainer.max_steps (" + std::to_string(recipe.trainer.max_steps) + ")");
    }
  }

  root.reject_unknown_keys();
  return recipe;
}

LlavaModel build_model(const Recipe& recipe, const RuntimeContext& context) {
  const MultimodalConfig& mm_cfg = recipe.model.mm_cfg;
  if (!mm_cfg.llm) throw Error(recipe.source + ": the recipe has no [model.mm_cfg.llm] to build a model around");
  auto freeze = [](torch::nn::Module& module, bool frozen) {
    if (!frozen) return;
    for (auto& parameter : module.parameters()) parameter.set_requires_grad(false);
  };
  // Errors name the recipe table (and config.json) of the component that failed, e.g. out of memory.
  auto create = [&](auto* type, const ComponentSpec& spec, const RuntimeContext& where) {
    using Interface = std::remove_pointer_t<decltype(type)>;
    try {
      auto component = recipe.registry->create<Interface>(spec.plugin, *spec.config, where);
      recipe.precision->prepare(*component, where);
      freeze(*component, spec.freeze);
      return component;
    } catch (const PluginError& error) {
      throw PluginError(spec.section + (spec.hf_config.empty() ? "" : " (" + spec.hf_config + ")") + ": " + error.what());
    }
  };
  auto backbone = create(static_cast<LanguageBackbone*>(nullptr), *mm_cfg.llm, context);
  std::shared_ptr<VisionEncoder> encoder;
  std::shared_ptr<Connector> connector;
  if (mm_cfg.vision_encoder) {
    // NeVA's layout (NeMo's Hugging Face vision path): the vision encoder and the connector are whole
    // on every tensor-parallel rank. Their gradients agree across the group without a collective of
    // their own: what reaches them through the LM's input is already summed over it.
    RuntimeContext replicated = context;  // the same generator: one stream, in construction order
    replicated.groups.tensor = nullptr;
    replicated.sequence_parallel = false;
    // Pipeline parallelism: the encoder and connector live on the first stage (NeMo's add_encoder).
    // The other stages only ask them how many tokens an image becomes: built on the meta device,
    // they hold no memory and are never run.
    const bool elsewhere = group_rank(context.groups.pipeline) != 0;
    if (elsewhere) replicated.device = c10::Device(c10::DeviceType::Meta);
    encoder = create(static_cast<VisionEncoder*>(nullptr), *mm_cfg.vision_encoder, replicated);
    connector = create(static_cast<Connector*>(nullptr), mm_cfg.connector, replicated);
    nn::set_replicated(*encoder);
    nn::set_replicated(*connector);
    if (elsewhere) {
      freeze(*encoder, true);
      freeze(*connector, true);
    }
  }
  LlavaModel model(encoder, connector, backbone, mm_cfg.image_token_index);
  model.set_pipeline(context.groups.pipeline);
  return model;
}

Recipe load_recipe(const fs::path& path, const std::vector<std::string>& overrides,
                   const Registry::Options& registry_options) {
  ConfigDocument document = ConfigDocument::load(path.string());
  for (const auto& assignment : overrides) document.set(assignment);
  fs::path directory = fs::absolute(path).parent_path();
  return parse_recipe(document, directory, registry_options);
}

DTypePolicy Recipe::dtype_policy() const { return precision->dtype_policy(); }

RuntimeContext Recipe::runtime_context(const World& world) const {
  // Random initialisation is part of the recipe: every layer draws from this generator.
  RuntimeContext context = RuntimeContext::seeded(run.seed, c10::Device(run.device));
  context.dtypes = dtype_policy();
  // Inference keeps no fp32 master copy: bf16 precision means bf16 weights (oneDNN/AMX matmuls).
  if (inference_mode()) {
    context.dtypes.params = context.dtypes.main_params = context.dtypes.compute;
  }
  context.activations_checkpoint = model.activations_checkpoint;
  context.groups = parallel_strategy->build_groups(world, model.parallel, context.device);
  // Sequence parallelism splits training activations; generation and scoring run without it
  // (a KV cache grows one token at a time), as Megatron's inference does.
  context.sequence_parallel = model.parallel.sequence_parallel && run.mode == "train";
  context.make_vocab_size_divisible_by = model.make_vocab_size_divisible_by;
  context.virtual_pipeline_chunks = model.parallel.virtual_pipeline;
  context.pipeline_layer_split = model.pipeline_layer_split;
  return context;
}

HfExportSource Recipe::hf_export_source() const {
  const MultimodalConfig& mm = model.mm_cfg;
  HfExportSource source;
  if (mm.llm) source.llm = {mm.llm->section, mm.llm->hf_config};
  if (mm.vision_encoder) {
    source.vision = {mm.vision_encoder->section, mm.vision_encoder->hf_config};
    source.vision_config = dynamic_cast<const VisionEncoderConfig*>(mm.vision_encoder->config.get());
  }
  source.connector = mm.connector.plugin;
  source.tokenizer = model.tokenizer;
  return source;
}

}  // namespace neva
