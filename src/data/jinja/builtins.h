// Jinja builtins for the interpreter: operators with Python semantics, filters, tests, the
// methods of str/dict/list that templates call (the immutable sandbox's subset), and the
// globals (range, namespace, dict, raise_exception, strftime_now, cycler, joiner).
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "data/jinja/value.h"

namespace moetune::jinja {

class Interpreter;

Value binary_op(Interpreter& interp, const std::string& op, const Value& a, const Value& b);
Value unary_op(const std::string& op, const Value& a);
bool contains(const Value& container, const Value& item);  // `item in container`
// obj[start:stop:step]; nullopt when obj cannot be sliced (Jinja then yields Undefined).
std::optional<Value> slice_value(const Value& obj, const Value& start, const Value& stop,
                                 const Value& step);

Value builtin_filter(Interpreter& interp, const std::string& name, const Value& subject,
                     CallArgs& args);
bool builtin_test(Interpreter& interp, const std::string& name, const Value& subject,
                  CallArgs& args);
// The method `name` of a str/dict/list bound to obj; an Undefined carrying a SecurityError for
// the methods the immutable sandbox blocks; nullopt when the type has no such method.
std::optional<Value> builtin_method(const Value& obj, const std::string& name);
std::vector<std::pair<std::string, Value>> builtin_globals();

}  // namespace moetune::jinja
