// Training progress on the console. On a terminal: one bar redrawn in place
//   [#########.........] 120/400  loss 1.234  lr 2.0e-03  3.1k tok/s  ETA 1m12s  RSS 312 MiB
// and messages (evals, checkpoints) printed above it. Not on a terminal (a log file, CI):
// plain lines, one per logged step, nothing redrawn.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace moetune {

enum class ProgressMode { Bar, Plain, None };

struct ProgressStats {
  int64_t step = 0;  // steps done
  double loss = 0;
  double lr = 0;
  double grad_norm = 0;
  double tokens_per_s = 0;
  double elapsed_s = 0;
};

class Progress {
 public:
  Progress(ProgressMode mode, int64_t total_steps, int64_t start_step);
  // A logged step: redraws the bar, or prints a line.
  void update(const ProgressStats& stats);
  // A message line (kept above the bar).
  void message(const std::string& text);
  // Ends the bar line.
  void finish();

 private:
  void draw();

  ProgressMode mode_;
  int64_t total_, start_;
  ProgressStats last_;
  std::chrono::steady_clock::time_point started_;
  bool bar_visible_ = false;
};

// Resident memory of this process in bytes (/proc/self/statm), 0 when unknown.
int64_t resident_memory_bytes();
// "1m12s", "3h05m", "42s".
std::string format_duration(double seconds);

}  // namespace moetune
