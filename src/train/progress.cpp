// Progress bar and log lines (see progress.h). The ETA uses the steps done in this process
// only (a resumed run does not count the steps it did not do).
#include "train/progress.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>

namespace moetune {

int64_t resident_memory_bytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t pages_total = 0, pages_resident = 0;
  if (!(statm >> pages_total >> pages_resident)) return 0;
  return pages_resident * static_cast<int64_t>(::sysconf(_SC_PAGESIZE));
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  char text[32];
  if (s >= 3600)
    std::snprintf(text, sizeof(text), "%lldh%02lldm", static_cast<long long>(s / 3600),
                  static_cast<long long>(s % 3600 / 60));
  else if (s >= 60)
    std::snprintf(text, sizeof(text), "%lldm%02llds", static_cast<long long>(s / 60),
                  static_cast<long long>(s % 60));
  else
    std::snprintf(text, sizeof(text), "%llds", static_cast<long long>(s));
  return text;
}

namespace {
std::string format_rate(double per_s) {
  char text[32];
  if (per_s >= 1e6)
    std::snprintf(text, sizeof(text), "%.1fM", per_s / 1e6);
  else if (per_s >= 1e3)
    std::snprintf(text, sizeof(text), "%.1fk", per_s / 1e3);
  else
    std::snprintf(text, sizeof(text), "%.0f", per_s);
  return text;
}
}  // namespace

Progress::Progress(ProgressMode mode, int64_t total_steps, int64_t start_step)
    : mode_(mode),
      total_(total_steps),
      start_(start_step),
      started_(std::chrono::steady_clock::now()) {
  last_.step = start_step;
}

void Progress::draw() {
  const double since_start =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  const int64_t done_here = last_.step - start_;
  const double eta = done_here > 0 ? since_start / static_cast<double>(done_here) *
                                         static_cast<double>(total_ - last_.step)
                                   : NAN;
  const double rss_mib = static_cast<double>(resident_memory_bytes()) / (1024.0 * 1024.0);
  char line[256];
  if (mode_ == ProgressMode::Bar) {
    constexpr int kWidth = 24;
    const int filled = total_ > 0 ? static_cast<int>(kWidth * last_.step / total_) : 0;
    std::string bar(static_cast<size_t>(filled), '#');
    bar.resize(kWidth, '.');
    std::snprintf(line, sizeof(line),
                  "\r[%s] %lld/%lld  loss %.4f  lr %.2e  %s tok/s  ETA %s  RSS %.0f MiB\033[K",
                  bar.c_str(), static_cast<long long>(last_.step), static_cast<long long>(total_),
                  last_.loss, last_.lr, format_rate(last_.tokens_per_s).c_str(),
                  format_duration(eta).c_str(), rss_mib);
    std::fputs(line, stdout);
    bar_visible_ = true;
  } else {
    std::snprintf(line, sizeof(line),
                  "step %lld/%lld  loss %.4f  lr %.3e  grad_norm %.3f  %s tok/s  elapsed %s  ETA "
                  "%s  RSS %.0f MiB\n",
                  static_cast<long long>(last_.step), static_cast<long long>(total_), last_.loss,
                  last_.lr, last_.grad_norm, format_rate(last_.tokens_per_s).c_str(),
                  format_duration(last_.elapsed_s).c_str(), format_duration(eta).c_str(), rss_mib);
    std::fputs(line, stdout);
  }
  std::fflush(stdout);
}

void Progress::update(const ProgressStats& stats) {
  last_ = stats;
  if (mode_ != ProgressMode::None) draw();
}

void Progress::message(const std::string& text) {
  if (mode_ == ProgressMode::None) return;
  if (bar_visible_) std::fputs("\r\033[K", stdout);
  std::fputs(text.c_str(), stdout);
  std::fputc('\n', stdout);
  if (bar_visible_)
    draw();
  else
    std::fflush(stdout);
}

void Progress::finish() {
  if (bar_visible_) {
    std::fputc('\n', stdout);
    std::fflush(stdout);
    bar_visible_ = false;
  }
}

}  // namespace moetune
