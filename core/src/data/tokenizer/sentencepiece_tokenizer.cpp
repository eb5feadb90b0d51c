// A tokenizer.model, read the way transformers 5's LlamaTokenizer reads one without tokenizer.json:
// the SentencePiece BPE model's pieces become the vocabulary, its merges are derived from the pieces
// (generate_merges) and its control and unknown pieces are special added tokens. tokenizer.cpp adds
// LlamaTokenizer's pipeline, tokenizer_config.json's tokens and the BOS/EOS template.
// SentencePiece's own normalisation rules and its user-defined symbols are not used, as in
// transformers; the C++ API of SentencePiece 0.1.97 has no piece-type query for user-defined symbols,
// so a model that needs them must list them in tokenizer_config.json's added_tokens_decoder (which
// transformers writes since 4.34). Llama-family models have none.
#include <dlfcn.h>

#include <filesystem>
#include <mutex>
#include <unordered_map>
#include <nlohmann/json.hpp>

#include "neva/error.h"
#include "neva/io/json.h"
#include "tokenizer_internal.h"

namespace neva {

namespace {

using nlohmann::json;

// transformers' generate_merges without scores: for each piece in id order, every split into two
// pieces of the vocabulary is a merge, the piece's id its rank, shorter left halves first.
json merges_of(const std::vector<std::string>& pieces, const std::unordered_map<std::string, int>& ids) {
  json merges = json::array();
  for (const std::string& piece : pieces) {
    for (std::size_t at = 1; at < piece.size(); ++at) {
      if ((static_cast<unsigned char>(piece[at]) & 0xC0) == 0x80) continue;  // inside a UTF-8 character
      std::string left = piece.substr(0, at), right = piece.substr(at);
      if (ids.count(left) && ids.count(right)) merges.push_back(json::array({left, right}));
    }
  }
  return merges;
}

// libneva_sentencepiece (sentencepiece_reader.cpp, beside libneva_core), loaded once per process into
// a link-map namespace of its own, where libsentencepiece cannot interpose on LibTorch's symbols.
struct SentencePieceReader {
  using Read = char* (*)(const char*);
  using Free = void (*)(char*);
  Read read = nullptr;
  Free free = nullptr;
  std::string failure;

  SentencePieceReader() {
    Dl_info self{};
    if (::dladdr(reinterpret_cast<void*>(&sentencepiece_description), &self) == 0 || !self.dli_fname) {
      failure = "cannot locate libneva_core";
      return;
    }
    const std::string library =
        (std::filesystem::path(self.dli_fname).parent_path() / "libneva_sentencepiece.so").string();
    void* handle = ::dlmopen(LM_ID_NEWLM, library.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
      failure = std::string("cannot load ") + library + ": " + ::dlerror();
      return;
    }
    read = reinterpret_cast<Read>(::dlsym(handle, "neva_sentencepiece_read"));
    free = reinterpret_cast<Free>(::dlsym(handle, "neva_sentencepiece_free"));
    if (!read || !free) failure = library + " does not export neva_sentencepiece_read/free";
  }
};

json read_sentencepiece(const std::string& path) {
  check_regular_file(path);  // SentencePiece opens the file itself: a FIFO or /dev/zero must not reach it
  // Kept for the life of the process: link-map namespaces are few (glibc has 16), so one is opened once.
  static const SentencePieceReader reader;
  if (!reader.failure.empty()) throw Error(path + ": cannot read SentencePiece models: " + reader.failure);
  char* text = reader.read(path.c_str());
  if (!text) throw Error(path + ": out of memory while reading the SentencePiece model");
  std::string copy(text);
  reader.free(text);
  json model = parse_json(copy, path + " (as read by SentencePiece)");
  if (model.contains("error")) throw Error(path + ": " + model.at("error").get<std::string>());
  return model;
}

}  // namespace

SentencePieceDescription sentencepiece_description(const std::string& path) {
  const json model = read_sentencepiece(path);
  if (model.at("unigram").get<bool>()) {
    throw Error(path + ": a Unigram SentencePiece model; neva reads tokenizer.model as transformers' LlamaTokenizer "
                "does (BPE): provide the tokenizer.json transformers saves for this tokenizer");
  }
  std::vector<std::string> pieces = model.at("pieces").get<std::vector<std::string>>();
  std::unordered_map<std::string, int> ids;
  json vocab = json::object(), added = json::array();
  for (int id = 0; id < static_cast<int>(pieces.size()); ++id) {
    ids.emplace(pieces[id], id);
    vocab[pieces[id]] = id;
  }
  for (const json& id : model.at("special")) {
    added.push_back(make_added_token(id.get<int>(), pieces[id.get<int>()], true, false, false));
  }
  auto piece_or_none = [&](const json& id) {
    const int value = id.get<int>();
    return value >= 0 && value < static_cast<int>(pieces.size()) ? pieces[value] : std::string();
  };
  return {{{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges_of(pieces, ids)}}}, {"added_tokens", added}},
          piece_or_none(model.at("bos")),
          piece_or_none(model.at("eos"))};
}

}  // namespace neva
