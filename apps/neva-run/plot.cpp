#include "plot.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>

#include "neva/io/atomic_file.h"
#include "neva/data/image.h"

namespace neva {

namespace {

// A 3x5 pixel font for the axis numbers: digits, '.', '-', 'e' (rows top to bottom, 3 bits each).
std::array<int, 5> glyph(char c) {
  switch (c) {
    case '0': return {7, 5, 5, 5, 7};
    case '1': return {2, 6, 2, 2, 7};
    case '2': return {7, 1, 7, 4, 7};
    case '3': return {7, 1, 7, 1, 7};
    case '4': return {5, 5, 7, 1, 1};
    case '5': return {7, 4, 7, 1, 7};
    case '6': return {7, 4, 7, 5, 7};
    case '7': return {7, 1, 1, 1, 1};
    case '8': return {7, 5, 7, 5, 7};
    case '9': return {7, 5, 7, 1, 7};
    case '.': return {0, 0, 0, 0, 2};
    case '-': return {0, 0, 7, 0, 0};
    case 'e': return {0, 7, 7, 4, 7};
    default: return {0, 0, 0, 0, 0};
  }
}

struct Canvas {
  Image image;
  Canvas(int width, int height) {
    image.width = width;
    image.height = height;
    image.rgb.assign(static_cast<std::size_t>(width) * height * 3, 255);
  }
  void dot(int x, int y, std::array<std::uint8_t, 3> color) {
    if (x < 0 || y < 0 || x >= image.width || y >= image.height) return;
    std::size_t at = (static_cast<std::size_t>(y) * image.width + x) * 3;
    for (int c = 0; c < 3; ++c) image.rgb[at + c] = color[c];
  }
  void line(double x0, double y0, double x1, double y1, std::array<std::uint8_t, 3> color) {
    int steps = static_cast<int>(std::max(std::abs(x1 - x0), std::abs(y1 - y0))) + 1;
    for (int i = 0; i <= steps; ++i) {
      double t = static_cast<double>(i) / steps;
      dot(static_cast<int>(std::lround(x0 + t * (x1 - x0))), static_cast<int>(std::lround(y0 + t * (y1 - y0))), color);
    }
  }
  void text(int x, int y, const std::string& value, int scale = 2) {
    for (char c : value) {
      auto rows = glyph(c);
      for (int r = 0; r < 5; ++r) {
        for (int b = 0; b < 3; ++b) {
          if (!(rows[r] >> (2 - b) & 1)) continue;
          for (int dy = 0; dy < scale; ++dy) {
            for (int dx = 0; dx < scale; ++dx) dot(x + b * scale + dx, y + r * scale + dy, {0, 0, 0});
          }
        }
      }
      x += 4 * scale;
    }
  }
};

std::string number(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, std::abs(value) >= 0.01 || value == 0 ? "%.3f" : "%.2e", value);
  return buffer;
}

}  // namespace

void write_loss_plot(const std::string& path, const std::vector<std::pair<std::int64_t, double>>& losses,
                     const std::string& title) {
  (void)title;  // the file name says which run; the font has no letters
  std::vector<std::pair<std::int64_t, double>> points;
  for (const auto& point : losses) {
    if (std::isfinite(point.second)) points.push_back(point);
  }
  if (points.empty()) return;
  constexpr int kWidth = 800, kHeight = 450, kLeft = 90, kRight = 20, kTop = 20, kBottom = 40;
  Canvas canvas(kWidth, kHeight);
  double low = points.front().second, high = low;
  for (const auto& point : points) {
    low = std::min(low, point.second);
    high = std::max(high, point.second);
  }
  if (high - low < 1e-12) high = low + 1;
  const double first = static_cast<double>(points.front().first), last = static_cast<double>(points.back().first);
  const double span = std::max(1.0, last - first);
  auto x_of = [&](double step) { return kLeft + (step - first) / span * (kWidth - kLeft - kRight); };
  auto y_of = [&](double loss) { return kTop + (high - loss) / (high - low) * (kHeight - kTop - kBottom); };

  for (int i = 0; i <= 4; ++i) {  // horizontal grid with the loss at each line
    double loss = low + (high - low) * i / 4.0;
    canvas.line(kLeft, y_of(loss), kWidth - kRight, y_of(loss), {225, 225, 225});
    canvas.text(4, static_cast<int>(y_of(loss)) - 5, number(loss));
  }
  canvas.line(kLeft, kTop, kLeft, kHeight - kBottom, {0, 0, 0});
  canvas.line(kLeft, kHeight - kBottom, kWidth - kRight, kHeight - kBottom, {0, 0, 0});
  canvas.text(kLeft, kHeight - kBottom + 10, std::to_string(points.front().first));
  std::string end = std::to_string(points.back().first);
  canvas.text(kWidth - kRight - static_cast<int>(end.size()) * 8, kHeight - kBottom + 10, end);

  double mean = points.front().second;
  for (std::size_t i = 1; i < points.size(); ++i) {
    canvas.line(x_of(points[i - 1].first), y_of(points[i - 1].second), x_of(points[i].first), y_of(points[i].second),
                {170, 170, 170});
  }
  for (std::size_t i = 1; i < points.size(); ++i) {
    double next = 0.9 * mean + 0.1 * points[i].second;
    canvas.line(x_of(points[i - 1].first), y_of(mean), x_of(points[i].first), y_of(next), {31, 119, 180});
    mean = next;
  }
  write_file_atomically(path, encode_png(canvas.image));
}

}  // namespace neva
