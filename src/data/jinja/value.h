// Values of the Jinja interpreter: a small Python object model (None, bool, int, float, str,
// list/tuple, dict, jinja's Undefined and Namespace, callables, the loop object) with the
// Python semantics templates rely on: truthiness, str()/repr(), ==, <, json.dumps, len().
// Tricks: lists, dicts and callables are immutable and shared (shared_ptr to const), since the
// immutable sandbox forbids mutating them; only Namespace is mutable. Dicts keep insertion order
// (Python 3.7+) in a vector. Undefined carries the message Jinja would raise when it is used.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace moetune::jinja {

// Every error the interpreter raises: `type` is the Python exception class Jinja would raise
// (TemplateError, UndefinedError, TypeError, TemplateSyntaxError, SecurityError, ...), `line`
// the template line (0 until the enclosing node fills it in).
class JinjaError : public std::runtime_error {
 public:
  JinjaError(std::string type, const std::string& message, int line = 0)
      : std::runtime_error(message), type(std::move(type)), line(line) {}
  std::string type;
  int line = 0;
};

[[noreturn]] void raise(const std::string& type, const std::string& message);

class Value;
class Interpreter;

struct ListObject {
  std::vector<Value> items;
  bool is_tuple = false;
};

struct DictObject {
  std::vector<std::pair<Value, Value>> items;
  const Value* find(const Value& key) const;
  void set(Value key, Value value);  // replaces an equal key in place (keeps its position)
};

struct NamespaceObject {
  std::vector<std::pair<std::string, Value>> attrs;
  const Value* find(const std::string& name) const;
  void set(const std::string& name, Value value);
};

struct CallArgs {
  std::vector<Value> positional;
  std::vector<std::pair<std::string, Value>> keyword;
};

struct CallableObject {
  std::string name;
  std::function<Value(Interpreter&, CallArgs&)> fn;
};

struct LoopObject {
  std::shared_ptr<const ListObject> items;
  size_t index0 = 0;
  size_t depth0 = 0;
};

struct UndefinedInfo {
  std::string message;  // what Jinja raises when the value is used
  std::string type = "UndefinedError";
};

class Value {
 public:
  enum class Kind : uint8_t {
    Undefined,
    None,
    Bool,
    Int,
    Float,
    String,
    List,
    Dict,
    Namespace,
    Callable,
    Loop
  };

  Value();  // Undefined
  Value(std::nullptr_t) : storage_(nullptr) {}
  Value(bool b) : storage_(b) {}
  Value(int v) : storage_(static_cast<int64_t>(v)) {}
  Value(int64_t v) : storage_(v) {}
  Value(size_t v) : storage_(static_cast<int64_t>(v)) {}
  Value(double v) : storage_(v) {}
  Value(std::string s) : storage_(std::move(s)) {}
  Value(const char* s) : storage_(std::string(s)) {}
  Value(std::shared_ptr<const ListObject> l) : storage_(std::move(l)) {}
  Value(std::shared_ptr<const DictObject> d) : storage_(std::move(d)) {}
  Value(std::shared_ptr<NamespaceObject> n) : storage_(std::move(n)) {}
  Value(std::shared_ptr<const CallableObject> c) : storage_(std::move(c)) {}
  Value(std::shared_ptr<const LoopObject> l) : storage_(std::move(l)) {}

  static Value undefined(std::string message, std::string type = "UndefinedError");
  static Value list(std::vector<Value> items, bool is_tuple = false);
  static Value dict(DictObject dict);
  static Value callable(std::string name, std::function<Value(Interpreter&, CallArgs&)> fn);

  Kind kind() const { return static_cast<Kind>(storage_.index()); }
  bool is_undefined() const { return kind() == Kind::Undefined; }
  bool is_none() const { return kind() == Kind::None; }
  bool is_bool() const { return kind() == Kind::Bool; }
  bool is_int() const { return kind() == Kind::Int; }
  bool is_float() const { return kind() == Kind::Float; }
  bool is_number() const { return is_bool() || is_int() || is_float(); }  // numbers.Number
  bool is_string() const { return kind() == Kind::String; }
  bool is_list() const { return kind() == Kind::List; }
  bool is_dict() const { return kind() == Kind::Dict; }
  bool is_namespace() const { return kind() == Kind::Namespace; }
  bool is_callable() const { return kind() == Kind::Callable; }
  bool is_loop() const { return kind() == Kind::Loop; }

  bool as_bool() const { return std::get<bool>(storage_); }
  int64_t as_int() const { return std::get<int64_t>(storage_); }
  double as_float() const { return std::get<double>(storage_); }
  const std::string& as_string() const { return std::get<std::string>(storage_); }
  const ListObject& as_list() const {
    return *std::get<std::shared_ptr<const ListObject>>(storage_);
  }
  const std::shared_ptr<const ListObject>& list_ptr() const {
    return std::get<std::shared_ptr<const ListObject>>(storage_);
  }
  const DictObject& as_dict() const {
    return *std::get<std::shared_ptr<const DictObject>>(storage_);
  }
  NamespaceObject& as_namespace() const {
    return *std::get<std::shared_ptr<NamespaceObject>>(storage_);
  }
  const CallableObject& as_callable() const {
    return *std::get<std::shared_ptr<const CallableObject>>(storage_);
  }
  const LoopObject& as_loop() const {
    return *std::get<std::shared_ptr<const LoopObject>>(storage_);
  }
  const UndefinedInfo& undefined_info() const {
    return *std::get<std::shared_ptr<const UndefinedInfo>>(storage_);
  }
  // Raises the error an operation on this Undefined raises in Jinja.
  [[noreturn]] void fail_undefined() const;

  // int or bool as an integer (Python treats bool as int); float for floats.
  int64_t int_value() const { return is_bool() ? (as_bool() ? 1 : 0) : as_int(); }
  double number_value() const { return is_float() ? as_float() : static_cast<double>(int_value()); }

  // Identity of shared objects (Python `is` for containers).
  const void* identity() const;

 private:
  std::variant<std::shared_ptr<const UndefinedInfo>, std::nullptr_t, bool, int64_t, double,
               std::string, std::shared_ptr<const ListObject>, std::shared_ptr<const DictObject>,
               std::shared_ptr<NamespaceObject>, std::shared_ptr<const CallableObject>,
               std::shared_ptr<const LoopObject>>
      storage_;
};

// ---- Python semantics -------------------------------------------------------------------------
bool truthy(const Value& v);
std::string type_name(const Value& v);          // Python type name: 'int', 'str', 'NoneType', ...
std::string object_type_repr(const Value& v);   // jinja's object_type_repr: 'dict object', 'None'
std::string py_str(const Value& v);             // str(v)
std::string py_repr(const Value& v);            // repr(v)
std::string repr_string(const std::string& s);  // repr of a str
std::string repr_float(double v);               // float.__repr__
bool py_eq(const Value& a, const Value& b);
bool py_lt(const Value& a, const Value& b);  // raises TypeError for unorderable types
int64_t py_len(const Value& v);              // raises TypeError when there is no len()
// The items of an iterable (list/tuple items, dict keys, str characters); Undefined -> empty.
std::vector<Value> iterate(const Value& v);

struct JsonOptions {
  bool ensure_ascii = false;
  bool has_indent = false;
  std::string indent;
  std::string item_separator = ", ";
  std::string key_separator = ": ";
  bool sort_keys = false;
};
std::string json_dumps(const Value& v, const JsonOptions& options);

Value from_json(const nlohmann::ordered_json& j);

}  // namespace moetune::jinja
