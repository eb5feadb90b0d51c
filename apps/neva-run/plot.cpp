// loss.png drawn with Cairo: axes with "nice" ticks and their labels, axis titles, a title and a
// legend, text set by Cairo in the system's sans-serif font (fontconfig; DejaVu Sans on Debian).
#include "plot.h"

#include <cairo.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <array>
#include <memory>

#include "neva/error.h"
#include "neva/io/atomic_file.h"

namespace neva {

namespace {

// Tick positions covering [low, high] at a step of 1, 2 or 5 x 10^k, about `count` of them.
std::vector<double> nice_ticks(double low, double high, int count) {
  const double raw = (high - low) / std::max(1, count);
  const double magnitude = std::pow(10.0, std::floor(std::log10(raw)));
  double step = magnitude;
  for (double factor : {1.0, 2.0, 5.0, 10.0}) {
    step = factor * magnitude;
    if (raw <= step) break;
  }
  std::vector<double> out;
  for (double tick = std::ceil(low / step - 1e-9) * step; tick <= high + step * 1e-9; tick += step) {
    out.push_back(std::abs(tick) < step * 1e-9 ? 0.0 : tick);
  }
  return out;
}

std::string label(double value) {
  char buffer[32];
  const double magnitude = std::abs(value);
  std::snprintf(buffer, sizeof buffer, magnitude != 0 && (magnitude < 1e-3 || magnitude >= 1e6) ? "%.1e" : "%g", value);
  return buffer;
}

cairo_status_t append(void* closure, const unsigned char* data, unsigned int length) {
  static_cast<std::string*>(closure)->append(reinterpret_cast<const char*>(data), length);
  return CAIRO_STATUS_SUCCESS;
}

}  // namespace

void write_loss_plot(const std::string& path, const std::vector<std::pair<std::int64_t, double>>& losses,
                     const std::string& title) {
  std::vector<std::pair<std::int64_t, double>> points;
  for (const auto& point : losses) {
    if (std::isfinite(point.second)) points.push_back(point);
  }
  if (points.empty()) return;
  constexpr double kWidth = 800, kHeight = 480, kLeft = 80, kRight = 24, kTop = 48, kBottom = 64;
  double low = points.front().second, high = low;
  for (const auto& point : points) {
    low = std::min(low, point.second);
    high = std::max(high, point.second);
  }
  if (high - low < 1e-12) {
    low -= 0.5;
    high += 0.5;
  }
  const double pad = (high - low) * 0.05;
  low -= pad;
  high += pad;
  const double first = static_cast<double>(points.front().first);
  const double last = std::max(first + 1, static_cast<double>(points.back().first));
  auto x_of = [&](double step) { return kLeft + (step - first) / (last - first) * (kWidth - kLeft - kRight); };
  auto y_of = [&](double loss) { return kTop + (high - loss) / (high - low) * (kHeight - kTop - kBottom); };

  std::unique_ptr<cairo_surface_t, decltype(&cairo_surface_destroy)> surface(
      cairo_image_surface_create(CAIRO_FORMAT_RGB24, static_cast<int>(kWidth), static_cast<int>(kHeight)),
      cairo_surface_destroy);
  std::unique_ptr<cairo_t, decltype(&cairo_destroy)> context(cairo_create(surface.get()), cairo_destroy);
  cairo_t* cr = context.get();
  cairo_set_source_rgb(cr, 1, 1, 1);
  cairo_paint(cr);
  cairo_select_font_face(cr, "sans-serif", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
  cairo_set_font_size(cr, 12);
  auto text = [cr](const std::string& words, double x, double y, double align_x, double align_y) {
    cairo_text_extents_t extents;
    cairo_text_extents(cr, words.c_str(), &extents);
    cairo_move_to(cr, x - extents.x_bearing - extents.width * align_x, y - extents.y_bearing - extents.height * align_y);
    cairo_show_text(cr, words.c_str());
  };

  // Grid, ticks and their labels.
  cairo_set_line_width(cr, 1);
  for (double tick : nice_ticks(low, high, 6)) {
    const double y = std::round(y_of(tick)) + 0.5;
    cairo_set_source_rgb(cr, 0.9, 0.9, 0.9);
    cairo_move_to(cr, kLeft, y);
    cairo_line_to(cr, kWidth - kRight, y);
    cairo_stroke(cr);
    cairo_set_source_rgb(cr, 0, 0, 0);
    cairo_move_to(cr, kLeft - 5, y);
    cairo_line_to(cr, kLeft, y);
    cairo_stroke(cr);
    text(label(tick), kLeft - 8, y, 1, 0.5);
  }
  for (double tick : nice_ticks(first, last, 8)) {
    if (tick != std::floor(tick)) continue;  // steps are whole
    const double x = std::round(x_of(tick)) + 0.5;
    cairo_set_source_rgb(cr, 0, 0, 0);
    cairo_move_to(cr, x, kHeight - kBottom);
    cairo_line_to(cr, x, kHeight - kBottom + 5);
    cairo_stroke(cr);
    text(label(tick), x, kHeight - kBottom + 8, 0.5, 0);
  }
  cairo_rectangle(cr, kLeft + 0.5, kTop + 0.5, kWidth - kLeft - kRight, kHeight - kTop - kBottom);
  cairo_stroke(cr);

  // The loss per step (grey) and its exponential moving average (blue, weight 0.1 per new step).
  cairo_rectangle(cr, kLeft, kTop, kWidth - kLeft - kRight, kHeight - kTop - kBottom);
  cairo_save(cr);
  cairo_clip(cr);
  cairo_set_line_width(cr, 1.2);
  cairo_set_source_rgb(cr, 0.65, 0.65, 0.65);
  for (std::size_t i = 0; i < points.size(); ++i) {
    const double x = x_of(static_cast<double>(points[i].first)), y = y_of(points[i].second);
    i == 0 ? cairo_move_to(cr, x, y) : cairo_line_to(cr, x, y);
  }
  cairo_stroke(cr);
  cairo_set_line_width(cr, 2);
  cairo_set_source_rgb(cr, 0.12, 0.47, 0.71);
  double mean = points.front().second;
  for (std::size_t i = 0; i < points.size(); ++i) {
    if (i > 0) mean = 0.9 * mean + 0.1 * points[i].second;
    const double x = x_of(static_cast<double>(points[i].first)), y = y_of(mean);
    i == 0 ? cairo_move_to(cr, x, y) : cairo_line_to(cr, x, y);
  }
  cairo_stroke(cr);
  cairo_restore(cr);

  // Legend, axis titles, title.
  const double legend_x = kWidth - kRight - 190, legend_y = kTop + 14;
  const std::pair<const char*, std::array<double, 3>> entries[] = {{"loss per step", {0.65, 0.65, 0.65}},
                                                                    {"moving average (0.9)", {0.12, 0.47, 0.71}}};
  for (int i = 0; i < 2; ++i) {
    const double y = legend_y + i * 18;
    cairo_set_source_rgb(cr, entries[i].second[0], entries[i].second[1], entries[i].second[2]);
    cairo_move_to(cr, legend_x, y);
    cairo_line_to(cr, legend_x + 24, y);
    cairo_stroke(cr);
    cairo_set_source_rgb(cr, 0, 0, 0);
    text(entries[i].first, legend_x + 30, y, 0, 0.5);
  }
  cairo_set_font_size(cr, 13);
  text("optimizer step", kLeft + (kWidth - kLeft - kRight) / 2, kHeight - 24, 0.5, 0);
  cairo_save(cr);
  cairo_translate(cr, 18, kTop + (kHeight - kTop - kBottom) / 2);
  cairo_rotate(cr, -M_PI / 2);
  text("training loss", 0, 0, 0.5, 0.5);
  cairo_restore(cr);
  cairo_select_font_face(cr, "sans-serif", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_BOLD);
  cairo_set_font_size(cr, 15);
  text(title + ": training loss", kWidth / 2, 16, 0.5, 0);

  cairo_surface_flush(surface.get());
  std::string png;
  if (cairo_surface_write_to_png_stream(surface.get(), append, &png) != CAIRO_STATUS_SUCCESS) {
    throw Error(path + ": cannot encode the loss plot (" + cairo_status_to_string(cairo_status(cr)) + ")");
  }
  write_file_atomically(path, png);
}

}  // namespace neva
