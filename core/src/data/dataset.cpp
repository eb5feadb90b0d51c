#include "neva/data/dataset.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <condition_variable>
#include <deque>
#include <exception>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "neva/data/image_tokens.h"
#include "neva/io/json.h"
#include "neva/data/labels.h"

namespace neva {

SampleError::~SampleError() = default;

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string strip(const std::string& text) {
  const char* space = " \t\r\n";
  std::size_t first = text.find_first_not_of(space);
  if (first == std::string::npos) return "";
  return text.substr(first, text.find_last_not_of(space) - first + 1);
}

ConversationRecord parse_record(const json& item, std::string where) {
  ConversationRecord record;
  record.where = std::move(where);
  auto fail = [&](const std::string& problem) {
    record.problem = problem;
    return record;
  };
  if (!item.is_object()) return fail("expected an object with \"conversations\"");
  if (item.contains("id")) {
    const json& id = item["id"];
    record.where += " (id " + (id.is_string() ? id.get<std::string>() : json_excerpt(id)) + ")";
  }
  if (item.contains("image")) {
    const json& image = item["image"];
    if (image.is_string()) {
      record.images.push_back(image.get<std::string>());
    } else if (image.is_array() && std::all_of(image.begin(), image.end(), [](const json& i) { return i.is_string(); })) {
      for (const auto& path : image) record.images.push_back(path.get<std::string>());
    } else {
      return fail("\"image\" must be a path or a list of paths");
    }
  }
  if (!item.contains("conversations") || !item["conversations"].is_array()) {
    return fail("expected \"conversations\": a list of {\"from\", \"value\"}");
  }
  for (const auto& turn : item["conversations"]) {
    if (!turn.is_object() || !turn.contains("from") || !turn["from"].is_string() || !turn.contains("value") ||
        !turn["value"].is_string()) {
      return fail("every conversation turn needs string \"from\" and \"value\"");
    }
    std::string from = turn["from"].get<std::string>();
    Turn::Role role;
    if (from == "human" || from == "user") {
      role = Turn::Role::User;
    } else if (from == "gpt" || from == "assistant") {
      role = Turn::Role::Assistant;
    } else {
      return fail("unknown speaker \"" + from + "\" (expected human/user or gpt/assistant)");
    }
    // LLaVA drops a conversation's leading assistant turn.
    if (record.turns.empty() && role == Turn::Role::Assistant) continue;
    if (!record.turns.empty() && record.turns.back().role == role) {
      return fail("conversation turns must alternate between human and gpt");
    }
    record.turns.push_back({role, turn["value"].get<std::string>()});
  }
  if (record.turns.size() < 2) return fail("no assistant turn to learn from");
  if (record.turns.back().role == Turn::Role::User) record.turns.pop_back();  // an unanswered question teaches nothing
  return record;
}

std::size_t common_prefix(const std::vector<std::int64_t>& a, const std::vector<std::int64_t>& b) {
  std::size_t n = 0;
  while (n < a.size() && n < b.size() && a[n] == b[n]) ++n;
  return n;
}

std::uint64_t mix(std::uint64_t x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

TrainingBatch collate_rows(const std::vector<std::vector<TrainingSample>>& rows, bool segments, std::int64_t pad_id) {
  TrainingBatch batch;
  const std::int64_t count = static_cast<std::int64_t>(rows.size());
  std::int64_t width = 1;
  for (const auto& row : rows) {
    std::int64_t length = 0;
    for (const auto& sample : row) length += static_cast<std::int64_t>(sample.input_ids.size());
    width = std::max(width, length);
  }
  auto options = at::TensorOptions().dtype(at::kLong);
  batch.input_ids = at::full({count, width}, pad_id, options);
  batch.labels = at::full({count, width}, kIgnoreIndex, options);
  batch.attention_mask = at::zeros({count, width}, options);
  batch.positions = at::zeros({count, width}, options);
  if (segments) batch.segment_ids = at::full({count, width}, -1, options);
  auto ids = batch.input_ids.accessor<std::int64_t, 2>();
  auto labels = batch.labels.accessor<std::int64_t, 2>();
  auto mask = batch.attention_mask.accessor<std::int64_t, 2>();
  auto positions = batch.positions.accessor<std::int64_t, 2>();
  at::Tensor segment_storage = segments ? batch.segment_ids : at::zeros({1, 1}, options);
  auto segment_of = segment_storage.accessor<std::int64_t, 2>();
  for (std::int64_t r = 0; r < count; ++r) {
    std::int64_t column = 0, segment = 0;
    for (const auto& sample : rows[r]) {
      const std::int64_t length = static_cast<std::int64_t>(sample.input_ids.size());
      for (std::int64_t t = 0; t < length; ++t, ++column) {
        ids[r][column] = sample.input_ids[t];
        // A sample's first token is never a target: it would be predicted from the previous sample.
        labels[r][column] = t == 0 ? kIgnoreIndex : sample.labels[t];
        mask[r][column] = 1;
        positions[r][column] = t;
        if (segments) segment_of[r][column] = segment;
      }
      ++segment;
      ++batch.samples;
      batch.tokens += length;
      batch.images.insert(batch.images.end(), sample.images.begin(), sample.images.end());
    }
    // Padding positions continue the count (harmless: padding is masked out and never a target).
    for (std::int64_t t = column; t < width; ++t) positions[r][t] = t;
  }
  batch.labelled_tokens = (batch.labels.narrow(1, 1, width - 1) != kIgnoreIndex).sum().item<std::int64_t>();
  return batch;
}

}  // namespace

std::vector<ConversationRecord> read_conversation_file(const std::string& path) {
  std::vector<ConversationRecord> records;
  if (fs::path(path).extension() == ".jsonl") {
    for_each_line(path, [&](std::string_view line, std::size_t number) {  // streamed: corpora are large
      if (line.find_first_not_of(" \t\r") == std::string_view::npos) return;
      std::string where = path + ":" + std::to_string(number);
      try {
        records.push_back(parse_record(parse_json_line(line, path, number), where));
      } catch (const Error& error) {  // a bad line is a bad sample: skipped or fatal as bad_samples says
        // "file.jsonl:13:7: invalid JSON: ...": the location (with its column) and the problem.
        const std::string message = error.what();
        const std::size_t split = message.find(": ", where.size());
        if (split == std::string::npos) {
          records.push_back({where, {}, {}, message});
        } else {
          records.push_back({message.substr(0, split), {}, {}, message.substr(split + 2)});
        }
      }
    });
    return records;
  }
  const std::string text = read_file(path);
  json document;
  try {
    document = parse_json(text, path);
  } catch (const Error& error) {
    throw Error(std::string(error.what()) + " (a LLaVA data file is a JSON array, or JSON Lines (.jsonl) where a "
                "bad line is skipped)");
  }
  if (!document.is_array()) throw Error(path + ": expected a JSON array of conversation records");
  for (std::size_t i = 0; i < document.size(); ++i) {
    records.push_back(parse_record(document[i], path + "[" + std::to_string(i) + "]"));
  }
  return records;
}

TrainingSample make_sample(const ConversationRecord& record, const Tokenizer& tokenizer, const SampleFormat& format) {
  auto fail = [&](const std::string& problem) { return SampleError(record.where + ": " + problem); };
  if (!record.problem.empty()) throw fail(record.problem);
  std::vector<Turn> turns = record.turns;
  std::size_t markers = 0;
  for (auto& turn : turns) {
    std::size_t here = count_image_markers(turn.text);
    markers += here;
    if (here == 1) {  // LLaVA's preprocess_multimodal: the image goes first, on its own line
      std::string text = turn.text;
      text.erase(text.find(kImageMarker), std::strlen(kImageMarker));
      turn.text = std::string(kImageMarker) + "\n" + strip(text);
    }
  }
  if (markers != record.images.size()) {
    throw fail("the conversation holds " + std::to_string(markers) + " <image> marker(s) but the record names " +
               std::to_string(record.images.size()) + " image(s)");
  }

  TrainingSample sample;
  sample.where = record.where;
  std::vector<std::int64_t> counts;
  for (const auto& image : record.images) {
    fs::path path(image);
    if (path.is_relative() && !format.image_folder.empty()) path = fs::path(format.image_folder) / path;
    try {
      sample.images.push_back(load_and_preprocess_image(path.string(), format.processor, format.max_image_pixels));
    } catch (const Error& error) {
      throw fail(error.what());
    }
    const at::Tensor& pixels = sample.images.back();
    counts.push_back(format.tokens_for_image(pixels.size(1), pixels.size(2)));
  }
  auto tokenize = [&](const std::string& text) {
    return tokenize_with_images(tokenizer, format.use_im_start_end ? wrap_image_markers(text, tokenizer, "the training tokenizer") : text,
                                format.image_token_id, counts, true);
  };

  // Each answer's tokens are those the rendering up to its end adds to the rendering up to its cue
  // (compared as token prefixes of the whole conversation, so that merges across the boundary count
  // for the answer, as LLaVA's round-by-round lengths do).
  std::vector<std::pair<std::string, std::string>> spans;  // (text up to the cue, text up to the answer's end)
  std::string full;
  if (format.conversation.name == "plain") {
    // LLaVA's preprocess_plain: the image alone, then the caption and the separator; one exchange.
    if (turns.size() != 2) throw fail("the plain template takes one exchange (an image and its caption)");
    if (count_image_markers(turns[1].text) > 0) throw fail("the plain template takes the image in the human turn, not the caption");
    std::string prompt;
    for (std::size_t i = 0; i < record.images.size(); ++i) prompt += kImageMarker;
    full = prompt + turns[1].text + "\n";
    spans.emplace_back(prompt, full);
  } else {
    full = render_conversation(format.conversation, turns, false, format.system);
    for (std::size_t i = 1; i < turns.size(); i += 2) {
      std::vector<Turn> before(turns.begin(), turns.begin() + static_cast<std::ptrdiff_t>(i));
      std::vector<Turn> through(turns.begin(), turns.begin() + static_cast<std::ptrdiff_t>(i + 1));
      spans.emplace_back(render_conversation(format.conversation, before, true, format.system),
                         render_conversation(format.conversation, through, false, format.system));
    }
  }
  sample.input_ids = tokenize(full);
  sample.labels.assign(sample.input_ids.size(), kIgnoreIndex);
  std::size_t labelled = 0;
  for (const auto& [cue, end] : spans) {
    // Position 0 is never a target (nothing precedes it), nor is an image placeholder.
    std::size_t from = std::max<std::size_t>(1, common_prefix(tokenize(cue), sample.input_ids));
    std::size_t to = common_prefix(tokenize(end), sample.input_ids);
    for (std::size_t t = from; t < to; ++t) {
      if (sample.input_ids[t] == format.image_token_id) continue;
      sample.labels[t] = sample.input_ids[t];
      ++labelled;
    }
  }
  if (labelled == 0) throw fail("no assistant tokens to learn from");
  if (static_cast<std::int64_t>(sample.input_ids.size()) > format.max_seq_length) {
    throw fail("too long: " + std::to_string(sample.input_ids.size()) + " tokens (with image tokens), more than " +
               "max_seq_length " + std::to_string(format.max_seq_length));
  }
  return sample;
}

TrainingBatch collate(const std::vector<TrainingSample>& samples, bool pack, std::int64_t pad_id) {
  std::vector<std::vector<TrainingSample>> rows;
  if (pack) {
    rows.push_back(samples);
  } else {
    for (const auto& sample : samples) rows.push_back({sample});
  }
  return collate_rows(rows, pack, pad_id);
}

// ---------------------------------------------------------------------------------------------
// BlendedOrder

BlendedOrder::BlendedOrder(std::vector<std::size_t> sizes, std::vector<double> weights, std::uint64_t seed)
    : sizes_(std::move(sizes)), weights_(std::move(weights)), seed_(seed) {
  if (sizes_.empty() || sizes_.size() != weights_.size()) throw Error("blending needs one weight per data source");
  double total = 0;
  for (std::size_t d = 0; d < sizes_.size(); ++d) {
    if (sizes_[d] == 0) throw Error("data source " + std::to_string(d) + " has no records");
    if (!(weights_[d] > 0)) throw Error("data source " + std::to_string(d) + " has weight <= 0");
    total += weights_[d];
  }
  for (auto& weight : weights_) weight /= total;
  seek(0);
}

void BlendedOrder::seek(std::uint64_t position) {
  position_ = 0;
  taken_.assign(sizes_.size(), 0);
  pass_.assign(sizes_.size(), ~std::uint64_t{0});
  permutation_.assign(sizes_.size(), {});
  while (position_ < position) next();
}

std::pair<std::size_t, std::size_t> BlendedOrder::next() {
  std::size_t source = 0;
  double worst = -1e300;
  for (std::size_t d = 0; d < sizes_.size(); ++d) {
    double lag = weights_[d] * static_cast<double>(position_ + 1) - static_cast<double>(taken_[d]);
    if (lag > worst) {
      worst = lag;
      source = d;
    }
  }
  const std::uint64_t pass = taken_[source] / sizes_[source];
  if (pass != pass_[source]) {  // a new pass over this source: a new shuffle, from (seed, source, pass) alone
    auto& order = permutation_[source];
    order.resize(sizes_[source]);
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::mt19937_64 random(mix(seed_ ^ mix(source * 0x1000003ULL + pass)));
    for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[random() % i]);
    pass_[source] = pass;
  }
  std::size_t record = permutation_[source][taken_[source] % sizes_[source]];
  ++taken_[source];
  ++position_;
  return {source, record};
}

