#pragma once
// A recipe, parsed into typed configs that are complete before anything is built. Key names follow
// NeMo NeVA where NeMo has the key (model.mm_cfg.llm.freeze, model.tensor_model_parallel_size, ...);
// every key is documented in docs/recipes.md.
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "neva/config.h"
#include "neva/connector.h"
#include "neva/context.h"
#include "neva/model/llava.h"
#include "neva/train/hf_export.h"
#include "neva/train/loss_spike.h"
#include "neva/train/optim.h"
#include "neva/parallel/process_group.h"
#include "neva/parallel_strategy.h"
#include "neva/precision_recipe.h"
#include "neva/registry.h"

namespace neva {

struct RunConfig {
  std::string mode = "inspect";  // what neva-run does with this recipe: inspect | train | generate | score | serve
  std::uint64_t seed = 1234;
  std::string device = "cpu";    // "cpu", "cuda", "cuda:N"
  std::vector<std::filesystem::path> plugin_paths;  // absolute (resolved against the recipe's directory)
};

struct TrainerConfig {
  // NeMo's trainer.precision: the precision_recipe plugin (fp32 answers to 32, bf16 to bf16-mixed).
  std::string precision = "32";
  std::int64_t max_steps = 0;    // optimizer steps to train to (a resumed run continues up to it)
  std::int64_t log_every_n_steps = 10;
  // Megatron's exit_interval: checkpoint and stop when the step is a multiple of it (0: never), so
  // that a long run is split into jobs (e.g. Slurm time limits) without changing its schedule.
  std::int64_t exit_interval = 0;
  double gradient_clip_val = 1.0;  // 0: no clipping
  // A non-finite loss stops the run before the update; a loss spike is skipped (or stops it): see
  // neva/loss_spike.h and docs/recipes.md (trainer.loss_spike_*).
  LossSpikeConfig loss_spike;
  // Megatron's --profile: the optimizer steps [profile_step_start, profile_step_end) are traced by
  // PyTorch's profiler (Kineto) into profile.json in the run directory (Chrome trace format).
  // Megatron's --distributed-timeout-minutes: how long a process of a multi-process run waits for the
  // others (joining the run, each collective) before it fails naming the group, instead of hanging
  // when a peer died or stopped.
  double distributed_timeout_minutes = 5;
  bool profile = false;
  std::int64_t profile_step_start = 10;
  std::int64_t profile_step_end = 12;
};

// NeMo's exp_manager: where a training run writes and how it checkpoints.
struct ExpManagerConfig {
  std::string explicit_log_dir;          // run directory: checkpoints/, metrics.jsonl, loss.png, hf/
  bool resume_if_exists = true;          // continue from the directory's latest checkpoint
  std::int64_t every_n_train_steps = 0;  // checkpoint_callback_params: 0 = only at the end
  std::int64_t save_top_k = 2;           // committed checkpoints kept (the newest)
  bool async_save = false;               // files written by a background thread while training goes on
  bool export_hf = true;                 // write hf/ (LlavaForConditionalGeneration) at the end
};


// One model part: which plugin builds it, and the config that plugin parsed from its table.
struct ComponentSpec {
  std::string kind;
  std::string plugin;           // the name the recipe used
  std::string section;          // dotted recipe path of its table, for messages
  bool freeze = false;
  std::string from_pretrained;  // checkpoint directory or file; "" = random initialisation
  std::string hf_config;        // the config.json it was described by (config, or from_pretrained's), if any
  std::shared_ptr<ComponentConfig> config;
};

struct MultimodalConfig {       // model.mm_cfg
  std::string mm_mlp_adapter_type = "mlp2x_gelu";
  // The token id whose positions image features fill (transformers' image_token_index). Read from a
  // llava-hf llm directory's config.json when the recipe does not give it; -1 = not known.
  std::int64_t image_token_index = -1;
  bool use_im_start_end = false;
  std::string pretrain_mm_mlp_adapter;
  std::optional<ComponentSpec> llm;
  std::optional<ComponentSpec> vision_encoder;
  ComponentSpec connector;      // table model.mm_cfg.mm_mlp_adapter
};

struct DataConfig {             // model.data (NeMo's names)
  std::string conv_template = "v1";
  std::string image_aspect_ratio = "square";  // square | pad
  std::string image_folder;                   // relative image paths in requests resolve here
  // Training data: LLaVA .json / .jsonl files, blended by data_weights (default: equal).
  std::vector<std::string> data_path;
  std::vector<double> data_weights;
  bool skip_bad_samples = true;               // bad_samples = "skip" | "fail"
  bool packed_sequence = false;               // pack samples into rows of encoder_seq_length tokens
  std::int64_t prefetch = 4;                  // micro-batches prepared ahead by the loader thread
};

// NeMo's inference keys (neva_inference.yaml) plus where requests come from and answers go.
struct InferenceConfig {          // inference
  bool greedy = true;
  std::int64_t top_k = 0;
  double top_p = 1.0;
  double temperature = 1.0;
  double repetition_penalty = 1.0;
  std::int64_t tokens_to_generate = 64;
  std::vector<std::string> end_strings;
  std::string system;             // overrides the template's system prompt when not empty
  std::vector<std::string> prompts;
  std::vector<std::string> images;  // one per prompt ("" for none)
  std::string input_file;           // JSONL requests instead of prompts/images
  std::string output_file;          // JSONL answers; "" = stdout
  std::int64_t max_image_pixels = 0;  // 0 = the built-in budget
};

struct ServeConfig {            // serve: neva-run serve (docs/serving.md)
  std::string host = "127.0.0.1";  // loopback unless told otherwise
  std::int64_t port = 8000;        // 0: any free port (printed)
  std::int64_t parallel = 4;       // slots: requests decoded together, each with its own KV cache
  std::int64_t max_queue = 64;     // requests waiting for a slot; beyond them 503 with Retry-After
  std::int64_t context_length = 0;  // tokens per slot (prompt + answer); 0: the model's max_position_embeddings
  std::int64_t max_tokens = 0;     // the most new tokens a request may ask for; 0: inference.tokens_to_generate
  std::int64_t max_body_bytes = 32LL << 20;  // a request body beyond it: 413
  std::int64_t max_connections = 256;  // open client connections; beyond them 503 and closed
  double read_timeout = 30;        // seconds to receive a request's headers and body: else 408
  double shutdown_timeout = 30;    // SIGTERM: seconds in-flight requests get to finish
  std::string allowed_image_dir;   // file:// image URLs only below it (absolute); "" refuses file://
  std::string model_name;          // the id /v1/models lists; "" = the recipe file's stem
};

struct ModelConfig {            // model
  ParallelSizes parallel;
  std::int64_t micro_batch_size = 1;
  std::int64_t global_batch_size = 1;
  std::string tokenizer;        // model.tokenizer.model: a tokenizer directory or file
  std::int64_t encoder_seq_length = 2048;  // longest training sample (tokens, image tokens included)
  // Under tensor parallelism the vocabulary is padded to a multiple of this x tensor_model_parallel_size.
  std::int64_t make_vocab_size_divisible_by = 128;
  // Pipeline parallelism: the decoder layers of each pipeline chunk, in pipeline order
  // (pipeline_model_parallel_size x virtual_pipeline_model_parallel_size entries); empty: even.
  std::vector<std::int64_t> pipeline_layer_split;
  ActivationCheckpointConfig activations_checkpoint;
  OptimizerConfig optim;        // model.optim (+ .sched); max_steps and clipping from trainer
  DataConfig data;
  MultimodalConfig mm_cfg;
};

struct NEVA_API Recipe {
  std::string source;           // file path, or a description of the embedded recipe
  // A hash of the recipe as parsed (ConfigDocument::canonical: overrides applied, keys sorted): the
  // processes of one run compare it before training.
  std::uint64_t fingerprint = 0;
  RunConfig run;
  TrainerConfig trainer;
  ExpManagerConfig exp_manager;
  ModelConfig model;
  InferenceConfig inference;
  ServeConfig serve;
  std::shared_ptr<Registry> registry;  // plugins from run.plugin_paths, NEVA_PLUGIN_PATH, install dir
  // The plugins chosen by trainer.precision (with the model section's keys: megatron_amp_O2) and
  // by [model.parallel_strategy] (name, default "megatron"; the plugin's keys, e.g. order).
  std::shared_ptr<PrecisionRecipe> precision;
  std::shared_ptr<ParallelStrategy> parallel_strategy;

