#include "neva/data/image_tokens.h"

#include <algorithm>

#include "neva/error.h"

namespace neva {

std::size_t count_image_markers(const std::string& text) {
  const std::string marker = kImageMarker;
  std::size_t count = 0;
  for (std::size_t at = text.find(marker); at != std::string::npos; at = text.find(marker, at + marker.size())) ++count;
  return count;
}

std::string wrap_image_markers(const std::string& text, const Tokenizer& tokenizer, const std::string& tokenizer_source) {
  for (const char* token : {"<im_start>", "<im_end>"}) {
    if (!tokenizer.token_id(token)) {
      throw Error("model.mm_cfg.use_im_start_end is set, but the tokenizer (" + tokenizer_source + ") has no " + token +
                  " token");
    }
  }
  const std::string marker = kImageMarker;
  std::string wrapped;
  std::size_t cursor = 0;
  for (std::size_t at = text.find(marker); at != std::string::npos; at = text.find(marker, cursor)) {
    wrapped += text.substr(cursor, at - cursor) + "<im_start>" + marker + "<im_end>";
    cursor = at + marker.size();
  }
  return wrapped + text.substr(cursor);
}

std::vector<std::int64_t> tokenize_with_images(const Tokenizer& tokenizer, const std::string& text,
                                               std::int64_t image_token_id,
                                               const std::vector<std::int64_t>& tokens_per_image,
                                               bool add_special_tokens) {
  const std::string marker = "<image>";
  std::size_t image = 0;
  auto next_count = [&]() {
    std::int64_t count = tokens_per_image.empty() ? 0 : tokens_per_image[std::min(image, tokens_per_image.size() - 1)];
    ++image;
    return count;
  };
  auto marker_id = tokenizer.token_id(marker);
  if (marker_id && *marker_id == image_token_id) {
    std::string expanded;
    std::size_t cursor = 0;
    for (std::size_t at = text.find(marker); at != std::string::npos; at = text.find(marker, cursor)) {
      expanded += text.substr(cursor, at - cursor);
      for (std::int64_t i = 0, n = next_count(); i < n; ++i) expanded += marker;
      cursor = at + marker.size();
    }
    expanded += text.substr(cursor);
    return tokenizer.encode(expanded, add_special_tokens);
  }
  std::vector<std::int64_t> ids;
  std::size_t cursor = 0;
  bool first = true;
  while (true) {
    std::size_t at = text.find(marker, cursor);
    std::string chunk = text.substr(cursor, at == std::string::npos ? std::string::npos : at - cursor);
    if (!chunk.empty() || first) {
      auto piece = tokenizer.encode(chunk, first && add_special_tokens);
      ids.insert(ids.end(), piece.begin(), piece.end());
    }
    first = false;
    if (at == std::string::npos) break;
    ids.insert(ids.end(), next_count(), image_token_id);
    cursor = at + marker.size();
  }
  return ids;
}

}  // namespace neva
