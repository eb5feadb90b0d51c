// The bad-input battery: hand-made bad inputs across recipes, --set overrides, Hugging Face
// directories (config.json), safetensors, tokenizers, images, LLaVA data, plugins and checkpoints,
// each given to neva-run as a user would. Every one must end with one clear error: the exit code (2
// for the user's recipe or command line, 1 at run time), one line on stderr that starts with
// "neva-run: " and names the culprit (file, key, tensor), and none of the signs of a crash, a leaked
// internal message or a hang. docs/reliability.md holds the same list as a table (a test here keeps
// the two equal).
#include <doctest/doctest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "neva/train/checkpoints.h"
#include "neva/data/image.h"
#include "neva/io/safetensors.h"
#include "test_support.h"

namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using neva::test::TempDir;

constexpr int kRecipe = 2;   // usage or recipe error
constexpr int kRuntime = 1;  // runtime error

std::string quote(const std::string& text) {  // for /bin/sh
  std::string out = "'";
  for (char c : text) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

std::string read(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write(const fs::path& path, const std::string& content) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << content;
}

// A safetensors file from a header text and data bytes, exactly as given.
std::string raw_safetensors(const std::string& header, const std::string& data = "") {
  std::string out(8, '\0');
  std::uint64_t size = header.size();
  std::memcpy(out.data(), &size, 8);
  return out + header + data;
}

// The demo's files (tiny Llama + CLIP with weights, tokenizer, data, images, recipes) in a fresh
// directory, and a generate recipe over them; each case copies what it breaks.
struct Fixture {
  TempDir dir;
  fs::path root = dir.path() / "demo";
  int counter = 0;
  std::vector<std::unique_ptr<neva::RunDirectoryLock>> locks;  // run directories held for a case

  Fixture() {
    auto prepared = neva::test::run_command(
        "env -u NEVA_PLUGIN_PATH " + neva::test::binary("neva-run").string() + " demo --prepare-only --dir " + root.string(), 300);
    REQUIRE_MESSAGE(prepared.exit_code == 0, prepared.err);
    write(root / "generate.toml", generate_recipe("model/llm", "model/vision", "model/tokenizer"));
  }

  static std::string generate_recipe(const std::string& llm, const std::string& vision, const std::string& tokenizer) {
    return "[run]\nmode = \"generate\"\n[model.tokenizer]\nmodel = \"" + tokenizer + "\"\n[model.data]\nconv_template = \"v1\"\n"
           "image_folder = \"data/images\"\n[model.mm_cfg]\nmm_mlp_adapter_type = \"mlp2x_gelu\"\nimage_token_index = 3\n"
           "[model.mm_cfg.llm]\nplugin = \"llama\"\nfrom_pretrained = \"" + llm + "\"\n[model.mm_cfg.vision_encoder]\n"
           "plugin = \"clip\"\nfrom_pretrained = \"" + vision + "\"\n[inference]\ntokens_to_generate = 2\n"
           "prompts = [\"<image>\\nWhat shape is it?\"]\nimages = [\"test/0.png\"]\n";
  }

  // A fresh directory for one case, under the demo root (recipes' relative paths resolve there).
  fs::path fresh() {
    fs::path path = root / "cases" / std::to_string(++counter);
    fs::create_directories(path);
    return path;
  }
  // A copy of a demo directory (model/llm, model/vision, model/tokenizer) to break.
  fs::path copy(const std::string& what) {
    fs::path path = fresh() / fs::path(what).filename();
    fs::copy(root / what, path, fs::copy_options::recursive);
    return path;
  }
  json llm_config() const { return json::parse(read(root / "model/llm/config.json")); }
  json vision_config() const { return json::parse(read(root / "model/vision/config.json")); }
  // A model directory: the demo's weights beside `config` (for llm or vision).
  fs::path model_with_config(const std::string& what, const std::string& config_text) {
    fs::path path = copy(what);
    write(path / "config.json", config_text);
    return path;
  }
  // A recipe file in the demo's root, where its relative paths resolve as the demo's recipes' do.
  fs::path recipe(const std::string& text) {
    fs::path path = root / ("recipe-" + std::to_string(++counter) + ".toml");
    write(path, text);
    return path;
  }
  // A generate recipe over the demo model with its llm, vision or tokenizer directory replaced.
  fs::path generate_with(const std::string& llm, const std::string& vision, const std::string& tokenizer) {
    return recipe(generate_recipe(llm, vision, tokenizer));
  }
  fs::path generate() const { return root / "generate.toml"; }
  fs::path stage2() const { return root / "stage2.toml"; }
};

struct Invocation {
  std::string arguments;               // after neva-run, shell-quoted as needed
  int exit_code;
  std::vector<std::string> expected;   // each must appear in the error line
  std::string environment = "";        // before neva-run
};

struct Case {
  const char* area;
  const char* input;  // what the user gave (the docs table's first column)
  const char* error;  // what neva says (its second column), in short
  std::function<Invocation(Fixture&)> make;
};

// A training run of the demo's stage 2, one small step, with these extra arguments.
std::string train(Fixture& f, const std::string& run, const std::string& extra) {
  return quote(f.stage2().string()) + " --set exp_manager.explicit_log_dir=" + quote((f.root / "runs" / run).string()) +
         " --set trainer.max_steps=2 --set model.optim.sched.warmup_steps=1 --set model.micro_batch_size=2"
         " --set model.global_batch_size=2 --set exp_manager.export_hf=false"
         " --set model.mm_cfg.pretrain_mm_mlp_adapter=\"\" " + extra;
}

// validate over the demo's stage 2 recipe with one --set.
Invocation validate_set(Fixture& f, const std::string& assignment, std::vector<std::string> expected,
                        int exit_code = kRecipe) {
  return {"validate " + quote(f.stage2().string()) + " --set " + quote(assignment), exit_code, std::move(expected)};
}

// validate of a recipe text.
Invocation validate_text(Fixture& f, const std::string& text, std::vector<std::string> expected, int exit_code = kRecipe) {
  fs::path path = f.recipe(text);
  for (auto& part : expected) {
    const std::string marker = "{recipe}";
    if (auto at = part.find(marker); at != std::string::npos) part.replace(at, marker.size(), path.string());
  }
  return {"validate " + quote(path.string()), exit_code, std::move(expected)};
}

// A config.json for the llm (`vision` false) or the vision tower, given as text, through validate
// (the plugins read config.json when the recipe is parsed).
Invocation config_case(Fixture& f, bool vision, const std::string& text, std::vector<std::string> expected) {
  fs::path directory = f.model_with_config(vision ? "model/vision" : "model/llm", text);
  expected.insert(expected.begin(), (directory / "config.json").string());
  return {"validate " + quote(f.stage2().string()) + " --set " +
              quote(std::string("model.mm_cfg.") + (vision ? "vision_encoder" : "llm") + ".from_pretrained=\"" +
                    directory.string() + "\""),
          kRecipe, std::move(expected)};
}

Invocation llm_config_change(Fixture& f, const std::function<void(json&)>& change, std::vector<std::string> expected) {
  json config = f.llm_config();
  change(config);
  return config_case(f, false, config.dump(), std::move(expected));
}

Invocation vision_config_change(Fixture& f, const std::function<void(json&)>& change, std::vector<std::string> expected) {
  json config = f.vision_config();
  change(config);
  return config_case(f, true, config.dump(), std::move(expected));
}

// The llm's model.safetensors replaced by `bytes`; the model is built and loaded (inspect).
Invocation weights_case(Fixture& f, const std::string& bytes, std::vector<std::string> expected,
                        const std::string& file = "model.safetensors") {
  fs::path directory = f.copy("model/llm");
  fs::remove(directory / "model.safetensors");
  write(directory / file, bytes);
  expected.insert(expected.begin(), (directory / file).string());
  fs::path recipe = f.generate_with(directory.string(), "model/vision", "model/tokenizer");
  return {quote(recipe.string()), kRuntime, std::move(expected)};
}

// A tensor table header for the llm's weights with one entry changed (`change` gets the parsed header).
Invocation header_case(Fixture& f, const std::function<void(json&)>& change, std::vector<std::string> expected) {
  const std::string original = read(f.root / "model/llm/model.safetensors");
  std::uint64_t size = 0;
  std::memcpy(&size, original.data(), 8);
  json header = json::parse(original.substr(8, size));
  change(header);
  return weights_case(f, raw_safetensors(header.dump(), original.substr(8 + size)), std::move(expected));
}

// A tokenizer directory holding these files (name -> content), through generate.
Invocation tokenizer_case(Fixture& f, const std::map<std::string, std::string>& files, std::vector<std::string> expected,
                          bool keep_demo_files = false) {
  fs::path directory = keep_demo_files ? f.copy("model/tokenizer") : f.fresh() / "tokenizer";
  fs::create_directories(directory);
  for (const auto& [name, content] : files) write(directory / name, content);
  for (auto& part : expected) {
    const std::string marker = "{dir}";
    if (auto at = part.find(marker); at != std::string::npos) part.replace(at, marker.size(), directory.string());
  }
  fs::path recipe = f.generate_with("model/llm", "model/vision", directory.string());
  return {quote(recipe.string()), kRuntime, std::move(expected)};
}

// The demo tokenizer.json with one change.
Invocation tokenizer_json_change(Fixture& f, const std::function<void(json&)>& change, std::vector<std::string> expected) {
  json spec = json::parse(read(f.root / "model/tokenizer/tokenizer.json"));
  change(spec);
  return tokenizer_case(f, {{"tokenizer.json", spec.dump()}}, std::move(expected), true);
}

Invocation tokenizer_config_change(Fixture& f, const std::string& text, std::vector<std::string> expected) {
  return tokenizer_case(f, {{"tokenizer_config.json", text}}, std::move(expected), true);
}

// An image file with these bytes as the generate request's image.
Invocation image_case(Fixture& f, const std::string& bytes, std::vector<std::string> expected,
                      const std::string& name = "image.png", const std::string& extra = "") {
  fs::path path = f.fresh() / name;
  write(path, bytes);
  expected.insert(expected.begin(), path.string());
  return {quote(f.generate().string()) + " --set " + quote("inference.images=[\"" + path.string() + "\"]") + " " + extra,
          kRuntime, std::move(expected)};
}

neva::Image gradient(int width, int height) {
  neva::Image image;
  image.width = width;
  image.height = height;
  image.rgb.resize(static_cast<std::size_t>(width) * height * 3);
  for (std::size_t i = 0; i < image.rgb.size(); ++i) image.rgb[i] = static_cast<std::uint8_t>(i * 31);
  return image;
}

// A PNG whose IHDR claims `width` x `height` (its CRC fixed) and holds no pixel data worth the size.
std::string png_claiming(std::uint32_t width, std::uint32_t height) {
  std::string png = neva::encode_png(gradient(2, 2));
  auto put = [&](std::size_t at, std::uint32_t value) {
    for (int i = 0; i < 4; ++i) png[at + i] = static_cast<char>((value >> (24 - 8 * i)) & 0xFF);
  };
  put(16, width);
  put(20, height);
  std::uint32_t crc = 0xFFFFFFFFu;  // CRC-32 of "IHDR" + its 13 data bytes (PNG's polynomial)
  for (std::size_t i = 12; i < 29; ++i) {
    crc ^= static_cast<std::uint8_t>(png[i]);
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  put(29, crc ^ 0xFFFFFFFFu);
  return png;
}

// One LLaVA .json/.jsonl data file as the training data, bad samples fatal.
Invocation data_case(Fixture& f, const std::string& name, const std::string& content, std::vector<std::string> expected,
                     const std::string& extra = " --set model.data.bad_samples=fail") {
  fs::path path = f.fresh() / name;
  write(path, content);
  expected.insert(expected.begin(), path.string());
  return {train(f, "data-" + std::to_string(f.counter), "--set " + quote("model.data.data_path=" + path.string()) + extra),
          kRuntime, std::move(expected)};
}

json good_record() {
  return {{"id", "good"},
          {"image", "train/0.png"},
          {"conversations", {{{"from", "human"}, {"value", "<image>\nWhat shape?"}}, {{"from", "gpt"}, {"value", "a circle"}}}}};
}

// A record of the demo's kind with one change, alone in a .json file.
Invocation record_case(Fixture& f, const std::function<void(json&)>& change, std::vector<std::string> expected) {
  json record = good_record();
  change(record);
  return data_case(f, "data.json", json::array({record}).dump(), std::move(expected));
}

// The directory of a plugin `neva-run plugins` or a recipe cannot use.
fs::path plugin_copy(Fixture& f, const std::string& source, const std::string& name) {
  fs::path directory = f.fresh() / "plugins";
  fs::create_directories(directory);
  fs::copy_file(source, directory / name);
  return directory;
}

fs::path builtin(const std::string& name) { return neva::test::plugin_directory() / ("libneva-" + name + ".so"); }
fs::path broken(const std::string& fault) {
  return neva::test::broken_plugin_directory(fault) / ("libneva-test-" + fault + ".so");
}

// A checkpointed run of the demo's stage 2 (2 steps, a checkpoint each), to damage.
fs::path trained_run(Fixture& f, const std::string& run) {
  auto result = neva::test::run_command("env -u NEVA_PLUGIN_PATH OMP_NUM_THREADS=1 " + neva::test::binary("neva-run").string() + " " +
                                            train(f, run, "--set exp_manager.checkpoint_callback_params.every_n_train_steps=1"),
                                        300);
  REQUIRE_MESSAGE(result.exit_code == 0, result.err);
  return f.root / "runs" / run;
}

Invocation resume_case(Fixture& f, const std::string& run, std::vector<std::string> expected, int exit_code = kRuntime,
                       const std::string& extra = "") {
  return {train(f, run, "--set trainer.max_steps=3 " + extra), exit_code, std::move(expected)};
}

#include "bad_inputs_cases.inc"

// Runs every case of `area`.
void run_area(const std::string& area) {
  Fixture f;
  std::size_t ran = 0;
  for (const Case& c : kCases) {
    if (area != c.area) continue;
    ++ran;
    CAPTURE(std::string(c.input));
    const Invocation invocation = c.make(f);
    CAPTURE(invocation.arguments);
    auto result = neva::test::run_command("env -u NEVA_PLUGIN_PATH OMP_NUM_THREADS=1 " + invocation.environment + " " +
                                              neva::test::binary("neva-run").string() + " " + invocation.arguments,
                                          120);
    INFO(result.err);
    CHECK(result.exit_code == invocation.exit_code);
    // The error: the last line on stderr (warnings may come before it), from neva-run, naming the culprit.
    std::string last = result.err;
    while (!last.empty() && last.back() == '\n') last.pop_back();
    last = last.substr(last.rfind('\n') == std::string::npos ? 0 : last.rfind('\n') + 1);
    CHECK(last.rfind("neva-run: ", 0) == 0);
    for (const auto& part : invocation.expected) CHECK_MESSAGE(last.find(part) != std::string::npos, part);
    for (const char* sign : {"terminate called", "Aborted", "core dumped", "what():", "[json.exception", "Exception raised from",
                             "std::bad_alloc", "stoi", "stoll", "Segmentation", "ERROR: AddressSanitizer", "runtime error:"}) {
      CHECK_MESSAGE(result.err.find(sign) == std::string::npos, sign);
    }
  }
  CHECK(ran > 0);
}

}  // namespace

TEST_CASE("bad inputs: the command line and recipes") { run_area("recipe"); }
TEST_CASE("bad inputs: --set overrides") { run_area("--set"); }
TEST_CASE("bad inputs: Hugging Face config.json") { run_area("config.json"); }
TEST_CASE("bad inputs: safetensors weights") { run_area("safetensors"); }
TEST_CASE("bad inputs: tokenizers") { run_area("tokenizer"); }
TEST_CASE("bad inputs: images") { run_area("image"); }
TEST_CASE("bad inputs: LLaVA data files") { run_area("data"); }
TEST_CASE("bad inputs: plugins") { run_area("plugin"); }
TEST_CASE("bad inputs: checkpoints and run directories") { run_area("checkpoint"); }

TEST_CASE("bad inputs: at least 200, all distinct, and docs/reliability.md lists exactly these") {
  std::set<std::string> inputs;
  std::ostringstream table;
  table << "| # | area | bad input | neva-run says |\n|---|---|---|---|\n";
  std::size_t number = 0;
  for (const Case& c : kCases) {
    CHECK_MESSAGE(inputs.insert(std::string(c.area) + ": " + c.input).second, c.input);
    auto cell = [](std::string text) {
      std::string out;
      for (char ch : text) out += ch == '|' ? std::string("\\|") : std::string(1, ch);
      return out;
    };
    table << "| " << ++number << " | " << c.area << " | " << cell(c.input) << " | " << cell(c.error) << " |\n";
  }
  CHECK(number >= 200);
  const fs::path expected = neva::test::binary("bad_inputs_table.md");
  std::ofstream(expected) << table.str();
  const std::string docs = read(neva::test::source_directory() / "docs/reliability.md");
  const std::string begin = "<!-- bad-inputs:begin -->\n", end = "<!-- bad-inputs:end -->";
  const auto from = docs.find(begin), to = docs.find(end);
  REQUIRE_MESSAGE(from != std::string::npos, "docs/reliability.md has no bad-inputs table (the battery's is in " << expected.string() << ")");
  const std::string listed = docs.substr(from + begin.size(), to - from - begin.size());
  CHECK_MESSAGE(listed == table.str(), "docs/reliability.md's table differs from the battery: the battery's is in "
                                           << expected.string());
  const std::string count = "**" + std::to_string(number) + " bad inputs**";
  CHECK_MESSAGE(docs.find(count) != std::string::npos, "docs/reliability.md should say " << count);
}
