// LLaVA training data: records, templates and label masking, bad samples, blending, packing.
#include <doctest/doctest.h>

#include <ATen/ATen.h>

#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "neva/io/atomic_file.h"
#include "neva/data/dataset.h"
#include "neva/data/image.h"
#include "neva/data/labels.h"
#include "test_support.h"

using neva::test::TempDir;

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// A byte-level tokenizer with no merges: every byte is one token, so decoded label spans show
// exactly which characters are learned. Special tokens of every template are added tokens.
std::shared_ptr<neva::Tokenizer> byte_tokenizer(const TempDir& dir) {
  std::vector<std::string> specials = {"<unk>", "<s>", "</s>", "<image>", "<pad>", "<|begin_of_text|>", "<|eot_id|>",
                                       "<|start_header_id|>", "<|end_header_id|>", "<extra_id_0>", "<extra_id_1>",
                                       "<extra_id_2>"};
  json vocab = json::object(), added = json::array();
  std::int64_t id = 0;
  for (const auto& token : specials) {
    vocab[token] = id;
    added.push_back({{"id", id++}, {"content", token}, {"special", true}, {"normalized", false}, {"single_word", false},
                     {"lstrip", false}, {"rstrip", false}});
  }
  for (int b = 0; b < 256; ++b) vocab[neva::byte_level_symbol(static_cast<std::uint8_t>(b))] = id++;
  json bos = {{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}};
  json tokenizer = {
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", {bos, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"pair", {bos, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}, {"ignore_merges", true}}}};
  dir.write("tokenizer.json", tokenizer.dump());
  return std::shared_ptr<neva::Tokenizer>(neva::Tokenizer::load(dir.path().string()));
}

void write_image(const fs::path& path) {
  neva::Image image;
  image.width = image.height = 8;
  image.rgb.assign(8 * 8 * 3, 128);
  neva::write_file_atomically(path.string(), neva::encode_png(image));
}

neva::SampleFormat format_for(const std::string& conversation, const TempDir& dir) {
  neva::SampleFormat format;
  format.conversation = neva::conversation_template(conversation);
  format.image_folder = dir.path().string();
  format.processor.size = format.processor.crop_size = 8;
  format.image_token_id = 3;
  format.max_seq_length = 4096;
  format.tokens_for_image = [](std::int64_t, std::int64_t) -> std::int64_t { return 4; };
  return format;
}

neva::ConversationRecord record(std::vector<std::string> images, std::vector<std::pair<bool, std::string>> turns) {
  neva::ConversationRecord r;
  r.where = "test record";
  r.images = std::move(images);
  for (auto& [user, text] : turns) r.turns.push_back({user ? neva::Turn::Role::User : neva::Turn::Role::Assistant, text});
  return r;
}

// The decoded runs of labelled tokens.
std::vector<std::string> labelled_spans(const neva::TrainingSample& sample, const neva::Tokenizer& tokenizer) {
  std::vector<std::string> spans;
  std::vector<std::int64_t> run;
  for (std::size_t t = 0; t <= sample.labels.size(); ++t) {
    if (t < sample.labels.size() && sample.labels[t] != neva::kIgnoreIndex) {
      CHECK(sample.labels[t] == sample.input_ids[t]);
      run.push_back(sample.labels[t]);
    } else if (!run.empty()) {
      spans.push_back(tokenizer.decode(run, false));
      run.clear();
    }
  }
  return spans;
}

const std::vector<std::pair<bool, std::string>> kTwoRounds = {
    {true, "<image>\nWhat is it?"}, {false, "A cat."}, {true, "And its colour?"}, {false, "Grey."}};

}  // namespace

