// tokenizer.json: every normalizer, pre-tokenizer, model, post-processor and decoder neva reads, then
// encode and decode of fixed texts and of the first ids.
#include "fuzz_support.h"
#include "neva/error.h"
#include "neva/data/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const auto directory = neva::fuzz::scratch("tokenizer_json");
  neva::fuzz::write(directory / "tokenizer.json", data, size);
  try {
    auto tokenizer = neva::Tokenizer::load(directory.string());
    for (const char* text : {"", "USER: <image>\nWhat is this?  ASSISTANT: a red\tcircle</s>", "Grüße 🙂 这是 1234567"}) {
      const auto ids = tokenizer->encode(text, true);
      tokenizer->decode(ids, false);
      tokenizer->decode(ids, true);
    }
    std::vector<std::int64_t> first;
    for (std::int64_t id = 0; id < std::min<std::int64_t>(tokenizer->vocab_size(), 300); ++id) first.push_back(id);
    tokenizer->decode(first, false);
  } catch (const neva::Error&) {
  }
  return 0;
}
