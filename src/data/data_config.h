// The recipe's `data` section: which files, in which format, what the loss is taken on,
// how examples are truncated, packed, shuffled and split. Parsing validates every key
// (unknown keys suggest the closest one) and resolves relative paths against the
// recipe's folder.
//
// Schema (defaults in brackets):
//
//   data:
//     train: chat.jsonl                  # a path, a list of paths, or a list of sources:
//     # train:
//     #   - path: glaive.json            # .jsonl: one JSON object per line;
//     #                                  # .json: an array of objects (or objects one per line)
//     #     format: sharegpt             # [auto] auto | messages | sharegpt | alpaca |
//     #                                  #        prompt_completion | text
//     #     columns: {messages: conversations, tools: tools}   # canonical name: record key
//     #     max_samples: 1000            # keep only the first N records of this file
//     format: auto                       # [auto] the format of sources that name none
//     eval: held_out.jsonl               # same forms as train; or instead:
//     eval_fraction: 0.05                # hold out this fraction of the train records,
//                                        # chosen deterministically from the seed
//     train_on: auto                     # [auto] auto | assistant | completion | all
//                                        #   auto: assistant turns for chat formats (alpaca
//                                        #   included), the completion for prompt_completion,
//                                        #   every token for text. assistant = completion.
//     truncation: right                  # [right] examples longer than training.seq_len:
//                                        #   right: keep the first seq_len tokens
//                                        #   left: keep the last seq_len tokens
//                                        #   drop: skip the example (counted)
//     packing: true                      # [true] pack several examples per row
//     shuffle: true                      # [true] reshuffled each epoch
//     seed: 42                           # [training.seed]
//     skip_bad_lines: false              # [false] skip malformed records (counted) instead
//                                        #   of stopping at the first one
//     max_bad_lines: 10                  # skip at most this many, then stop (implies skip)
//     chat_template: my_template.jinja   # override the tokenizer's chat template
//     system_prompt: "You are helpful."  # system message for chats that have none
//     add_eos: true                      # [true] end text / completions with eos
//
// Canonical column names (for `columns`): messages, tools, system, instruction, input,
// output, history, prompt, completion, text.
#pragma once

#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace moetune {

enum class DataFormat { Auto, Messages, ShareGPT, Alpaca, PromptCompletion, Text };
enum class TrainOn { Auto, Responses, All };  // Responses: assistant turns / completions
enum class Truncation { Right, Left, Drop };

const char* data_format_name(DataFormat format);

struct DataSource {
  std::filesystem::path path;  // absolute (resolved against the recipe's folder)
  DataFormat format = DataFormat::Auto;
  std::map<std::string, std::string> columns;  // canonical name -> key in the record
  std::optional<int64_t> max_samples;
  std::string context;  // "data.train[0]", for error messages

  // The record key holding canonical column `name` (the mapping, or `name` itself).
  std::string column(const std::string& name) const;
};

struct DataConfig {
  std::vector<DataSource> train, eval;
  double eval_fraction = 0.0;
  TrainOn train_on = TrainOn::Auto;
  Truncation truncation = Truncation::Right;
  bool packing = true;
  bool shuffle = true;
  std::optional<uint64_t> seed;  // absent: the caller's (training) seed
  // Malformed records tolerated before stopping: 0 = none (the first is an error),
  // -1 = unlimited (skip_bad_lines: true).
  int64_t max_bad_lines = 0;
  std::optional<std::filesystem::path> chat_template;
  std::optional<std::string> system_prompt;
  bool add_eos = true;

  bool has_eval() const { return !eval.empty() || eval_fraction > 0.0; }
};

// Parses and validates `data_section` (the node under `data:`). Files must exist.
DataConfig parse_data_config(const YAML::Node& data_section,
                             const std::filesystem::path& recipe_dir);

}  // namespace moetune