TEST_CASE("labels cover exactly the assistant's answers and their end marker, in every template") {
  TempDir dir;
  auto tokenizer = byte_tokenizer(dir);
  write_image(dir.path() / "cat.png");
  const std::map<std::string, std::vector<std::string>> expected = {
      {"v1", {" A cat.</s>", " Grey.</s>"}},
      {"llava_v1", {" A cat.</s>", " Grey.</s>"}},
      {"llama_2", {" A cat. </s>", " Grey. </s>"}},
      {"llava_llama_2", {" A cat. </s>", " Grey. </s>"}},
      {"llama_3", {"A cat.<|eot_id|>", "Grey.<|eot_id|>"}},
      {"nvgpt", {"A cat.\n<extra_id_1>", "Grey.\n<extra_id_1>"}},
  };
  for (const auto& [name, spans] : expected) {
    CAPTURE(name);
    auto sample = neva::make_sample(record({"cat.png"}, kTwoRounds), *tokenizer, format_for(name, dir));
    CHECK(labelled_spans(sample, *tokenizer) == spans);
    CHECK(std::count(sample.input_ids.begin(), sample.input_ids.end(), 3) == 4);  // the image's tokens
    REQUIRE(sample.images.size() == 1);
    CHECK(sample.images[0].sizes() == at::IntArrayRef({3, 8, 8}));
  }
}

TEST_CASE("the plain template (stage 1) is LLaVA's preprocess_plain: image tokens, then the caption") {
  TempDir dir;
  auto tokenizer = byte_tokenizer(dir);
  write_image(dir.path() / "cat.png");
  auto sample = neva::make_sample(record({"cat.png"}, {{true, "Describe <image> briefly."}, {false, "a grey cat"}}),
                                  *tokenizer, format_for("plain", dir));
  CHECK(labelled_spans(sample, *tokenizer) == std::vector<std::string>{"a grey cat\n"});
  // BOS, four image tokens, the caption: the human text is replaced by the image alone.
  CHECK(sample.input_ids[0] == 1);
  for (int t = 1; t <= 4; ++t) CHECK(sample.input_ids[t] == 3);
  CHECK(tokenizer->decode(std::vector<std::int64_t>(sample.input_ids.begin() + 5, sample.input_ids.end()), false) ==
        "a grey cat\n");
}

TEST_CASE("bad samples raise SampleError naming the record and the reason") {
  TempDir dir;
  auto tokenizer = byte_tokenizer(dir);
  write_image(dir.path() / "cat.png");
  auto format = format_for("v1", dir);
  auto message = [&](const neva::ConversationRecord& r) {
    try {
      neva::make_sample(r, *tokenizer, format);
    } catch (const neva::SampleError& error) {
      return std::string(error.what());
    }
    return std::string("no error");
  };
  CHECK(message(record({}, kTwoRounds)) ==
        "test record: the conversation holds 1 <image> marker(s) but the record names 0 image(s)");
  CHECK(message(record({"cat.png", "cat.png"}, kTwoRounds)) ==
        "test record: the conversation holds 1 <image> marker(s) but the record names 2 image(s)");
  std::string missing = message(record({"absent.png"}, kTwoRounds));
  CHECK(missing.rfind("test record: ", 0) == 0);
  CHECK(missing.find("absent.png") != std::string::npos);
  format.max_seq_length = 20;
  CHECK(message(record({"cat.png"}, kTwoRounds)).find("too long: ") != std::string::npos);
  auto plain = format_for("plain", dir);
  CHECK_THROWS_WITH_AS(neva::make_sample(record({"cat.png"}, {{true, "Describe."}, {false, "a cat <image>"}}), *tokenizer, plain),
                       "test record: the plain template takes the image in the human turn, not the caption",
                       neva::SampleError);
  auto malformed = record({}, {});
  malformed.problem = "no assistant turn to learn from";
  CHECK(message(malformed) == "test record: no assistant turn to learn from");
}

TEST_CASE("image_aspect_ratio is checked against the encoder's processor once, up front") {
  neva::ImageProcessorConfig clip;  // shortest edge + centre crop
  CHECK(neva::with_aspect_ratio(clip, "keep").aspect_ratio == "keep");
  CHECK(neva::with_aspect_ratio(clip, "pad").aspect_ratio == "pad");
  neva::ImageProcessorConfig siglip;
  siglip.resize = neva::ImageProcessorConfig::Resize::Exact;
  siglip.size = 384;
  CHECK(neva::with_aspect_ratio(siglip, "square").aspect_ratio == "square");
  CHECK_THROWS_WITH_AS(neva::with_aspect_ratio(siglip, "keep"),
                       "model.data.image_aspect_ratio: 'keep' needs a shortest-edge processor (CLIP), not a fixed-size "
                       "one (SigLIP, 384x384)",
                       neva::Error);
  CHECK_THROWS_WITH_AS(neva::with_aspect_ratio(clip, "anyres"),
                       "model.data.image_aspect_ratio: 'anyres' is not supported (supported: pad, square, keep)", neva::Error);
}

