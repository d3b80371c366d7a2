// loss.svg: a small self-contained SVG line chart of the training loss, with the eval
// losses marked as dots, labelled axes and "nice" tick values. No plotting library: the
// SVG is written by hand (a path for the curve, circles for eval points).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace moetune {

struct LossPoint {
  int64_t step = 0;
  double loss = 0.0;
};

// The SVG text; `train` and `eval` may be empty (the chart then says so).
std::string render_loss_svg(const std::vector<LossPoint>& train, const std::vector<LossPoint>& eval,
                            const std::string& title);
void write_loss_svg(const std::filesystem::path& path, const std::vector<LossPoint>& train,
                    const std::vector<LossPoint>& eval, const std::string& title);

}  // namespace moetune
