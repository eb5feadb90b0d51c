// libneva_sentencepiece: reads a SentencePiece model with Debian's libsentencepiece and hands back
// what neva needs of it, as JSON text, through a C interface.
//
// It is loaded with dlmopen into a link-map namespace of its own (sentencepiece_tokenizer.cpp), never
// linked into a process that holds LibTorch: libsentencepiece and libc10 both export a global
// FLAGS_minloglevel, and in one namespace the dynamic linker binds libsentencepiece's reference to
// libc10's 4-byte int, over which SentencePiece then constructs its 32-byte absl flag. That overwrote
// c10's FLAGS_caffe2_use_fatal_for_enforce beside it, so every failed TORCH_CHECK (a failed
// allocation among them) became LOG(FATAL) and abort() instead of an exception.
//
// This library must not link LibTorch or libneva_core, and is built without sanitizers (the
// namespace has no sanitizer runtime).
#include <sentencepiece_processor.h>

#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>

namespace {

char* copy_out(const std::string& text) {
  char* out = static_cast<char*>(std::malloc(text.size() + 1));
  if (out) std::memcpy(out, text.c_str(), text.size() + 1);
  return out;
}

std::string read(const char* path) {
  using nlohmann::json;
  sentencepiece::SentencePieceProcessor processor;
  auto status = processor.Load(path);
  if (!status.ok()) return json{{"error", "cannot load SentencePiece model: " + status.ToString()}}.dump();
  std::vector<std::vector<int>> nbest;
  json out = json::object();
  out["unigram"] = processor.NBestEncode("a", 1, &nbest).ok();  // only Unigram models have n-best segmentations
  json pieces = json::array(), special = json::array();
  for (int id = 0; id < processor.GetPieceSize(); ++id) {
    pieces.push_back(processor.IdToPiece(id));
    if (processor.IsControl(id) || processor.IsUnknown(id)) special.push_back(id);
  }
  out["pieces"] = std::move(pieces);
  out["special"] = std::move(special);
  out["bos"] = processor.bos_id();
  out["eos"] = processor.eos_id();
  try {
    return out.dump();
  } catch (const json::exception&) {
    return json{{"error", "a piece is not valid UTF-8"}}.dump();
  }
}

}  // namespace

// A JSON object: {"pieces": [...], "special": [ids], "bos": id, "eos": id, "unigram": bool}, or
// {"error": "..."}. Free it with neva_sentencepiece_free. Null only when memory ran out.
extern "C" __attribute__((visibility("default"))) char* neva_sentencepiece_read(const char* path) {
  try {
    return copy_out(read(path));
  } catch (const std::exception& error) {
    return copy_out(nlohmann::json{{"error", std::string("SentencePiece failed: ") + error.what()}}.dump());
  } catch (...) {
    return copy_out("{\"error\": \"SentencePiece failed\"}");
  }
}

extern "C" __attribute__((visibility("default"))) void neva_sentencepiece_free(char* text) { std::free(text); }
