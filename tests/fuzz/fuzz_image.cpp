// PNG and JPEG decoding (libpng, libjpeg-turbo) under a pixel budget, then every preprocessing path:
// CLIP's shortest edge + crop with image_aspect_ratio square, pad and keep, and SigLIP's exact resize.
#include "fuzz_support.h"
#include "neva/error.h"
#include "neva/data/image.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  constexpr std::int64_t kBudget = 1 << 20;  // libjpeg-turbo's own fuzzers stop at 1,048,576 pixels
  try {
    const neva::Image image = neva::decode_image(std::string(reinterpret_cast<const char*>(data), size), "fuzz", kBudget);
    neva::ImageProcessorConfig clip;
    clip.size = clip.crop_size = 64;
    for (const char* ratio : {"square", "pad", "keep"}) {
      clip.aspect_ratio = ratio;
      try {
        neva::preprocess_image(image, clip, kBudget);
      } catch (const neva::Error&) {
      }
    }
    neva::ImageProcessorConfig siglip;
    siglip.resize = neva::ImageProcessorConfig::Resize::Exact;
    siglip.size = 48;
    neva::preprocess_image(image, siglip, kBudget);
  } catch (const neva::Error&) {
  }
  return 0;
}
