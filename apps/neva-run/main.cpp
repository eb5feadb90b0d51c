// neva-run: train, generate, score or inspect from a TOML recipe; list plugins; validate recipes.
// Exit codes: 0 success, 2 usage or recipe error, 1 runtime error. Errors: stderr, one line, cause first.
#include <CLI/CLI.hpp>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "checkpoint_tool.h"
#include "demo.h"
#include "inference.h"
#include "inspect.h"
#include "serve/serve.h"
#include "launch.h"
#include "train.h"
#include "neva/error.h"
#include "neva/recipe.h"
#include "neva/nn/linear.h"

namespace {

namespace fs = std::filesystem;

constexpr int kExitRuntime = 1;
constexpr int kExitUsage = 2;

neva::Registry::Options registry_options(const std::vector<std::string>& plugin_paths) {
  neva::Registry::Options options;
  for (const auto& path : plugin_paths) options.search_paths.push_back(fs::absolute(path).lexically_normal());
  return options;
}

neva::Recipe load(const std::string& recipe_path, const std::vector<std::string>& overrides,
                  const std::vector<std::string>& plugin_paths) {
  return neva::load_recipe(recipe_path, overrides, registry_options(plugin_paths));
}


// Training runs over the processes a launcher started (torchrun --nproc-per-node N, srun -n N), and
// generation and scoring over a tensor-parallel group of them; inspect and the demo run as one
// process: refused, naming the variable, instead of N independent copies.
void refuse_multi_process_launch(const std::string& what) {
  for (const char* variable : {"WORLD_SIZE", "SLURM_STEP_NUM_TASKS"}) {
    const char* value = std::getenv(variable);
    if (value && *value && std::string(value) != "1") {
      throw neva::RecipeError(std::string("launched as several processes (") + variable + "=" + value + "), but " +
                              what + " runs as one process (train, generate and score run across processes)");
    }
  }
}

// The exit status: 0, or 128 + the signal (SIGTERM 143, SIGINT 130) that stopped a training run after
// its checkpoint.
int run(const neva::Recipe& recipe) {
  if (recipe.run.mode == "inspect") refuse_multi_process_launch("run.mode = \"" + recipe.run.mode + "\"");
  neva::warn_if_bf16_emulated(recipe);
  // Modes are checked when the recipe is parsed.
  if (recipe.run.mode == "generate") {
    neva::run_generate(recipe);
  } else if (recipe.run.mode == "score") {
    neva::run_score(recipe);
  } else if (recipe.run.mode == "serve") {
    neva::ServeOptions options;
    if (const char* key = std::getenv("NEVA_API_KEY")) options.api_key = key;
    return neva::run_serve(recipe, options);
  } else if (recipe.run.mode == "train") {
    const neva::TrainSummary summary = neva::run_train(recipe);
    if (summary.signal) return 128 + summary.signal;
  } else {
    neva::run_inspect(recipe, std::cout);
  }
  return 0;
}

void list_plugins(const std::vector<std::string>& plugin_paths, bool json) {
  neva::Registry registry(registry_options(plugin_paths));
  auto plugins = registry.list();
  for (const auto& broken : registry.broken()) std::cerr << "neva-run: warning: " << broken.problem << "\n";
  if (json) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& plugin : plugins) {
      out.push_back({{"kind", plugin.kind},
                     {"name", plugin.name},
                     {"version", plugin.version},
                     {"abi", std::to_string(plugin.abi.major) + "." + std::to_string(plugin.abi.minor)},
                     {"torch_version", plugin.torch_version},
                     {"summary", plugin.summary},
                     {"path", plugin.path.string()}});
    }
    std::cout << out.dump(2) << "\n";
    return;
  }
  std::cout << "searched:";
  for (const auto& directory : registry.directories()) std::cout << " " << directory.string();
  std::cout << "\n";
  if (plugins.empty()) std::cout << "no plugins found\n";
  for (const auto& plugin : plugins) {
    std::cout << plugin.kind << "\t" << plugin.name << "\t" << plugin.version << "\t" << plugin.summary << "\t"
              << plugin.path.string() << "\n";
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "neva-run: NeVA/LLaVA vision-language models from TOML recipes, with every model part a plugin.\n\n"
      "  neva-run RECIPE.toml [--set section.key=value]...   run the recipe's run.mode:\n"
      "        inspect   build every component, run one forward pass, report\n"
      "        train     train either NeVA stage on LLaVA data (checkpoints, exact resume, export)\n"
      "        generate  answer [inference] prompts (with images), streamed or as JSON lines\n"
      "        score     log-probabilities of continuations from a JSONL file\n"
      "        serve     an OpenAI-compatible HTTP server (as `neva-run serve`)\n"
      "  neva-run serve RECIPE.toml [--host H] [--port P] [--parallel N] [--max-tokens N] [--api-key K]\n"
      "                                                      serve the recipe's model over HTTP: /v1/chat/completions\n"
      "                                                      (images, streaming), /v1/completions, /v1/models, /health,\n"
      "                                                      /metrics; N requests decoded together (docs/serving.md)\n"
      "  neva-run demo [--dir DIR] [--prepare-only] [--set ...]\n"
      "                                                      train a tiny NeVA on synthetic shapes (both stages),\n"
      "                                                      answer questions on held-out images; exit 1 below 90%\n"
      "  neva-run validate RECIPE.toml [--set ...]           check a recipe without running it\n"
      "  neva-run plugins [--json]                           list the plugins found\n"
      "  neva-run checkpoint inspect DIR [--json]            a checkpoint's layout, tensors and pieces; checks its\n"
      "                                                      files' sizes and SHA-256 (exit 1 when damaged)\n"
      "  neva-run checkpoint convert DIR --to OUT [--tp N --pp N]\n"
      "                                                      the same checkpoint with every tensor whole in one file, or\n"
      "                                                      in the files a TP x PP run writes (any layout resumes from\n"
      "                                                      any checkpoint as it is: this only arranges the files)\n\n"
      "Plugins are searched in run.plugin_paths, --plugin-path, NEVA_PLUGIN_PATH and the install\n"
      "directory, never the current directory. Recipe keys: docs/recipes.md; example recipes: configs/.\n"
      "Check a plugin of your own with neva-conformance PLUGIN.so (docs/plugins.md).\n"
      "Across processes: neva-run --nproc-per-node N RECIPE.toml, torchrun --no-python --standalone\n"
      "--nproc-per-node N neva-run RECIPE.toml, or srun -n N neva-run RECIPE.toml. Training splits each layer over\n"
      "model.tensor_model_parallel_size ranks (model.sequence_parallel = true also splits the sequence), the\n"
      "layers into pipeline_model_parallel_size stages (1F1B; virtual_pipeline_model_parallel_size: interleaved),\n"
      "Mixtral's experts over expert_model_parallel_size ranks and each sequence over context_parallel_size\n"
      "ranks, and replicates the rest data-parallel (configs/parallel/ holds ready layouts); generate and score\n"
      "run over tensor x pipeline x expert = N processes.\n"
      "Precision: trainer.precision = 32 | bf16 (model.megatron_amp_O2 = true: bf16 weights, fp32 main weights);\n"
      "model.fp8 = true with fp8_hybrid or fp8_e4m3 runs the decoder layers' GEMMs in FP8 over it (docs/precision.md).\n"
      "CPU kernels without autograd: linears of up to 8 rows (decoding) on neva's GEMV, larger fp32 ones on\n"
      "OpenBLAS; NEVA_CPU_BLAS=aten keeps LibTorch's everywhere, NEVA_GEMV=avx2|scalar narrows the GEMV;\n"
      "--version names what runs.\n"
      "Rank 0 writes the run directory and the answers; every rank logs to <run>/logs/rank-R.log.\n"
      "Exit codes: 0 success, 2 usage or recipe error, 1 runtime error; a training run stopped by SIGTERM or\n"
      "SIGINT checkpoints first and exits 143 or 130 (run it again to continue).",
      "neva-run"};
  app.set_version_flag("--version", std::string("neva-run ") + NEVA_VERSION + " (LibTorch " + TORCH_VERSION +
                                        ", plugin ABI " + std::to_string(neva::kPluginAbiMajor) + "." +
                                        std::to_string(neva::kPluginAbiMinor) + ")");
  app.require_subcommand(0, 1);

  std::string recipe_path;
  std::vector<std::string> overrides;
  std::vector<std::string> plugin_paths;
  auto add_common = [&](CLI::App* command) {
    command->add_option("--set", overrides, "Override a recipe key: section.key=value (repeatable)")
        ->type_name("KEY=VALUE");
    command->add_option("--plugin-path", plugin_paths, "Search this plugin directory first (repeatable)")
        ->type_name("DIR");
  };
  app.add_option("recipe", recipe_path, "Recipe to run (TOML)")->type_name("RECIPE.toml");
  add_common(&app);
  int nproc_per_node = 1;
  app.add_option("--nproc-per-node", nproc_per_node,
                 "Run the recipe as N local processes (as torchrun --standalone --nproc-per-node N): training "
                 "tensor-, pipeline-, expert-, context- and data-parallel, generate and score over a model-parallel group")
      ->type_name("N")
      ->check(CLI::Range(1, 1024));

  auto* demo = app.add_subcommand("demo", "Train and evaluate a tiny NeVA on synthetic data (configs/demo/*.toml)");
  add_common(demo);
  std::string demo_dir = "neva-demo";
  demo->add_option("--dir", demo_dir, "Where the demo writes its data, model and runs (default ./neva-demo)")
      ->type_name("DIR");
  bool prepare_only = false;
  demo->add_flag("--prepare-only", prepare_only, "Write the dataset, base model and recipes; train nothing");
  auto* serve = app.add_subcommand("serve", "Serve the recipe's model over an OpenAI-compatible HTTP API (docs/serving.md)");
  serve->add_option("recipe", recipe_path, "Recipe naming the model, as for generate")->required()->type_name("RECIPE.toml");
  add_common(serve);
  std::string serve_host, api_key;
  int serve_port = -1, serve_parallel = 0, serve_max_tokens = 0;
  serve->add_option("--host", serve_host, "Address to listen on (default 127.0.0.1: this machine only)")->type_name("ADDRESS");
  serve->add_option("--port", serve_port, "TCP port (default 8000; 0 picks a free one, printed at start)")
      ->check(CLI::Range(0, 65535))
      ->type_name("PORT");
  serve->add_option("--parallel", serve_parallel, "Slots: requests decoded together (default 4)")
      ->check(CLI::Range(1, 256))
      ->type_name("N");
  serve->add_option("--max-tokens", serve_max_tokens,
                    "The most new tokens a request may ask for, and its default (default inference.tokens_to_generate)")
      ->check(CLI::PositiveNumber)
      ->type_name("N");
  serve->add_option("--api-key", api_key, "Require Authorization: Bearer KEY on /v1 (or set NEVA_API_KEY)")
      ->type_name("KEY");
  auto* validate = app.add_subcommand("validate", "Parse and check a recipe and its plugins' keys; build nothing");
  validate->add_option("recipe", recipe_path, "Recipe to check")->required()->type_name("RECIPE.toml");
  add_common(validate);
  bool json = false;
  auto* plugins = app.add_subcommand("plugins", "List the plugins found, without instantiating any");
  plugins->add_flag("--json", json, "Machine-readable output");
  plugins->add_option("--plugin-path", plugin_paths, "Search this plugin directory first (repeatable)")
      ->type_name("DIR");

  auto* checkpoint = app.add_subcommand("checkpoint", "Tools for training checkpoints (docs/checkpoint-format.md)");
  checkpoint->require_subcommand(1);
  auto* checkpoint_inspect = checkpoint->add_subcommand(
      "inspect", "Print a checkpoint's layout, tensors and pieces, and check its files against the manifest");
  std::string checkpoint_dir;
  checkpoint_inspect->add_option("dir", checkpoint_dir, "A step directory, or a run directory (its latest checkpoint)")
      ->required()
      ->type_name("DIR");
  checkpoint_inspect->add_flag("--json", json, "Machine-readable output");
  auto* checkpoint_convert = checkpoint->add_subcommand(
      "convert", "Write a checkpoint again, streamed: every tensor whole in one file, or as a TP x PP run saves it "
                 "(any layout resumes from either)");
  std::string convert_to;
  int convert_tp = 1, convert_pp = 1;
  checkpoint_convert->add_option("dir", checkpoint_dir, "A step directory, or a run directory (its latest checkpoint)")
      ->required()
      ->type_name("DIR");
  checkpoint_convert->add_option("--to", convert_to, "The new checkpoint's directory (absent or empty)")
      ->required()
      ->type_name("OUT");
  checkpoint_convert->add_option("--tp", convert_tp, "Tensor-parallel ranks to split the tensors for (default 1)")
      ->check(CLI::PositiveNumber)
      ->type_name("N");
  checkpoint_convert->add_option("--pp", convert_pp, "Pipeline stages to split the layers over (default 1)")
      ->check(CLI::PositiveNumber)
      ->type_name("N");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::cout << app.help();
    return 0;
  } catch (const CLI::CallForAllHelp&) {
    std::cout << app.help("", CLI::AppFormatMode::All);
    return 0;
  } catch (const CLI::CallForVersion&) {
    std::cout << app.version() << "\n";
    try {  // what computes: a bad NEVA_CPU_BLAS or NEVA_GEMV is reported here too
      const char* policy = std::getenv("OMP_WAIT_POLICY");
      const std::string fp32 = neva::nn::cpu_fp32_gemv_name(), bf16 = neva::nn::cpu_bf16_gemv_name();
      std::cout << "fp32 CPU linear layers without autograd: " << fp32 << "; OMP_WAIT_POLICY="
                << (policy ? policy : "(unset)") << "\n"
                << "bf16 CPU linear layers without autograd: " << bf16 << "\n";
    } catch (const neva::Error& error) {
      std::cerr << "neva-run: " << error.what() << "\n";
      return kExitUsage;
    }
    return 0;
  } catch (const CLI::ParseError& error) {
    std::cerr << "neva-run: " << error.what() << " (see neva-run --help)\n";
    return kExitUsage;
  }
  try {  // a bad NEVA_CPU_BLAS or NEVA_GEMV stops the run before anything is built
    neva::nn::cpu_fp32_gemv_name();
    neva::nn::cpu_bf16_gemv_name();
  } catch (const neva::Error& error) {
    std::cerr << "neva-run: " << error.what() << "\n";
    return kExitUsage;
  }

  try {
    if (nproc_per_node > 1) {
      if (recipe_path.empty() || *demo || *validate || *plugins || *checkpoint || *serve) {
        std::cerr << "neva-run: --nproc-per-node goes with a recipe to run (neva-run --nproc-per-node N RECIPE.toml)\n";
        return kExitUsage;
      }
      // The workers run this same command line without the option.
      std::vector<std::string> arguments;
      for (int i = 0; i < argc; ++i) {
        const std::string argument = argv[i];
        if (argument == "--nproc-per-node") {
          ++i;
        } else if (argument.rfind("--nproc-per-node=", 0) != 0) {
          arguments.push_back(argument);
        }
      }
      return neva::launch_workers(nproc_per_node, arguments);
    }
    if (*serve) {
      // The flags are recipe keys (serve.*), so that --set and the recipe can give them too.
      std::vector<std::string> all = overrides;
      all.push_back("run.mode=\"serve\"");
      if (!serve_host.empty()) all.push_back("serve.host=" + nlohmann::json(serve_host).dump());
      if (serve_port >= 0) all.push_back("serve.port=" + std::to_string(serve_port));
      if (serve_parallel > 0) all.push_back("serve.parallel=" + std::to_string(serve_parallel));
      if (serve_max_tokens > 0) all.push_back("serve.max_tokens=" + std::to_string(serve_max_tokens));
      neva::ServeOptions options;
      options.api_key = api_key;
      if (const char* key = std::getenv("NEVA_API_KEY"); options.api_key.empty() && key) options.api_key = key;
      return neva::run_serve(load(recipe_path, all, plugin_paths), options);
    }
    if (*checkpoint_inspect) {
      return neva::inspect_checkpoint(checkpoint_dir, json, std::cout, std::cerr);
    } else if (*checkpoint_convert) {
      return neva::convert_checkpoint(checkpoint_dir, convert_to, convert_tp, convert_pp, std::cout, std::cerr);
    } else if (*plugins) {
      list_plugins(plugin_paths, json);
    } else if (*validate) {
      neva::Recipe recipe = load(recipe_path, overrides, plugin_paths);
      std::cout << recipe.source << ": valid (mode " << recipe.run.mode << ")\n";
    } else if (*demo) {
      refuse_multi_process_launch("the demo");
      return neva::run_demo(demo_dir, overrides, registry_options(plugin_paths), prepare_only);
    } else if (!recipe_path.empty()) {
      return run(load(recipe_path, overrides, plugin_paths));
    } else {
      std::cerr << "neva-run: no recipe given (see neva-run --help)\n";
      return kExitUsage;
    }
  } catch (const neva::RecipeError& error) {
    std::cerr << "neva-run: " << error.what() << "\n";
    return kExitUsage;
  } catch (const c10::Error& error) {  // LibTorch's own (its what() carries a C++ backtrace)
    const std::string reason = neva::allocation_failure(error.what_without_backtrace());
    std::cerr << "neva-run: " << (reason.empty() ? error.what_without_backtrace() : reason) << "\n";
    return kExitRuntime;
  } catch (const std::bad_alloc&) {
    std::cerr << "neva-run: " << neva::out_of_memory() << "\n";
    return kExitRuntime;
  } catch (const std::exception& error) {
    std::cerr << "neva-run: " << error.what() << "\n";
    return kExitRuntime;
  }
  return 0;
}
