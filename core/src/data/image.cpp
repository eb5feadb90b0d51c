#include "neva/data/image.h"

#include <ATen/ops/empty.h>
#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "neva/error.h"
#include "neva/io/json.h"

namespace neva {

namespace {

// "" when a width x height image fits the budget, else why not: checked from the header, before decoding.
std::string over_budget(std::int64_t width, std::int64_t height, std::int64_t max_pixels) {
  if (width <= max_pixels && height <= max_pixels && width * height <= max_pixels) return {};
  return "image of " + std::to_string(width) + "x" + std::to_string(height) + " pixels exceeds the budget of " +
         std::to_string(max_pixels) + " pixels";
}

// ------------------------------------------------------------------ JPEG (libjpeg-turbo)

struct JpegError {
  jpeg_error_mgr manager;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

// libjpeg-turbo's fuzzers stop progressive images here: each scan rereads the whole image, so a file
// of many tiny scans costs minutes of decoding (TJPARAM_SCANLIMIT).
constexpr int kMaxJpegScans = 500;

void jpeg_fail(j_common_ptr info) {
  auto* error = reinterpret_cast<JpegError*>(info->err);
  (*info->err->format_message)(info, error->message);
  std::longjmp(error->jump, 1);
}

// libjpeg reports lost image data as warnings and goes on, filling what is missing with grey: a
// truncated file ("Premature end of JPEG file"), a cut entropy segment, a corrupt Huffman code, a
// resynchronisation. Pillow refuses such files ("image file is truncated"); so does neva. Harmless
// warnings (extraneous bytes before a marker, an unusual progression) pass, as in Pillow.
void jpeg_warning(j_common_ptr info, int level) {
  if (level >= 0) return;  // trace messages
  const int code = info->err->msg_code;
  if (code == JWRN_JPEG_EOF || code == JWRN_HIT_MARKER || code == JWRN_HUFF_BAD_CODE || code == JWRN_ARITH_BAD_CODE ||
      code == JWRN_MUST_RESYNC || code == JWRN_NOT_SEQUENTIAL) {
    jpeg_fail(info);
  }
}

void jpeg_scan_limit(j_common_ptr info) {
  auto* decompress = reinterpret_cast<j_decompress_ptr>(info);
  if (decompress->input_scan_number > kMaxJpegScans) {
    auto* error = reinterpret_cast<JpegError*>(info->err);
    std::snprintf(error->message, sizeof error->message, "more than %d progressive scans (a denial-of-service pattern)",
                  kMaxJpegScans);
    std::longjmp(error->jump, 1);
  }
}

Image decode_jpeg(const std::string& bytes, const std::string& name, std::int64_t max_pixels) {
  jpeg_decompress_struct info{};
  JpegError error{};
  info.err = jpeg_std_error(&error.manager);
  error.manager.error_exit = jpeg_fail;
  error.manager.emit_message = jpeg_warning;
  error.manager.output_message = [](j_common_ptr) {};
  jpeg_progress_mgr progress{};
  progress.progress_monitor = jpeg_scan_limit;
  Image image;
  std::string failure;
  if (setjmp(error.jump)) {
    jpeg_destroy_decompress(&info);
    throw Error(name + ": corrupt JPEG: " + error.message);
  }
  jpeg_create_decompress(&info);
  info.progress = &progress;
  jpeg_mem_src(&info, reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
  jpeg_read_header(&info, TRUE);
  if (info.jpeg_color_space == JCS_CMYK || info.jpeg_color_space == JCS_YCCK) failure = "CMYK JPEGs are not supported";
  if (failure.empty()) failure = over_budget(info.image_width, info.image_height, max_pixels);
  if (!failure.empty()) {
    jpeg_destroy_decompress(&info);
    throw Error(name + ": " + failure);
  }
  info.out_color_space = JCS_RGB;  // libjpeg's own YCbCr/grey -> RGB, as Pillow gets it
  jpeg_start_decompress(&info);
  image.width = static_cast<int>(info.output_width);
  image.height = static_cast<int>(info.output_height);
  image.rgb.resize(static_cast<std::size_t>(image.width) * image.height * 3);
  while (info.output_scanline < info.output_height) {
    JSAMPROW row = image.rgb.data() + static_cast<std::size_t>(info.output_scanline) * image.width * 3;
    jpeg_read_scanlines(&info, &row, 1);
  }
  jpeg_finish_decompress(&info);
  jpeg_destroy_decompress(&info);
  return image;
}

// ------------------------------------------------------------------ PNG (libpng)

struct PngSource {
  const std::string* bytes;
  std::size_t offset;
};

Image decode_png(const std::string& bytes, const std::string& name, std::int64_t max_pixels) {
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!info) {
    png_destroy_read_struct(&png, nullptr, nullptr);
    throw Error(name + ": cannot start the PNG decoder");
  }
  static thread_local std::string message;
  message.clear();
  png_set_error_fn(png, nullptr,
                   [](png_structp p, png_const_charp text) {
                     message = text;
                     png_longjmp(p, 1);
                   },
                   [](png_structp, png_const_charp) {});
  PngSource source{&bytes, 0};
  png_set_read_fn(png, &source, [](png_structp p, png_bytep out, png_size_t length) {
    auto* src = static_cast<PngSource*>(png_get_io_ptr(p));
    if (src->offset + length > src->bytes->size()) png_error(p, "unexpected end of file");
    std::memcpy(out, src->bytes->data() + src->offset, length);
    src->offset += length;
  });
  // libpng's own limits: 1,000,000 x 1,000,000 and 8 MB chunks stay as Debian builds them.
  Image image;
  std::vector<png_bytep> rows;
  std::string failure;
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw Error(name + ": " + (failure.empty() ? "corrupt PNG: " + message : failure));
  }
  png_read_info(png, info);
  png_uint_32 width = png_get_image_width(png, info), height = png_get_image_height(png, info);
  failure = over_budget(width, height, max_pixels);
  if (!failure.empty()) png_longjmp(png, 1);
  // To 8-bit RGB as Pillow's convert("RGB"): palettes and low-bit grey expand, 16-bit keeps its
  // high byte, alpha is dropped (not composited), grey is replicated. No gamma handling.
  png_set_expand(png);
  png_set_strip_16(png);
  png_set_strip_alpha(png);
  png_set_gray_to_rgb(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  image.width = static_cast<int>(width);
  image.height = static_cast<int>(height);
  image.rgb.resize(static_cast<std::size_t>(width) * height * 3);
  rows.resize(height);
  for (png_uint_32 y = 0; y < height; ++y) rows[y] = image.rgb.data() + static_cast<std::size_t>(y) * width * 3;
  png_read_image(png, rows.data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  return image;
}

// ------------------------------------------------------------------ Pillow's bicubic resampling

constexpr int kPrecisionBits = 32 - 8 - 2;

double bicubic(double x) {
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

struct Coefficients {
  int size = 0;                  // taps per output sample
  std::vector<int> bounds;       // per output: first input, count
  std::vector<std::int32_t> k;  // fixed point, out * size
};

// Pillow's precompute_coeffs + normalize_coeffs_8bpc (Resample.c), box = [0, in_size].
Coefficients coefficients(int in_size, int out_size) {
  constexpr double support_unit = 2.0;  // bicubic
  double scale = static_cast<double>(in_size) / out_size;
  double filterscale = std::max(scale, 1.0);
  double support = support_unit * filterscale;
  Coefficients c;
  c.size = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(out_size * 2);
  c.k.assign(static_cast<std::size_t>(out_size) * c.size, 0);
  std::vector<double> weights(c.size);
  for (int xx = 0; xx < out_size; ++xx) {
    double center = (xx + 0.5) * scale;
    double total = 0.0, ss = 1.0 / filterscale;
    int xmin = std::max(static_cast<int>(center - support + 0.5), 0);
    int xmax = std::min(static_cast<int>(center + support + 0.5), in_size) - xmin;
    for (int x = 0; x < xmax; ++x) {
      weights[x] = bicubic((x + xmin - center + 0.5) * ss);
      total += weights[x];
    }
    for (int x = 0; x < xmax; ++x) {
      double w = total != 0.0 ? weights[x] / total : weights[x];
      c.k[static_cast<std::size_t>(xx) * c.size + x] =
          static_cast<std::int32_t>(w < 0 ? -0.5 + w * (1 << kPrecisionBits) : 0.5 + w * (1 << kPrecisionBits));
    }
    c.bounds[xx * 2] = xmin;
    c.bounds[xx * 2 + 1] = xmax;
  }
  return c;
}

std::uint8_t clip8(std::int64_t value) {
  if (value >= (static_cast<std::int64_t>(1) << kPrecisionBits << 8)) return 255;
  if (value <= 0) return 0;
  return static_cast<std::uint8_t>(value >> kPrecisionBits);
}

}  // namespace

Image decode_image(const std::string& bytes, const std::string& name, std::int64_t max_pixels) {
  static const unsigned char png_signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  if (bytes.size() >= 3 && static_cast<unsigned char>(bytes[0]) == 0xFF && static_cast<unsigned char>(bytes[1]) == 0xD8 &&
      static_cast<unsigned char>(bytes[2]) == 0xFF) {
    return decode_jpeg(bytes, name, max_pixels);
  }
  if (bytes.size() >= 8 && std::memcmp(bytes.data(), png_signature, 8) == 0) return decode_png(bytes, name, max_pixels);
  throw Error(name + ": not a JPEG or PNG image");
}

Image load_image(const std::string& path, std::int64_t max_pixels) {
  return decode_image(read_file(path, "image"), path, max_pixels);
}

Image resize_bicubic(const Image& image, int width, int height) {
  if (width == image.width && height == image.height) return image;  // Pillow returns a copy
  if (width <= 0 || height <= 0) {
    throw Error("resize: target size " + std::to_string(width) + "x" + std::to_string(height) + " has no pixels");
  }
  Coefficients horizontal = coefficients(image.width, width);
  Coefficients vertical = coefficients(image.height, height);
  // Horizontal pass over only the rows the vertical pass reads (Pillow's ybox_first/ybox_last).
  int first_row = vertical.bounds[0];
  int last_row = vertical.bounds[(height - 1) * 2] + vertical.bounds[(height - 1) * 2 + 1];
  Image temporary;
  const Image* source = &image;
  if (width != image.width) {
    temporary.width = width;
    temporary.height = last_row - first_row;
    temporary.rgb.resize(static_cast<std::size_t>(temporary.width) * temporary.height * 3);
    for (int y = 0; y < temporary.height; ++y) {
      const std::uint8_t* in_row = image.rgb.data() + static_cast<std::size_t>(y + first_row) * image.width * 3;
      std::uint8_t* out_row = temporary.rgb.data() + static_cast<std::size_t>(y) * width * 3;
      for (int x = 0; x < width; ++x) {
        int xmin = horizontal.bounds[x * 2], count = horizontal.bounds[x * 2 + 1];
        const std::int32_t* k = &horizontal.k[static_cast<std::size_t>(x) * horizontal.size];
        for (int channel = 0; channel < 3; ++channel) {
          std::int64_t sum = 1 << (kPrecisionBits - 1);
          for (int i = 0; i < count; ++i) sum += static_cast<std::int64_t>(in_row[(xmin + i) * 3 + channel]) * k[i];
          out_row[x * 3 + channel] = clip8(sum);
        }
      }
    }
    source = &temporary;
    for (int y = 0; y < height; ++y) vertical.bounds[y * 2] -= first_row;
  }
  if (height == image.height) return temporary;  // only the width changed: the horizontal pass covered every row
  Image out;
  out.width = width;
  out.height = height;
  out.rgb.resize(static_cast<std::size_t>(width) * height * 3);
  for (int y = 0; y < height; ++y) {
    int ymin = vertical.bounds[y * 2], count = vertical.bounds[y * 2 + 1];
    const std::int32_t* k = &vertical.k[static_cast<std::size_t>(y) * vertical.size];
    for (int x = 0; x < width; ++x) {
      for (int channel = 0; channel < 3; ++channel) {
        std::int64_t sum = 1 << (kPrecisionBits - 1);
        for (int i = 0; i < count; ++i) {
          sum += static_cast<std::int64_t>(source->rgb[(static_cast<std::size_t>(ymin + i) * width + x) * 3 + channel]) * k[i];
        }
        out.rgb[(static_cast<std::size_t>(y) * width + x) * 3 + channel] = clip8(sum);
      }
    }
  }
  return out;
}

Image center_crop(const Image& image, int width, int height) {
  // transformers' center_crop: the window starts at floor((orig - crop) / 2); where the image is
  // smaller than the crop, the missing pixels are zeros.
  auto floor_half = [](int a) { return a >= 0 ? a / 2 : -((-a + 1) / 2); };
  int left = floor_half(image.width - width), top = floor_half(image.height - height);
  Image out;
  out.width = width;
  out.height = height;
  out.rgb.assign(static_cast<std::size_t>(width) * height * 3, 0);
  for (int y = 0; y < height; ++y) {
    int sy = y + top;
    if (sy < 0 || sy >= image.height) continue;
    for (int x = 0; x < width; ++x) {
      int sx = x + left;
      if (sx < 0 || sx >= image.width) continue;
      std::memcpy(&out.rgb[(static_cast<std::size_t>(y) * width + x) * 3],
                  &image.rgb[(static_cast<std::size_t>(sy) * image.width + sx) * 3], 3);
    }
  }
  return out;
}

Image expand_to_square(const Image& image, std::array<std::uint8_t, 3> background) {
  if (image.width == image.height) return image;
  int side = std::max(image.width, image.height);
  Image out;
  out.width = out.height = side;
  out.rgb.resize(static_cast<std::size_t>(side) * side * 3);
  for (std::size_t i = 0; i < out.rgb.size(); i += 3) std::memcpy(&out.rgb[i], background.data(), 3);
  int left = (side - image.width) / 2, top = (side - image.height) / 2;
  for (int y = 0; y < image.height; ++y) {
    std::memcpy(&out.rgb[(static_cast<std::size_t>(y + top) * side + left) * 3],
                &image.rgb[static_cast<std::size_t>(y) * image.width * 3], static_cast<std::size_t>(image.width) * 3);
  }
  return out;
}

ImageProcessorConfig with_aspect_ratio(ImageProcessorConfig processor, const std::string& aspect_ratio,
                                       const std::string& key) {
  if (aspect_ratio != "square" && aspect_ratio != "pad" && aspect_ratio != "keep") {
    throw Error(key + ": '" + aspect_ratio + "' is not supported (supported: pad, square, keep)");
  }
  if (aspect_ratio == "keep" && processor.resize == ImageProcessorConfig::Resize::Exact) {
    throw Error(key + ": 'keep' needs a shortest-edge processor (CLIP), not a fixed-size one (SigLIP, " +
                std::to_string(processor.size) + "x" + std::to_string(processor.size) + ")");
  }
  processor.aspect_ratio = aspect_ratio;
  return processor;
}

at::Tensor preprocess_image(const Image& input, const ImageProcessorConfig& checked, std::int64_t max_pixels) {
  const ImageProcessorConfig config = with_aspect_ratio(checked, checked.aspect_ratio, "image_aspect_ratio");
  if (input.width <= 0 || input.height <= 0) throw Error("the image has no pixels");
  const double aspect = static_cast<double>(std::max(input.width, input.height)) / std::min(input.width, input.height);
  if (aspect > kMaxImageAspectRatio) {
    throw Error("image of " + std::to_string(input.width) + "x" + std::to_string(input.height) +
                " pixels has an aspect ratio above " + std::to_string(static_cast<int>(kMaxImageAspectRatio)) + ":1");
  }
  // Each intermediate image, checked before it is allocated.
  auto check = [&](std::int64_t width, std::int64_t height, const char* step) {
    if (!over_budget(width, height, max_pixels).empty()) {
      throw Error(std::string(step) + " would make an image of " + std::to_string(width) + "x" + std::to_string(height) +
                  " pixels, over the budget of " + std::to_string(max_pixels) + " pixels");
    }
  };
  Image image = input;
  if (config.aspect_ratio == "pad") {
    const std::int64_t side = std::max(image.width, image.height);
    check(side, side, "padding to a square");
    std::array<std::uint8_t, 3> background{};
    for (int c = 0; c < 3; ++c) background[c] = static_cast<std::uint8_t>(static_cast<int>(config.mean[c] * 255));
    image = expand_to_square(image, background);
  } else if (config.aspect_ratio == "keep") {
    // NeMo neva_dataset's 'keep': the processor without centre crop, at a shortest edge that keeps the
    // long edge within 448.
    double aspect = static_cast<double>(std::max(image.width, image.height)) / std::min(image.width, image.height);
    int shortest_edge = static_cast<int>(std::min(448.0 / aspect, 224.0));
    bool wide = image.width >= image.height;
    int shortest = wide ? image.height : image.width, longest = wide ? image.width : image.height;
    int scaled = static_cast<int>(static_cast<double>(shortest_edge) * longest / shortest);
    check(wide ? scaled : shortest_edge, wide ? shortest_edge : scaled, "resizing (image_aspect_ratio 'keep')");
    image = wide ? resize_bicubic(image, scaled, shortest_edge) : resize_bicubic(image, shortest_edge, scaled);
  }
  if (config.aspect_ratio == "keep") {
    // resized above; no crop
  } else if (config.resize == ImageProcessorConfig::Resize::Exact) {
    check(config.size, config.size, "resizing");
    image = resize_bicubic(image, config.size, config.size);
  } else {
    // Shortest edge to `size`; the long edge scales and truncates (transformers' get_resize_output_image_size).
    bool wide = image.width >= image.height;
    int shortest = wide ? image.height : image.width, longest = wide ? image.width : image.height;
    int scaled = static_cast<int>(static_cast<double>(config.size) * longest / shortest);
    check(wide ? scaled : config.size, wide ? config.size : scaled, "resizing to the shortest edge");
    check(config.crop_size, config.crop_size, "centre cropping");
    image = wide ? resize_bicubic(image, scaled, config.size) : resize_bicubic(image, config.size, scaled);
    image = center_crop(image, config.crop_size, config.crop_size);
  }
  at::Tensor pixels = at::empty({3, image.height, image.width}, at::kFloat);
  float* out = pixels.data_ptr<float>();
  const std::size_t plane = static_cast<std::size_t>(image.height) * image.width;
  for (std::size_t i = 0; i < plane; ++i) {
    for (int c = 0; c < 3; ++c) {
      // rescale in float64 then float32, normalize in float32: transformers' order.
      float value = static_cast<float>(static_cast<double>(image.rgb[i * 3 + c]) * (1.0 / 255.0));
      out[c * plane + i] = (value - config.mean[c]) / config.std[c];
    }
  }
  return pixels;
}

at::Tensor load_and_preprocess_image(const std::string& path, const ImageProcessorConfig& config, std::int64_t max_pixels) {
  const Image image = load_image(path, max_pixels);
  try {
    return preprocess_image(image, config, max_pixels);
  } catch (const Error& error) {
    throw Error(path + ": " + error.what());
  }
}

}  // namespace neva

namespace neva {

std::string encode_png(const Image& image) {
  if (image.width <= 0 || image.height <= 0 ||
      image.rgb.size() != static_cast<std::size_t>(image.width) * static_cast<std::size_t>(image.height) * 3) {
    throw Error("encode_png: the image is " + std::to_string(image.width) + "x" + std::to_string(image.height) +
                " with " + std::to_string(image.rgb.size()) + " bytes (expected width * height * 3)");
  }
  std::string out;
  std::string failure;
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!info) {
    png_destroy_write_struct(&png, nullptr);
    throw Error("encode_png: libpng could not start");
  }
  png_set_error_fn(png, &failure,
                   [](png_structp p, png_const_charp text) {
                     *static_cast<std::string*>(png_get_error_ptr(p)) = text;
                     png_longjmp(p, 1);
                   },
                   [](png_structp, png_const_charp) {});
  png_set_write_fn(
      png, &out,
      [](png_structp p, png_bytep data, png_size_t length) {
        static_cast<std::string*>(png_get_io_ptr(p))->append(reinterpret_cast<const char*>(data), length);
      },
      [](png_structp) {});
  std::vector<png_bytep> rows(static_cast<std::size_t>(image.height));
  for (int y = 0; y < image.height; ++y) {
    rows[y] = const_cast<png_bytep>(image.rgb.data() + static_cast<std::size_t>(y) * image.width * 3);
  }
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    throw Error("encode_png: " + failure);
  }
  png_set_IHDR(png, info, image.width, image.height, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_set_rows(png, info, rows.data());
  png_write_png(png, info, PNG_TRANSFORM_IDENTITY, nullptr);
  png_destroy_write_struct(&png, &info);
  return out;
}

}  // namespace neva
