// tokenizer.model: SentencePiece's model file, read in its own link-map namespace, made into
// LlamaTokenizer's pipeline, then encode and decode.
#include "fuzz_support.h"
#include "neva/error.h"
#include "neva/data/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const auto directory = neva::fuzz::scratch("sentencepiece");
  neva::fuzz::write(directory / "tokenizer.model", data, size);
  try {
    auto tokenizer = neva::Tokenizer::load(directory.string());
    const auto ids = tokenizer->encode("USER: <image>\nWhat is this? ASSISTANT: a red circle</s>", true);
    tokenizer->decode(ids, false);
  } catch (const neva::Error&) {
  }
  return 0;
}
