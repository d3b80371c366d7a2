// loss.svg writer (see loss_plot.h). Ticks: 1, 2 or 5 times a power of ten, about five per
// axis. Non-finite losses (a skipped NaN step) are left out of the curve.
#include "train/loss_plot.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace moetune {

namespace {

constexpr double kWidth = 720, kHeight = 420;
constexpr double kLeft = 70, kRight = 20, kTop = 40, kBottom = 55;

// Tick spacing near (hi - lo) / 5 of the form {1, 2, 5} * 10^k.
double nice_step(double lo, double hi) {
  const double raw = std::max((hi - lo) / 5.0, 1e-12);
  const double power = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * power >= raw) return m * power;
  return 10.0 * power;
}

std::string number(double value) {
  char text[32];
  std::snprintf(text, sizeof(text), "%g", std::abs(value) < 1e-12 ? 0.0 : value);
  return text;
}

}  // namespace

std::string render_loss_svg(const std::vector<LossPoint>& train, const std::vector<LossPoint>& eval,
                            const std::string& title) {
  std::vector<LossPoint> points;
  for (const auto* series : {&train, &eval})
    for (const auto& p : *series)
      if (std::isfinite(p.loss)) points.push_back(p);

  double x_lo = 0, x_hi = 1, y_lo = 0, y_hi = 1;
  if (!points.empty()) {
    x_lo = x_hi = static_cast<double>(points[0].step);
    y_lo = y_hi = points[0].loss;
    for (const auto& p : points) {
      x_lo = std::min(x_lo, static_cast<double>(p.step));
      x_hi = std::max(x_hi, static_cast<double>(p.step));
      y_lo = std::min(y_lo, p.loss);
      y_hi = std::max(y_hi, p.loss);
    }
    if (x_hi - x_lo < 1) x_hi = x_lo + 1;
    if (y_hi - y_lo < 1e-9) y_hi = y_lo + 1;
  }
  const double x_step = nice_step(x_lo, x_hi), y_step = nice_step(y_lo, y_hi);
  x_lo = std::floor(x_lo / x_step) * x_step;
  x_hi = std::ceil(x_hi / x_step) * x_step;
  y_lo = std::floor(y_lo / y_step) * y_step;
  y_hi = std::ceil(y_hi / y_step) * y_step;
  const double plot_w = kWidth - kLeft - kRight, plot_h = kHeight - kTop - kBottom;
  auto px = [&](double x) { return kLeft + (x - x_lo) / (x_hi - x_lo) * plot_w; };
  auto py = [&](double y) { return kTop + (1.0 - (y - y_lo) / (y_hi - y_lo)) * plot_h; };

  std::ostringstream svg;
  svg.precision(6);
  svg << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << kWidth << "\" height=\"" << kHeight
      << "\" viewBox=\"0 0 " << kWidth << ' ' << kHeight
      << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
      << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  std::string escaped;
  for (char c : title) {
    if (c == '<')
      escaped += "&lt;";
    else if (c == '>')
      escaped += "&gt;";
    else if (c == '&')
      escaped += "&amp;";
    else
      escaped += c;
  }
  svg << "<text x=\"" << kWidth / 2 << "\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">"
      << escaped << "</text>\n";
  // Grid and tick labels.
  for (double x = x_lo; x <= x_hi + x_step * 1e-6; x += x_step) {
    svg << "<line x1=\"" << px(x) << "\" y1=\"" << kTop << "\" x2=\"" << px(x) << "\" y2=\""
        << kTop + plot_h << "\" stroke=\"#e5e5e5\"/>\n"
        << "<text x=\"" << px(x) << "\" y=\"" << kTop + plot_h + 16 << "\" text-anchor=\"middle\">"
        << number(x) << "</text>\n";
  }
  for (double y = y_lo; y <= y_hi + y_step * 1e-6; y += y_step) {
    svg << "<line x1=\"" << kLeft << "\" y1=\"" << py(y) << "\" x2=\"" << kLeft + plot_w
        << "\" y2=\"" << py(y) << "\" stroke=\"#e5e5e5\"/>\n"
        << "<text x=\"" << kLeft - 6 << "\" y=\"" << py(y) + 4 << "\" text-anchor=\"end\">"
        << number(y) << "</text>\n";
  }
  svg << "<rect x=\"" << kLeft << "\" y=\"" << kTop << "\" width=\"" << plot_w << "\" height=\""
      << plot_h << "\" fill=\"none\" stroke=\"#333\"/>\n";
  svg << "<text x=\"" << kLeft + plot_w / 2 << "\" y=\"" << kHeight - 12
      << "\" text-anchor=\"middle\">optimizer step</text>\n"
      << "<text transform=\"translate(16 " << kTop + plot_h / 2
      << ") rotate(-90)\" text-anchor=\"middle\">loss</text>\n";

  // The training curve, one path; eval losses as dots.
  std::ostringstream path;
  path.precision(6);
  char command = 'M';
  for (const auto& p : train) {
    if (!std::isfinite(p.loss)) continue;
    path << command << px(static_cast<double>(p.step)) << ' ' << py(p.loss) << ' ';
    command = 'L';
  }
  if (command == 'L')
    svg << "<path d=\"" << path.str()
        << "\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\"/>\n";
  for (const auto& p : eval) {
    if (!std::isfinite(p.loss)) continue;
    svg << "<circle cx=\"" << px(static_cast<double>(p.step)) << "\" cy=\"" << py(p.loss)
        << "\" r=\"4\" fill=\"#d62728\"><title>eval step " << p.step << ": " << number(p.loss)
        << "</title></circle>\n";
  }
  // Legend.
  const double lx = kLeft + plot_w - 150, ly = kTop + 14;
  svg << "<line x1=\"" << lx << "\" y1=\"" << ly << "\" x2=\"" << lx + 20 << "\" y2=\"" << ly
      << "\" stroke=\"#1f77b4\" stroke-width=\"2\"/><text x=\"" << lx + 26 << "\" y=\"" << ly + 4
      << "\">train loss</text>\n"
      << "<circle cx=\"" << lx + 10 << "\" cy=\"" << ly + 18
      << "\" r=\"4\" fill=\"#d62728\"/><text x=\"" << lx + 26 << "\" y=\"" << ly + 22
      << "\">eval loss</text>\n";
  if (points.empty())
    svg << "<text x=\"" << kLeft + plot_w / 2 << "\" y=\"" << kTop + plot_h / 2
        << "\" text-anchor=\"middle\">no data yet</text>\n";
  svg << "</svg>\n";
  return svg.str();
}

void write_loss_svg(const std::filesystem::path& path, const std::vector<LossPoint>& train,
                    const std::vector<LossPoint>& eval, const std::string& title) {
  const auto temporary = path.string() + ".tmp";
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    if (!out) fail("cannot write ", temporary);
    out << render_loss_svg(train, eval, title);
    if (!out) fail("cannot write ", temporary);
  }
  std::filesystem::rename(temporary, path);
}

}  // namespace moetune