// ---------------------------------------------------------------------------------------------
// TrainingData

struct TrainingData::State {
  std::vector<std::vector<ConversationRecord>> records;
  std::shared_ptr<const Tokenizer> tokenizer;
  SampleFormat format;
  LoaderOptions options;
  std::unique_ptr<BlendedOrder> order;
  std::size_t total = 0;

  // Packing carries the sample that did not fit over to the next row.
  bool has_pending = false;
  TrainingSample pending;
  std::uint64_t pending_position = 0;

  struct Item {
    TrainingBatch batch;
    std::exception_ptr error;
  };
  std::mutex mutex;
  std::condition_variable changed;
  std::deque<Item> queue;
  bool stop = false;
  std::thread worker;

  // The next usable sample and its data position; bad ones are recorded in `skipped` (or thrown).
  std::set<std::pair<std::size_t, std::size_t>> failed;  // records known to be bad
  std::string first_failure;

  TrainingSample next_sample(std::vector<std::string>& skipped, std::uint64_t& position) {
    while (true) {
      position = order->position();
      auto [source, index] = order->next();
      if (position % static_cast<std::uint64_t>(options.shard_count) != static_cast<std::uint64_t>(options.shard_rank)) {
        continue;  // another replica's sample
      }
      try {
        return make_sample(records[source][index], *tokenizer, format);
      } catch (const SampleError& error) {
        if (!options.skip_bad_samples) throw;
        skipped.push_back(error.what());
        if (first_failure.empty()) first_failure = error.what();
        failed.emplace(source, index);
        if (failed.size() == total) {
          throw Error("no usable training sample: every record of the data is bad (first: " + first_failure + ")");
        }
      }
    }
  }