  DTypePolicy dtype_policy() const;
  // generate, score or serve: no gradients, weights in the compute dtype.
  bool inference_mode() const { return run.mode == "generate" || run.mode == "score" || run.mode == "serve"; }
  // Device, dtypes, generator and activation checkpointing from the recipe; the process groups the
  // parallel strategy builds for `world` (a world of one by default: every group "this rank alone").
  RuntimeContext runtime_context(const World& world = World()) const;
  // What the Hugging Face export reads besides the weights: the components' config.json files,
  // the encoder's shared keys, the connector's name, the tokenizer.
  HfExportSource hf_export_source() const;
};

// Builds the model the recipe describes: every component through the registry, frozen as asked.
// The encoder and connector are null when the recipe has no vision_encoder.
NEVA_API LlavaModel build_model(const Recipe& recipe, const RuntimeContext& context);

// Parses a recipe document (after its --set overrides). `base_directory` resolves relative
// run.plugin_paths. Throws RecipeError (bad recipe) or PluginError (plugins unusable).
NEVA_API Recipe parse_recipe(const ConfigDocument& document, const std::filesystem::path& base_directory,
                             const Registry::Options& registry_options = {});

// Reads `path`, applies `overrides` ("section.key=value"), parses.
NEVA_API Recipe load_recipe(const std::filesystem::path& path, const std::vector<std::string>& overrides,
                            const Registry::Options& registry_options = {});

}  // namespace neva
