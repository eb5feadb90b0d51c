// LLaVA training data: a .json array (byte 0 even) or JSON Lines (odd) of records, each made into a
// sample (v1 template, the demo's tokenizer and images, CLIP's preprocessing) as the trainer does.
#include "fuzz_support.h"
#include "neva/data/dataset.h"
#include "neva/error.h"
#include "neva/data/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  static const auto directory = neva::fuzz::scratch("llava_records");
  static const std::shared_ptr<const neva::Tokenizer> tokenizer =
      neva::Tokenizer::load((neva::fuzz::assets() / "tokenizer").string());
  static const neva::SampleFormat format = [] {
    neva::SampleFormat f;
    f.conversation = neva::conversation_template("v1");
    f.image_folder = (neva::fuzz::assets() / "images").string();
    f.max_seq_length = 512;
    f.max_image_pixels = 1 << 20;
    f.image_token_id = tokenizer->token_id("<image>").value_or(0);
    f.tokens_for_image = [](std::int64_t h, std::int64_t w) { return (h / 16) * (w / 16); };
    f.processor.size = f.processor.crop_size = 32;
    return f;
  }();
  const auto path = directory / (data[0] % 2 == 0 ? "data.json" : "data.jsonl");
  neva::fuzz::write(path, data + 1, size - 1);
  try {
    for (const auto& record : neva::read_conversation_file(path.string())) {
      try {
        neva::make_sample(record, *tokenizer, format);
      } catch (const neva::SampleError&) {
      }
    }
  } catch (const neva::Error&) {
  }
  return 0;
}