  TrainingBatch produce() {
    std::vector<std::string> skipped;
    std::vector<std::vector<TrainingSample>> rows;
    std::uint64_t position = 0;
    for (std::int64_t r = 0; r < options.micro_batch_size; ++r) {
      std::vector<TrainingSample> row;
      if (!options.pack) {
        row.push_back(next_sample(skipped, position));
      } else {
        std::int64_t length = 0;
        while (true) {
          TrainingSample sample;
          if (has_pending) {
            sample = std::move(pending);
            has_pending = false;
          } else {
            sample = next_sample(skipped, position);
          }
          const auto size = static_cast<std::int64_t>(sample.input_ids.size());
          if (!row.empty() && length + size > format.max_seq_length) {
            pending = std::move(sample);  // only a freshly read sample can fail to fit a started row
            pending_position = position;
            has_pending = true;
            break;
          }
          length += size;
          row.push_back(std::move(sample));
        }
      }
      rows.push_back(std::move(row));
    }
    TrainingBatch batch = collate_rows(rows, options.pack, options.pad_id);
    batch.end_position = has_pending ? pending_position : order->position();
    batch.skipped = std::move(skipped);
    return batch;
  }

  void run() {
    // The loader shares the cores with the training step's OpenMP team, whose parallel regions wait
    // for their slowest thread: one team thread sharing a core with the loader stretched whole ops
    // (measured on 16 threads: a 4-image stack 0.1 -> 32 ms, the patch convolution 2 -> 23 ms). At
    // the lowest priority the loader takes what the team leaves; with batches prefetched it is
    // still ahead of the step.
    ::setpriority(PRIO_PROCESS, static_cast<id_t>(::syscall(SYS_gettid)), 19);
    while (true) {
      Item item;
      try {
        item.batch = produce();
      } catch (...) {
        item.error = std::current_exception();
      }
      std::unique_lock<std::mutex> lock(mutex);
      changed.wait(lock, [&] { return stop || static_cast<std::int64_t>(queue.size()) < options.prefetch; });
      if (stop) return;
      const bool failed = static_cast<bool>(item.error);
      queue.push_back(std::move(item));
      changed.notify_all();
      if (failed) return;
    }
  }
};

