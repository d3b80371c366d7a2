// Tree-walking interpreter of parsed Jinja templates with the semantics of Jinja's
// ImmutableSandboxedEnvironment: scopes (a for-loop iteration, macro call, caller, with-block
// and {% generation %} body each get a child scope; if-blocks do not), Undefined, attribute
// vs item lookup with Python's method-first rule, sandboxed (no mutation of lists/dicts, no
// dunder attributes), loopcontrols, and the limits of ChatTemplateLimits. Output goes into a
// string buffer; {% generation %} spans are recorded when rendered at the top level.
#pragma once

#include <ctime>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "data/jinja/ast.h"
#include "data/jinja/parser.h"
#include "data/jinja/value.h"

namespace moetune::jinja {

struct RenderLimits {
  size_t max_loop_iterations = 1'000'000;
  size_t max_recursion_depth = 200;
  size_t max_output_bytes = 64u << 20;
};

struct RenderOutput {
  std::string text;
  std::vector<std::pair<size_t, size_t>> generation_spans;  // byte ranges
};

struct Scope {
  std::shared_ptr<Scope> parent;
  std::vector<std::pair<std::string, Value>> vars;
  const Value* lookup(const std::string& name) const;
  void set(const std::string& name, Value value);
};
using ScopePtr = std::shared_ptr<Scope>;

class Interpreter {
 public:
  // `now` gives the time strftime_now formats (local time).
  Interpreter(RenderLimits limits, std::function<std::tm()> now);

  RenderOutput render(const ParsedTemplate& tmpl,
                      const std::vector<std::pair<std::string, Value>>& variables);

  // Used by the builtins (filters call back into tests, map calls filters, ...).
  Value call(const Value& callee, CallArgs& args);
  Value apply_filter(const std::string& name, const Value& subject, CallArgs& args);
  bool apply_test(const std::string& name, const Value& subject, CallArgs& args);
  Value getattr(const Value& object, const std::string& name);
  Value getitem(const Value& object, const Value& key);
  // Raises when a value being built would exceed the output limit.
  void check_size(size_t bytes) const;
  std::tm now() const { return now_(); }
  void register_namespace(const std::shared_ptr<NamespaceObject>& ns) { namespaces_.push_back(ns); }

 private:
  enum class Flow { Normal, Break, Continue };

  Flow exec_body(const Body& body, const ScopePtr& scope);
  Flow exec(const Stmt& stmt, const ScopePtr& scope);
  Flow exec_for(const Stmt& stmt, const ScopePtr& scope);
  std::string render_loop(const Stmt& stmt, const ScopePtr& scope, const Value& iterable,
                          size_t depth0);
  Value eval(const Expr& expr, const ScopePtr& scope);
  Value eval_inner(const Expr& expr, const ScopePtr& scope);
  Value eval_filter(const Expr& expr, const ScopePtr& scope, const Value* subject);
  void eval_args(const Expr& expr, size_t first, const ScopePtr& scope, CallArgs& args);
  void assign(const Expr& target, const Value& value, const ScopePtr& scope);
  Value make_macro(const Stmt& stmt, const ScopePtr& scope, const std::string& name);
  Value invoke_macro(const Stmt& stmt, const ScopePtr& def_scope, const std::string& name,
                     CallArgs& args);
  std::string capture(const Body& body, const ScopePtr& scope);
  void write(const std::string& text);

  RenderLimits limits_;
  std::function<std::tm()> now_;
  std::string* out_ = nullptr;
  std::string* root_out_ = nullptr;
  std::vector<std::pair<size_t, size_t>> spans_;
  size_t iterations_ = 0;
  size_t depth_ = 0;
  ScopePtr root_scope_;
  std::vector<std::weak_ptr<NamespaceObject>> namespaces_;
};

}  // namespace moetune::jinja
