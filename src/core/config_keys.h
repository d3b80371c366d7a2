// Validation helpers for the YAML recipe, shared by every recipe section (model, data,
// training, ...): unknown keys are errors that suggest the closest known key (edit
// distance), and typed getters turn yaml-cpp's conversion failures into errors naming the
// full key path ("data.packing: expected a boolean, got 'yes please'").
//
// `context` is the dotted path of the map being read ("data", "data.train[0]"); a key's
// full name is context + "." + key.
#pragma once

#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moetune {

// "data" + "seed" -> "data.seed"; "" + "data" -> "data".
std::string config_key_path(const std::string& context, std::string_view key);

// Levenshtein distance (bytes), used for "did you mean" suggestions.
size_t edit_distance(std::string_view a, std::string_view b);

// The known key closest to `key` when it is close enough to be a likely typo.
std::optional<std::string_view> closest_key(std::string_view key,
                                            std::span<const std::string_view> known);

// Throws Error unless `node` is a map (an absent/null node passes: an empty section).
void require_map(const YAML::Node& node, const std::string& context);

// Throws "unknown key data.formt (did you mean data.format?)" for the first key of `map`
// not in `known`. A null/absent node passes; a non-map node is an error.
void check_known_keys(const YAML::Node& map, std::span<const std::string_view> known,
                      const std::string& context);

// Typed getters: `map[key]` converted, or `default_value` when the key is absent or null.
// A value of the wrong type is an Error naming context.key and the value found.
int64_t get_int(const YAML::Node& map, std::string_view key, const std::string& context,
                int64_t default_value);
double get_double(const YAML::Node& map, std::string_view key, const std::string& context,
                  double default_value);
bool get_bool(const YAML::Node& map, std::string_view key, const std::string& context,
              bool default_value);
std::string get_string(const YAML::Node& map, std::string_view key, const std::string& context,
                       const std::string& default_value);

std::optional<int64_t> get_optional_int(const YAML::Node& map, std::string_view key,
                                        const std::string& context);
std::optional<double> get_optional_double(const YAML::Node& map, std::string_view key,
                                          const std::string& context);
std::optional<bool> get_optional_bool(const YAML::Node& map, std::string_view key,
                                      const std::string& context);
std::optional<std::string> get_optional_string(const YAML::Node& map, std::string_view key,
                                               const std::string& context);

// A string, or a list of strings (a single string becomes a one-element list).
std::vector<std::string> get_string_list(const YAML::Node& map, std::string_view key,
                                         const std::string& context);

// One of `choices` (exact match); otherwise "data.truncation: expected one of right, left,
// drop, got 'middle'".
std::string get_choice(const YAML::Node& map, std::string_view key, const std::string& context,
                       std::span<const std::string_view> choices, const std::string& default_value);

// Range checks for numbers read with the getters above.
void check_range(int64_t value, int64_t min, int64_t max, const std::string& key_path);
void check_range(double value, double min, double max, const std::string& key_path);

// A short printable form of a node for error messages ('yes please', a map, a list).
std::string describe_node(const YAML::Node& node);

}  // namespace moetune
