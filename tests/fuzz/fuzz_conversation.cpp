// The conversation renderer and image-placeholder tokenization: byte 0 picks the template and the
// flags, the rest splits at 0x1E into alternating user/assistant turns (the first may be a system
// prompt at 0x1D).
#include "fuzz_support.h"
#include "neva/data/conversation.h"
#include "neva/error.h"
#include "neva/inference/generation.h"
#include "neva/data/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  static const std::unique_ptr<neva::Tokenizer> tokenizer =
      neva::Tokenizer::load((neva::fuzz::assets() / "tokenizer").string());
  static const std::vector<std::string> names = neva::conversation_template_names();
  const auto conversation = neva::conversation_template(names[data[0] % names.size()]);
  const bool open_assistant = data[0] & 0x80;
  std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  std::string system;
  if (const std::size_t at = text.find('\x1D'); at != std::string::npos) {
    system = text.substr(0, at);
    text = text.substr(at + 1);
  }
  std::vector<neva::Turn> turns;
  std::size_t start = 0;
  while (start <= text.size()) {
    std::size_t end = text.find('\x1E', start);
    if (end == std::string::npos) end = text.size();
    turns.push_back({turns.size() % 2 == 0 ? neva::Turn::Role::User : neva::Turn::Role::Assistant,
                     text.substr(start, end - start)});
    start = end + 1;
  }
  try {
    const std::string prompt = neva::render_conversation(conversation, turns, open_assistant, system);
    neva::assistant_end(conversation);
    const std::size_t markers = neva::count_image_markers(prompt);
    std::vector<std::int64_t> counts(markers, 5);
    neva::tokenize_with_images(*tokenizer, prompt, 32000, counts);
  } catch (const neva::Error&) {
  }
  return 0;
}