TrainingData::TrainingData(const std::vector<DataSource>& sources, std::shared_ptr<const Tokenizer> tokenizer,
                           SampleFormat format, LoaderOptions options, std::uint64_t start_position)
    : state_(std::make_unique<State>()) {
  if (sources.empty()) throw Error("no training data: give model.data.data_path");
  if (options.micro_batch_size < 1) throw Error("micro_batch_size must be at least 1");
  if (options.shard_count < 1 || options.shard_rank < 0 || options.shard_rank >= options.shard_count) {
    throw Error("data shard " + std::to_string(options.shard_rank) + " of " + std::to_string(options.shard_count) +
                ": the rank must be in [0, count)");
  }
  if (!format.tokens_for_image) format.tokens_for_image = [](std::int64_t, std::int64_t) -> std::int64_t { return 0; };
  std::vector<std::size_t> sizes;
  std::vector<double> weights;
  for (const auto& source : sources) {
    state_->records.push_back(read_conversation_file(source.path));
    if (state_->records.back().empty()) throw Error(source.path + ": no records");
    sizes.push_back(state_->records.back().size());
    weights.push_back(source.weight);
    state_->total += sizes.back();
  }
  state_->tokenizer = std::move(tokenizer);
  state_->format = std::move(format);
  state_->options = options;
  state_->order = std::make_unique<BlendedOrder>(sizes, weights, options.seed);
  state_->order->seek(start_position);
  state_->options.prefetch = std::max<std::int64_t>(1, options.prefetch);
  state_->worker = std::thread([state = state_.get()] { state->run(); });
}

