// Recipe key validation: unknown-key detection with edit-distance suggestions and typed
// getters whose errors name the full dotted key. yaml-cpp's as<T>() does the conversion;
// its BadConversion becomes a moetune::Error with the key path and the offending value.
#include "core/config_keys.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace moetune {

std::string config_key_path(const std::string& context, std::string_view key) {
  if (context.empty()) return std::string(key);
  return context + "." + std::string(key);
}

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> previous(b.size() + 1), current(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) previous[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    current[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t substitution = previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      current[j] = std::min({previous[j] + 1, current[j - 1] + 1, substitution});
    }
    std::swap(previous, current);
  }
  return previous[b.size()];
}

std::optional<std::string_view> closest_key(std::string_view key,
                                            std::span<const std::string_view> known) {
  std::optional<std::string_view> best;
  size_t best_distance = 0;
  for (std::string_view candidate : known) {
    const size_t distance = edit_distance(key, candidate);
    if (!best || distance < best_distance) {
      best = candidate;
      best_distance = distance;
    }
  }
  // Close enough to be a typo: at most 2 edits, or a third of the longer name.
  const size_t limit = std::max<size_t>(2, std::max(key.size(), best ? best->size() : 0) / 3);
  if (best && best_distance <= limit) return best;
  return std::nullopt;
}

std::string describe_node(const YAML::Node& node) {
  if (!node.IsDefined() || node.IsNull()) return "null";
  if (node.IsScalar()) return "'" + node.Scalar() + "'";
  if (node.IsSequence()) return "a list";
  if (node.IsMap()) return "a map";
  return "an unknown node";
}

void require_map(const YAML::Node& node, const std::string& context) {
  if (!node.IsDefined() || node.IsNull() || node.IsMap()) return;
  fail(context, ": expected a map of keys, got ", describe_node(node));
}

void check_known_keys(const YAML::Node& map, std::span<const std::string_view> known,
                      const std::string& context) {
  require_map(map, context);
  if (!map.IsDefined() || map.IsNull()) return;
  for (const auto& entry : map) {
    if (!entry.first.IsScalar()) fail(context, ": keys must be plain names");
    const std::string key = entry.first.Scalar();
    if (std::find(known.begin(), known.end(), key) != known.end()) continue;
    const auto suggestion = closest_key(key, known);
    if (suggestion)
      fail("unknown key ", config_key_path(context, key), " (did you mean ",
           config_key_path(context, *suggestion), "?)");
    std::string list;
    for (std::string_view name : known) list += (list.empty() ? "" : ", ") + std::string(name);
    fail("unknown key ", config_key_path(context, key), " (known keys: ", list, ")");
  }
}

namespace {

// The value node of `key`, or an undefined node when absent or null.
YAML::Node value_of(const YAML::Node& map, std::string_view key, const std::string& context) {
  require_map(map, context);
  if (!map.IsDefined() || map.IsNull()) return YAML::Node(YAML::NodeType::Undefined);
  YAML::Node value = map[std::string(key)];
  if (!value.IsDefined() || value.IsNull()) return YAML::Node(YAML::NodeType::Undefined);
  return value;
}

template <typename T>
T convert(const YAML::Node& value, std::string_view key, const std::string& context,
          const char* expected) {
  if (!value.IsScalar())
    fail(config_key_path(context, key), ": expected ", expected, ", got ", describe_node(value));
  try {
    return value.as<T>();
  } catch (const YAML::Exception&) {
    fail(config_key_path(context, key), ": expected ", expected, ", got ", describe_node(value));
  }
}

}  // namespace

std::optional<int64_t> get_optional_int(const YAML::Node& map, std::string_view key,
                                        const std::string& context) {
  const YAML::Node value = value_of(map, key, context);
  if (!value.IsDefined()) return std::nullopt;
  return convert<int64_t>(value, key, context, "an integer");
}

std::optional<double> get_optional_double(const YAML::Node& map, std::string_view key,
                                          const std::string& context) {
  const YAML::Node value = value_of(map, key, context);
  if (!value.IsDefined()) return std::nullopt;
  const double number = convert<double>(value, key, context, "a number");
  if (!std::isfinite(number))
    fail(config_key_path(context, key), ": expected a finite number, got ", describe_node(value));
  return number;
}

std::optional<bool> get_optional_bool(const YAML::Node& map, std::string_view key,
                                      const std::string& context) {
  const YAML::Node value = value_of(map, key, context);
  if (!value.IsDefined()) return std::nullopt;
  return convert<bool>(value, key, context, "a boolean");
}

std::optional<std::string> get_optional_string(const YAML::Node& map, std::string_view key,
                                               const std::string& context) {
  const YAML::Node value = value_of(map, key, context);
  if (!value.IsDefined()) return std::nullopt;
  return convert<std::string>(value, key, context, "a string");
}

int64_t get_int(const YAML::Node& map, std::string_view key, const std::string& context,
                int64_t default_value) {
  return get_optional_int(map, key, context).value_or(default_value);
}

double get_double(const YAML::Node& map, std::string_view key, const std::string& context,
                  double default_value) {
  return get_optional_double(map, key, context).value_or(default_value);
}

bool get_bool(const YAML::Node& map, std::string_view key, const std::string& context,
              bool default_value) {
  return get_optional_bool(map, key, context).value_or(default_value);
}

std::string get_string(const YAML::Node& map, std::string_view key, const std::string& context,
                       const std::string& default_value) {
  return get_optional_string(map, key, context).value_or(default_value);
}

std::vector<std::string> get_string_list(const YAML::Node& map, std::string_view key,
                                         const std::string& context) {
  const YAML::Node value = value_of(map, key, context);
  std::vector<std::string> result;
  if (!value.IsDefined()) return result;
  if (value.IsScalar()) return {value.Scalar()};
  if (!value.IsSequence())
    fail(config_key_path(context, key), ": expected a string or a list of strings, got ",
         describe_node(value));
  for (size_t i = 0; i < value.size(); ++i) {
    const std::string item_key = std::string(key) + "[" + std::to_string(i) + "]";
    result.push_back(convert<std::string>(value[i], item_key, context, "a string"));
  }
  return result;
}

std::string get_choice(const YAML::Node& map, std::string_view key, const std::string& context,
                       std::span<const std::string_view> choices,
                       const std::string& default_value) {
  const auto value = get_optional_string(map, key, context);
  if (!value) return default_value;
  if (std::find(choices.begin(), choices.end(), *value) != choices.end()) return *value;
  std::string list;
  for (std::string_view choice : choices) list += (list.empty() ? "" : ", ") + std::string(choice);
  fail(config_key_path(context, key), ": expected one of ", list, ", got '", *value, "'");
}

void check_range(int64_t value, int64_t min, int64_t max, const std::string& key_path) {
  if (value < min || value > max)
    fail(key_path, ": ", value, " is out of range [", min, ", ", max, "]");
}

void check_range(double value, double min, double max, const std::string& key_path) {
  if (!(value >= min && value <= max))
    fail(key_path, ": ", value, " is out of range [", min, ", ", max, "]");
}

}  // namespace moetune