TEST_CASE("LLaVA JSON and JSON Lines files: malformed records are kept as problems, not crashes") {
  TempDir dir;
  json items = json::array(
      {{{"id", "ok"}, {"image", "a.png"}, {"conversations", {{{"from", "human"}, {"value", "<image>\nhi"}}, {{"from", "gpt"}, {"value", "yo"}}}}},
       {{"id", 7}, {"conversations", {{{"from", "human"}, {"value", "only a question"}}}}},
       {{"id", "who"}, {"conversations", {{{"from", "robot"}, {"value", "x"}}, {{"from", "gpt"}, {"value", "y"}}}}},
       {{"id", "lead"}, {"conversations", {{{"from", "gpt"}, {"value", "hello"}}, {{"from", "human"}, {"value", "q"}}, {{"from", "gpt"}, {"value", "a"}}}}},
       "not an object"});
  auto path = dir.write("data.json", items.dump());
  auto records = neva::read_conversation_file(path.string());
  REQUIRE(records.size() == 5);
  CHECK(records[0].problem.empty());
  CHECK(records[0].where == path.string() + "[0] (id ok)");
  CHECK(records[0].images == std::vector<std::string>{"a.png"});
  CHECK(records[1].problem == "no assistant turn to learn from");
  CHECK(records[1].where == path.string() + "[1] (id 7)");
  CHECK(records[2].problem == "unknown speaker \"robot\" (expected human/user or gpt/assistant)");
  CHECK(records[3].problem.empty());  // a leading assistant turn is dropped, as LLaVA does
  CHECK(records[3].turns.size() == 2);
  CHECK(records[4].problem == "expected an object with \"conversations\"");

  auto lines = dir.write("data.jsonl", items[0].dump() + "\n{broken\n\n" + items[0].dump() + "\n");
  auto from_lines = neva::read_conversation_file(lines.string());
  REQUIRE(from_lines.size() == 3);
  CHECK(from_lines[1].where == lines.string() + ":2:2");  // line 2, column 2
  CHECK(from_lines[1].problem.rfind("invalid JSON: syntax error while parsing object key", 0) == 0);

  auto broken = dir.write("broken.json", "[{\"id\": 1,");
  CHECK_THROWS_WITH_AS(neva::read_conversation_file(broken.string()),
                       doctest::Contains((broken.string() + ":1:11: invalid JSON: syntax error").c_str()), neva::Error);
  CHECK_THROWS_WITH_AS(neva::read_conversation_file((dir.path() / "absent.json").string()),
                       doctest::Contains("absent.json: cannot open: No such file or directory"), neva::Error);
}

TEST_CASE("blending follows the weights, reshuffles every pass, and replays exactly from any position") {
  neva::BlendedOrder order({30, 10}, {3.0, 1.0}, 7);
  std::vector<std::pair<std::size_t, std::size_t>> first;
  std::map<std::size_t, int> per_source;
  for (int i = 0; i < 400; ++i) {
    first.push_back(order.next());
    ++per_source[first.back().first];
  }
  CHECK(per_source[0] == 300);
  CHECK(per_source[1] == 100);
  // Each pass over a source visits every record once, in a new order.
  std::vector<std::size_t> pass1, pass2;
  for (const auto& [source, index] : first) {
    if (source != 1) continue;
    (pass1.size() < 10 ? pass1 : pass2).push_back(index);
    if (pass2.size() == 10) break;
  }
  CHECK(std::set<std::size_t>(pass1.begin(), pass1.end()).size() == 10);
  CHECK(std::set<std::size_t>(pass2.begin(), pass2.end()).size() == 10);
  CHECK(pass1 != pass2);
  neva::BlendedOrder replay({30, 10}, {3.0, 1.0}, 7);
  replay.seek(123);
  for (int i = 123; i < 400; ++i) CHECK(replay.next() == first[i]);
  neva::BlendedOrder other_seed({30, 10}, {3.0, 1.0}, 8);
  std::vector<std::pair<std::size_t, std::size_t>> other;
  for (int i = 0; i < 40; ++i) other.push_back(other_seed.next());
  CHECK(other != std::vector<std::pair<std::size_t, std::size_t>>(first.begin(), first.begin() + 40));
  CHECK_THROWS_AS(neva::BlendedOrder({0}, {1.0}, 1), neva::Error);
  CHECK_THROWS_AS(neva::BlendedOrder({3}, {0.0}, 1), neva::Error);
}