TrainingData::~TrainingData() {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->stop = true;
  }
  state_->changed.notify_all();
  if (state_->worker.joinable()) state_->worker.join();
}

std::size_t TrainingData::records() const { return state_->total; }

TrainingBatch TrainingData::next() {
  std::unique_lock<std::mutex> lock(state_->mutex);
  state_->changed.wait(lock, [&] { return !state_->queue.empty(); });
  if (state_->queue.front().error) std::rethrow_exception(state_->queue.front().error);  // stays: later calls see it too
  State::Item item = std::move(state_->queue.front());
  state_->queue.pop_front();
  state_->changed.notify_all();
  return std::move(item.batch);
}

ResumePoint resume_point(const std::vector<std::uint64_t>& end_positions) {
  ResumePoint point;
  if (end_positions.empty()) return point;
  const auto d = static_cast<std::uint64_t>(end_positions.size());
  auto next_own = [d](std::uint64_t end, std::uint64_t r) { return end + (r + d - end % d) % d; };  // >= end, == r mod d
  point.position = next_own(end_positions[0], 0);
  for (std::uint64_t r = 1; r < d; ++r) point.position = std::min(point.position, next_own(end_positions[r], r));
  for (std::uint64_t r = 0; r < d; ++r) {
    // Read by replica r at or beyond the point: p in [position, end) with p == r mod d.
    if (end_positions[r] <= point.position) continue;
    const std::uint64_t first = next_own(point.position, r);
    if (first < end_positions[r]) point.repeated += (end_positions[r] - 1 - first) / d + 1;
  }
  return point;
}

}  // namespace neva
