#pragma once
// Training data in LLaVA's format: JSON (an array) or JSON Lines files of
//   {"id": ..., "image": "file" | ["file", ...], "conversations": [{"from": "human"|"gpt", "value": "..."}]}
// with "<image>" marking where each image goes, images relative to an image folder.
//
// A sample becomes token ids and labels the way LLaVA's train.py builds them: the conversation is
// rendered with the recipe's template (plain: image then caption, as preprocess_plain; v1, llama_2,
// llama_3, nvgpt: the chat layouts of neva/conversation.h), and only the assistant's answers (with
// their end-of-turn marker) are labelled; everything else is kIgnoreIndex. Several files are blended
// by weight (Megatron's BlendableDataset rule), each shuffled by seed anew on every pass. A
// background thread tokenizes and loads images ahead of the trainer. Bad samples (missing or corrupt
// image, malformed record, no answer, image-marker mismatch, too long) are skipped and reported, or
// stop the run, as the recipe says.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "neva/data/conversation.h"
#include "neva/error.h"
#include "neva/api.h"
#include "neva/data/image.h"
#include "neva/data/labels.h"
#include "neva/data/tokenizer.h"

namespace neva {

// A sample the data cannot be trained on; the message names the file, record and the reason.
class NEVA_API SampleError : public Error {
 public:
  using Error::Error;
  ~SampleError() override;
};

struct ConversationRecord {
  std::string where;  // "file.json[12] (id abc)" / "file.jsonl:13", for messages
  std::vector<std::string> images;
  std::vector<Turn> turns;
  std::string problem;  // not empty: the record is unusable (malformed), and why
};

// All records of one .json (array) or .jsonl file. A file that cannot be read, or a .json file that
// is not valid JSON, throws Error naming it; a malformed record (or a bad line of a .jsonl file) is
// returned with `problem` set.
NEVA_API std::vector<ConversationRecord> read_conversation_file(const std::string& path);

// How records become samples.
struct SampleFormat {
  ConversationTemplate conversation = conversation_template("plain");
  std::string system;                 // overrides the template's system prompt when not empty
  bool use_im_start_end = false;      // wrap image tokens in <im_start> ... <im_end>
  std::string image_folder;           // relative image paths resolve here
  ImageProcessorConfig processor;     // the vision encoder's preprocessing
  std::int64_t max_image_pixels = kDefaultMaxImagePixels;
  std::int64_t max_seq_length = 2048;
  std::int64_t image_token_id = -1;
  // Tokens an image of the given preprocessed height and width becomes (LlavaModel::tokens_for_image).
  std::function<std::int64_t(std::int64_t, std::int64_t)> tokens_for_image;
};

struct TrainingSample {
  std::string where;
  std::vector<std::int64_t> input_ids;  // image placeholders expanded to the encoder's token count
  std::vector<std::int64_t> labels;     // same length; kIgnoreIndex except the assistant's tokens
  std::vector<at::Tensor> images;       // preprocessed [3, H, W], in placeholder order
};

// Throws SampleError when the record cannot be trained on.
NEVA_API TrainingSample make_sample(const ConversationRecord& record, const Tokenizer& tokenizer,
                                    const SampleFormat& format);

// One micro-batch: right-padded rows; with packing, each row holds several samples whose attention
// stays inside each (segment_ids) and whose positions restart at 0.
struct TrainingBatch {
  at::Tensor input_ids;       // [B, S] int64
  at::Tensor labels;          // [B, S] int64
  at::Tensor attention_mask;  // [B, S] int64, 1 = real token
  at::Tensor positions;       // [B, S] int64
  at::Tensor segment_ids;     // [B, S] int64 when packed (padding: -1), else undefined
  std::vector<at::Tensor> images;
  std::int64_t samples = 0;
  std::int64_t tokens = 0;           // real tokens
  std::int64_t labelled_tokens = 0;  // tokens that count in the loss (after the shift)
  std::uint64_t end_position = 0;    // data position after this batch (resume from here)
  std::vector<std::string> skipped;  // bad samples passed over while making it
};

// Lays samples out as one micro-batch: `pack` = all of them in one row, else one row each.
NEVA_API TrainingBatch collate(const std::vector<TrainingSample>& samples, bool pack, std::int64_t pad_id);

struct DataSource {
  std::string path;
  double weight = 1.0;
};

struct LoaderOptions {
  std::int64_t micro_batch_size = 1;
  bool pack = false;              // pack samples into rows of max_seq_length tokens
  std::uint64_t seed = 1234;
  bool skip_bad_samples = true;   // false: the first bad sample stops the run
  std::int64_t prefetch = 4;      // micro-batches prepared ahead
  std::int64_t pad_id = 0;
  // Data parallelism: of the blended stream, this loader reads the positions p with
  // p % shard_count == shard_rank (its data-parallel rank and size), so replicas never share a
  // sample, and a skipped bad sample is replaced from the same shard. Positions (start_position,
  // TrainingBatch::end_position) stay in the stream's coordinates.
  std::int64_t shard_rank = 0;
  std::int64_t shard_count = 1;
};

// Resuming under another data-parallel size: from the end positions of the replicas that saved
// (replica r of d read the positions p < end[r] with p % d == r), the first position some replica
// has not read — where every new replica starts, reading its own share of the stream — and how many
// samples at or beyond it a replica had read already (read again; none when the replicas were
// aligned, as they are without skipped samples or packing).
struct ResumePoint {
  std::uint64_t position = 0;
  std::uint64_t repeated = 0;
};
NEVA_API ResumePoint resume_point(const std::vector<std::uint64_t>& end_positions);

// Which record comes at each data position: Megatron's blending (at each position, the source whose
// share so far lags its weight the most) and a fresh seeded shuffle of each source on every pass.
// Positions are unbounded (the data repeats); the same seed gives the same order everywhere.
class NEVA_API BlendedOrder {
 public:
  BlendedOrder(std::vector<std::size_t> sizes, std::vector<double> weights, std::uint64_t seed);
  // (source, record) at `position`; positions must be visited in increasing order.
  std::pair<std::size_t, std::size_t> next();
  std::uint64_t position() const { return position_; }
  void seek(std::uint64_t position);  // replays the blend up to `position`

 private:
  std::vector<std::size_t> sizes_;
  std::vector<double> weights_;
  std::uint64_t seed_;
  std::uint64_t position_ = 0;
  std::vector<std::uint64_t> taken_;                  // records taken from each source
  std::vector<std::vector<std::size_t>> permutation_;  // each source's order for its current pass
  std::vector<std::uint64_t> pass_;
};

// Micro-batches from blended LLaVA files, prepared by a background thread.
class NEVA_API TrainingData {
 public:
  TrainingData(const std::vector<DataSource>& sources, std::shared_ptr<const Tokenizer> tokenizer, SampleFormat format,
               LoaderOptions options, std::uint64_t start_position = 0);
  ~TrainingData();
  TrainingData(const TrainingData&) = delete;
  TrainingData& operator=(const TrainingData&) = delete;

  // The next micro-batch (waits only when the prefetch thread is behind). Throws SampleError on a
  // bad sample when bad samples are fatal, and Error when no usable sample is left.
  TrainingBatch next();
  std::size_t records() const;  // over all sources: one pass over the data

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace neva
