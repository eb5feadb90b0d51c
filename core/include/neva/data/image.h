#pragma once
// Images for vision encoders: JPEG and PNG decoding (libjpeg-turbo, libpng) with a pixel budget
// checked from the header before any pixel is decoded, and the preprocessing of transformers' PIL
// image processors: Pillow's bicubic resampling (same fixed-point arithmetic, so uint8-identical),
// centre crop, LLaVA's pad-to-square, rescale and normalize.
#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "neva/api.h"

namespace neva {

struct Image {
  int width = 0;
  int height = 0;
  std::vector<std::uint8_t> rgb;  // height * width * 3, row-major
};

// 8192 x 8192: far above any encoder's input, far below what exhausts memory.
inline constexpr std::int64_t kDefaultMaxImagePixels = 8192LL * 8192LL;

// Decodes a JPEG or PNG file to RGB (grey, palette, alpha and 16-bit inputs are converted as PIL's
// convert("RGB") does). Throws neva::Error naming the file: unreadable, not JPEG/PNG, corrupt, or
// over `max_pixels` (checked before decoding).
NEVA_API Image load_image(const std::string& path, std::int64_t max_pixels = kDefaultMaxImagePixels);
NEVA_API Image decode_image(const std::string& bytes, const std::string& name,
                            std::int64_t max_pixels = kDefaultMaxImagePixels);

// PNG bytes of `image` (8-bit RGB, libpng).
NEVA_API std::string encode_png(const Image& image);

// Pillow's Image.resize(size, BICUBIC) on 8-bit RGB.
NEVA_API Image resize_bicubic(const Image& image, int width, int height);
// transformers' center_crop: top = (h - ch) / 2, left = (w - cw) / 2; zero padding where smaller.
NEVA_API Image center_crop(const Image& image, int width, int height);
// LLaVA's expand2square: a max(w, h) square of `background`, the image pasted centred.
NEVA_API Image expand_to_square(const Image& image, std::array<std::uint8_t, 3> background);

struct ImageProcessorConfig {
  enum class Resize { ShortestEdge, Exact };
  Resize resize = Resize::ShortestEdge;  // CLIP: shortest edge then centre crop; SigLIP: exact size
  int size = 224;                        // shortest edge, or the exact square side
  int crop_size = 224;                   // centre crop side (ShortestEdge only)
  std::array<float, 3> mean{0.48145466f, 0.4578275f, 0.40821073f};  // OpenAI CLIP
  std::array<float, 3> std{0.26862954f, 0.26130258f, 0.27577711f};
  // LLaVA's image_aspect_ratio: "pad" squares the image first (background = mean * 255), "square"
  // hands it to the processor as it is, "keep" (NeMo) keeps the aspect ratio: shortest edge
  // int(min(448 / (long / short), 224)), no crop.
  std::string aspect_ratio = "square";
};

// An encoder's processor with LLaVA's image_aspect_ratio applied, checked once up front: an
// unknown ratio, or "keep" with a fixed-size processor (SigLIP), throws naming `key`.
NEVA_API ImageProcessorConfig with_aspect_ratio(ImageProcessorConfig processor, const std::string& aspect_ratio,
                                                const std::string& key = "model.data.image_aspect_ratio");

// Longer side / shorter side beyond which an image is refused before preprocessing: Qwen2-VL's image
// processor refuses 200 too. Such strips would be resized into huge intermediates (a 1x20000 image
// becomes 336x6720000 under CLIP's shortest-edge resize) to show the encoder a few grey pixels.
inline constexpr double kMaxImageAspectRatio = 200.0;

// The processor's pixel_values for one image: [3, H, W] float32. Every intermediate image (the
// padded square, each resize) is held to `max_pixels` like the decoded input, and the aspect ratio to
// kMaxImageAspectRatio; either is an Error naming the sizes (the caller prefixes the file).
NEVA_API at::Tensor preprocess_image(const Image& image, const ImageProcessorConfig& config,
                                     std::int64_t max_pixels = kDefaultMaxImagePixels);
// load_image + preprocess_image, every error naming `path`.
NEVA_API at::Tensor load_and_preprocess_image(const std::string& path, const ImageProcessorConfig& config,
                                              std::int64_t max_pixels = kDefaultMaxImagePixels);

}  // namespace neva