TEST_CASE("packing: one row, positions restart per sample, attention segments, no cross-sample target") {
  neva::TrainingSample a, b;
  a.input_ids = {1, 10, 11};
  a.labels = {neva::kIgnoreIndex, 10, 11};
  b.input_ids = {1, 20, 21, 22};
  b.labels = {1, neva::kIgnoreIndex, 21, 22};  // even a labelled first token is not a target across samples
  auto packed = neva::collate({a, b}, true, 0);
  CHECK(packed.input_ids.sizes() == at::IntArrayRef({1, 7}));
  CHECK(at::equal(packed.positions, at::tensor({0, 1, 2, 0, 1, 2, 3}, at::kLong).view({1, 7})));
  CHECK(at::equal(packed.segment_ids, at::tensor({0, 0, 0, 1, 1, 1, 1}, at::kLong).view({1, 7})));
  CHECK(packed.labels[0][3].item<std::int64_t>() == neva::kIgnoreIndex);
  CHECK(packed.labelled_tokens == 4);
  auto padded = neva::collate({a, b}, false, 0);
  CHECK(padded.input_ids.sizes() == at::IntArrayRef({2, 4}));
  CHECK(at::equal(padded.attention_mask, at::tensor({1, 1, 1, 0, 1, 1, 1, 1}, at::kLong).view({2, 4})));
  CHECK(padded.labels[0][3].item<std::int64_t>() == neva::kIgnoreIndex);
  CHECK(!padded.segment_ids.defined());
  CHECK(padded.labelled_tokens == 4);
}

TEST_CASE("the loader skips and reports bad samples, or stops at the first when asked") {
  TempDir dir;
  auto tokenizer = byte_tokenizer(dir);
  write_image(dir.path() / "cat.png");
  json good = {{"image", "cat.png"}, {"conversations", {{{"from", "human"}, {"value", "<image>\nq"}}, {{"from", "gpt"}, {"value", "a"}}}}};
  json bad = {{"id", "lost"}, {"image", "gone.png"}, {"conversations", good["conversations"]}};
  auto path = dir.write("data.jsonl", good.dump() + "\n" + bad.dump() + "\n" + good.dump() + "\n");
  neva::LoaderOptions options;
  options.micro_batch_size = 2;
  {
    neva::TrainingData data({{path.string(), 1.0}}, tokenizer, format_for("v1", dir), options);
    std::vector<std::string> skipped;
    std::uint64_t position = 0;
    for (int i = 0; i < 3; ++i) {
      auto batch = data.next();
      CHECK(batch.samples == 2);
      CHECK(batch.end_position > position);
      position = batch.end_position;
      skipped.insert(skipped.end(), batch.skipped.begin(), batch.skipped.end());
    }
    REQUIRE(!skipped.empty());
    CHECK(skipped[0].find(path.string() + ":2 (id lost): ") == 0);
    CHECK(skipped[0].find("gone.png") != std::string::npos);
  }
  options.skip_bad_samples = false;
  options.micro_batch_size = 3;
  neva::TrainingData strict({{path.string(), 1.0}}, tokenizer, format_for("v1", dir), options);
  CHECK_THROWS_WITH_AS(strict.next(), doctest::Contains("(id lost)"), neva::SampleError);

  auto all_bad = dir.write("bad.jsonl", bad.dump() + "\n");
  options.skip_bad_samples = true;
  neva::TrainingData hopeless({{all_bad.string(), 1.0}}, tokenizer, format_for("v1", dir), options);
  CHECK_THROWS_WITH_AS(hopeless.next(), doctest::Contains("no usable training sample"), neva::Error);
}

TEST_CASE("data-parallel shards: each replica reads its residue class of the stream, skips within it, resumes") {
  TempDir dir;
  auto tokenizer = byte_tokenizer(dir);
  write_image(dir.path() / "cat.png");
  std::string lines;
  for (int k = 0; k < 7; ++k) {
    json turns = {{{"from", "human"}, {"value", "<image>\nq" + std::to_string(k)}}, {{"from", "gpt"}, {"value", "a"}}};
    json r = {{"image", k == 4 ? "gone.png" : "cat.png"}, {"conversations", turns}};  // record 5 is bad
    lines += r.dump() + "\n";
  }
  auto path = dir.write("data.jsonl", lines);
  neva::LoaderOptions options;  // micro-batch 1: a batch's sample sits at end_position - 1
  std::map<std::uint64_t, at::Tensor> stream;
  {
    neva::TrainingData single({{path.string(), 1.0}}, tokenizer, format_for("v1", dir), options);
    while (stream.size() < 40) {
      auto batch = single.next();
      stream[batch.end_position - 1] = batch.input_ids;
    }
  }
  for (std::int64_t count : {2, 3}) {
    std::set<std::uint64_t> seen;
    for (std::int64_t rank = 0; rank < count; ++rank) {
      options.shard_rank = rank;
      options.shard_count = count;
      neva::TrainingData shard({{path.string(), 1.0}}, tokenizer, format_for("v1", dir), options);
      std::uint64_t resume_at = 0;
      std::vector<at::Tensor> after_resume;
      for (int i = 0; i < 8; ++i) {
        auto batch = shard.next();
        const std::uint64_t position = batch.end_position - 1;
        CHECK(position % count == static_cast<std::uint64_t>(rank));
        REQUIRE(stream.count(position));
        CHECK(at::equal(batch.input_ids, stream[position]));
        CHECK(seen.insert(position).second);
        if (i == 3) resume_at = batch.end_position;
        if (i > 3) after_resume.push_back(batch.input_ids);
      }
      neva::TrainingData resumed({{path.string(), 1.0}}, tokenizer, format_for("v1", dir), options, resume_at);
      for (const auto& expected : after_resume) CHECK(at::equal(resumed.next().input_ids, expected));
    }
    // Together the replicas read the single run's samples, no more and none twice.
    const std::uint64_t covered = 8 * static_cast<std::uint64_t>(count) / 2;
    for (const auto& [position, ids] : stream) {
      if (position < covered) CHECK(seen.count(position));
    }
  }
  options.shard_rank = 2;
  options.shard_count = 2;
  CHECK_THROWS_WITH_AS(neva::TrainingData({{path.string(), 1.0}}, tokenizer, format_for("v1", dir), options),
                       doctest::Contains("data shard 2 of 2"), neva::Error);
}

TEST_CASE("resuming under another data-parallel size starts where no replica has read, and counts what is read again") {
  // Two aligned replicas after 4 samples each (0, 2, 4, 6 and 1, 3, 5, 7): nothing lost or repeated.
  auto aligned = neva::resume_point({7, 8});
  CHECK(aligned.position == 8);
  CHECK(aligned.repeated == 0);
  // One replica: its own end.
  CHECK(neva::resume_point({13}).position == 13);
  CHECK(neva::resume_point({13}).repeated == 0);
  // Replica 1 read ahead (a skipped bad sample replaced from its shard: 1, 3, 5, 7, 9): position 8,
  // and sample 9 is read again.
  auto ahead = neva::resume_point({7, 10});
  CHECK(ahead.position == 8);
  CHECK(ahead.repeated == 1);
  // Three replicas, one behind: 0 3 6 | 1 4 7 10 | 2 5 8 -> the first unread is 9 (replica 0's next).
  auto three = neva::resume_point({7, 11, 9});
  CHECK(three.position == 9);
  CHECK(three.repeated == 1);  // 10
  CHECK(neva::resume_point({}).position == 0);
}
