// The Jinja interpreter (see interpreter.h). Errors: builtins raise JinjaError without a line;
// exec()/eval() fill in the line of the innermost statement or expression they pass through.
// Macros capture their defining scope weakly (a macro stored in that very scope would
// otherwise keep it alive in a cycle); namespaces are cleared after rendering for the same
// reason.
#include "data/jinja/interpreter.h"

#include "data/jinja/builtins.h"
#include "data/jinja/unicode.h"

namespace moetune::jinja {

const Value* Scope::lookup(const std::string& name) const {
  for (const Scope* s = this; s; s = s->parent.get())
    for (const auto& [k, v] : s->vars)
      if (k == name) return &v;
  return nullptr;
}

void Scope::set(const std::string& name, Value value) {
  for (auto& [k, v] : vars)
    if (k == name) {
      v = std::move(value);
      return;
    }
  vars.emplace_back(name, std::move(value));
}

Interpreter::Interpreter(RenderLimits limits, std::function<std::tm()> now)
    : limits_(limits), now_(std::move(now)) {}

RenderOutput Interpreter::render(const ParsedTemplate& tmpl,
                                 const std::vector<std::pair<std::string, Value>>& variables) {
  auto globals = std::make_shared<Scope>();
  for (auto& [name, value] : builtin_globals()) globals->set(name, std::move(value));
  for (const auto& [name, value] : variables) globals->set(name, value);
  root_scope_ = std::make_shared<Scope>();
  root_scope_->parent = globals;
  RenderOutput result;
  out_ = root_out_ = &result.text;
  spans_.clear();
  iterations_ = depth_ = 0;
  struct Cleanup {
    Interpreter& self;
    ~Cleanup() {
      for (auto& weak : self.namespaces_)
        if (auto ns = weak.lock()) ns->attrs.clear();
      self.namespaces_.clear();
      self.root_scope_.reset();
    }
  } cleanup{*this};
  exec_body(tmpl.body, root_scope_);
  result.generation_spans = spans_;
  return result;
}

void Interpreter::check_size(size_t bytes) const {
  if (bytes > limits_.max_output_bytes)
    raise("LimitError", "output too large: more than " + std::to_string(limits_.max_output_bytes) +
                            " bytes (max_output_bytes)");
}

void Interpreter::write(const std::string& text) {
  check_size(out_->size() + text.size());
  out_->append(text);
}

std::string Interpreter::capture(const Body& body, const ScopePtr& scope) {
  std::string buffer;
  std::string* saved = out_;
  out_ = &buffer;
  try {
    exec_body(body, scope);
  } catch (...) {
    out_ = saved;
    throw;
  }
  out_ = saved;
  return buffer;
}

// ---- statements ---------------------------------------------------------------------------------

Interpreter::Flow Interpreter::exec_body(const Body& body, const ScopePtr& scope) {
  for (const auto& stmt : body) {
    const Flow flow = exec(*stmt, scope);
    if (flow != Flow::Normal) return flow;
  }
  return Flow::Normal;
}

Interpreter::Flow Interpreter::exec(const Stmt& s, const ScopePtr& scope) {
  try {
    switch (s.kind) {
      case StmtKind::Data:
        write(s.text);
        return Flow::Normal;
      case StmtKind::Output:
        write(py_str(eval(*s.expr, scope)));
        return Flow::Normal;
      case StmtKind::If:
        for (size_t i = 0; i < s.conditions.size(); ++i)
          if (truthy(eval(*s.conditions[i], scope))) return exec_body(s.bodies[i], scope);
        return exec_body(s.else_body, scope);
      case StmtKind::For:
        return exec_for(s, scope);
      case StmtKind::Set:
        assign(*s.target, eval(*s.expr, scope), scope);
        return Flow::Normal;
      case StmtKind::SetBlock: {
        Value v(capture(s.body, scope));
        if (s.filter) v = eval_filter(*s.filter, scope, &v);
        assign(*s.target, v, scope);
        return Flow::Normal;
      }
      case StmtKind::Macro:
        scope->set(s.name, make_macro(s, scope, s.name));
        return Flow::Normal;
      case StmtKind::CallBlock: {
        const Expr& call = *s.expr;
        Value callee = eval(*call.children[0], scope);
        CallArgs args;
        eval_args(call, 1, scope, args);
        args.keyword.emplace_back("caller", make_macro(s, scope, "caller"));
        write(py_str(this->call(callee, args)));
        return Flow::Normal;
      }
      case StmtKind::FilterBlock: {
        Value body(capture(s.body, scope));
        write(py_str(eval_filter(*s.filter, scope, &body)));
        return Flow::Normal;
      }
      case StmtKind::With: {
        auto inner = std::make_shared<Scope>();
        inner->parent = scope;
        for (size_t i = 0; i < s.with_targets.size(); ++i)
          assign(*s.with_targets[i], eval(*s.with_values[i], scope), inner);
        return exec_body(s.body, inner);
      }
      case StmtKind::Break:
        return Flow::Break;
      case StmtKind::Continue:
        return Flow::Continue;
      case StmtKind::Generation: {
        auto inner = std::make_shared<Scope>();
        inner->parent = scope;
        const std::string text = capture(s.body, inner);
        if (out_ == root_out_) spans_.emplace_back(out_->size(), out_->size() + text.size());
        write(text);
        return Flow::Normal;
      }
    }
  } catch (JinjaError& e) {
    if (e.line == 0) e.line = s.line;
    throw;
  }
  return Flow::Normal;
}

Interpreter::Flow Interpreter::exec_for(const Stmt& s, const ScopePtr& scope) {
  Value iterable = eval(*s.expr, scope);
  if (s.recursive) {
    write(render_loop(s, scope, iterable, 0));
    return Flow::Normal;
  }
  // Non-recursive loops write straight into the current buffer (keeps generation spans exact).
  std::vector<Value> items = iterate(iterable);
  if (s.condition) {
    std::vector<Value> kept;
    for (auto& item : items) {
      if (++iterations_ > limits_.max_loop_iterations)
        raise("LimitError", "too many loop iterations (max_loop_iterations " +
                                std::to_string(limits_.max_loop_iterations) + ")");
      auto probe = std::make_shared<Scope>();
      probe->parent = scope;
      assign(*s.target, item, probe);
      if (truthy(eval(*s.condition, probe))) kept.push_back(std::move(item));
    }
    items = std::move(kept);
  }
  if (items.empty()) {
    auto inner = std::make_shared<Scope>();
    inner->parent = scope;
    exec_body(s.else_body, inner);
    return Flow::Normal;
  }
  auto list = std::make_shared<ListObject>();
  list->items = std::move(items);
  std::shared_ptr<const ListObject> shared = list;
  for (size_t i = 0; i < shared->items.size(); ++i) {
    if (++iterations_ > limits_.max_loop_iterations)
      raise("LimitError", "too many loop iterations (max_loop_iterations " +
                              std::to_string(limits_.max_loop_iterations) + ")");
    auto inner = std::make_shared<Scope>();
    inner->parent = scope;
    assign(*s.target, shared->items[i], inner);
    auto loop = std::make_shared<LoopObject>();
    loop->items = shared;
    loop->index0 = i;
    inner->set("loop", Value(std::shared_ptr<const LoopObject>(loop)));
    if (exec_body(s.body, inner) == Flow::Break) break;
  }
  return Flow::Normal;
}

// A `recursive` loop: renders into a string so loop(children) can return its output.
std::string Interpreter::render_loop(const Stmt& s, const ScopePtr& scope, const Value& iterable,
                                     size_t depth0) {
  if (++depth_ > limits_.max_recursion_depth)
    raise("LimitError", "maximum recursion depth exceeded (max_recursion_depth " +
                            std::to_string(limits_.max_recursion_depth) + ")");
  std::vector<Value> items = iterate(iterable);
  if (s.condition) {
    std::vector<Value> kept;
    for (auto& item : items) {
      auto probe = std::make_shared<Scope>();
      probe->parent = scope;
      assign(*s.target, item, probe);
      if (truthy(eval(*s.condition, probe))) kept.push_back(std::move(item));
    }
    items = std::move(kept);
  }
  std::string buffer;
  std::string* saved = out_;
  out_ = &buffer;
  try {
    if (items.empty()) {
      auto inner = std::make_shared<Scope>();
      inner->parent = scope;
      exec_body(s.else_body, inner);
    }
    auto list = std::make_shared<ListObject>();
    list->items = std::move(items);
    std::shared_ptr<const ListObject> shared = list;
    const Stmt* stmt = &s;
    std::weak_ptr<Scope> weak_scope = scope;
    for (size_t i = 0; i < shared->items.size(); ++i) {
      if (++iterations_ > limits_.max_loop_iterations)
        raise("LimitError", "too many loop iterations (max_loop_iterations " +
                                std::to_string(limits_.max_loop_iterations) + ")");
      auto inner = std::make_shared<Scope>();
      inner->parent = scope;
      assign(*s.target, shared->items[i], inner);
      auto loop = std::make_shared<LoopObject>();
      loop->items = shared;
      loop->index0 = i;
      loop->depth0 = depth0;
      inner->set("loop", Value(std::shared_ptr<const LoopObject>(loop)));
      // `loop(children)` recurses through a callable stored beside the loop object.
      inner->set("__loop_recurse__",
                 Value::callable("loop", [stmt, weak_scope, depth0](Interpreter& in, CallArgs& a) {
                   auto sc = weak_scope.lock();
                   if (!sc || a.positional.size() != 1)
                     raise("TypeError", "loop() takes exactly one argument");
                   return Value(in.render_loop(*stmt, sc, a.positional[0], depth0 + 1));
                 }));
      if (exec_body(s.body, inner) == Flow::Break) break;
    }
  } catch (...) {
    out_ = saved;
    --depth_;
    throw;
  }
  out_ = saved;
  --depth_;
  return buffer;
}

void Interpreter::assign(const Expr& target, const Value& value, const ScopePtr& scope) {
  if (target.kind == ExprKind::Name) {
    scope->set(target.name, value);
  } else if (target.kind == ExprKind::Tuple) {
    if (!value.is_list() && !value.is_string() && !value.is_dict())
      raise("TypeError", "cannot unpack non-iterable " + type_name(value) + " object");
    std::vector<Value> items = iterate(value);
    const size_t n = target.children.size();
    if (items.size() < n)
      raise("ValueError", "not enough values to unpack (expected " + std::to_string(n) + ", got " +
                              std::to_string(items.size()) + ")");
    if (items.size() > n)
      raise("ValueError", "too many values to unpack (expected " + std::to_string(n) + ")");
    for (size_t i = 0; i < n; ++i) assign(*target.children[i], items[i], scope);
  } else if (target.kind == ExprKind::NamespaceRef) {
    const Value* ns = scope->lookup(target.children[0]->name);
    if (!ns || !ns->is_namespace())
      raise("TemplateRuntimeError", "cannot assign attribute on non-namespace object");
    ns->as_namespace().set(target.name, value);
  } else {
    raise("TemplateSyntaxError", "cannot assign to this expression");
  }
}

// ---- macros -------------------------------------------------------------------------------------

Value Interpreter::make_macro(const Stmt& s, const ScopePtr& scope, const std::string& name) {
  const Stmt* stmt = &s;
  std::weak_ptr<Scope> weak = scope;
  return Value::callable(name, [stmt, weak, name](Interpreter& in, CallArgs& args) {
    ScopePtr def_scope = weak.lock();
    if (!def_scope) def_scope = in.root_scope_;
    return in.invoke_macro(*stmt, def_scope, name, args);
  });
}

Value Interpreter::invoke_macro(const Stmt& s, const ScopePtr& def_scope, const std::string& name,
                                CallArgs& args) {
  if (depth_ + 1 > limits_.max_recursion_depth)
    raise("LimitError", "maximum recursion depth exceeded in macro '" + name +
                            "' (max_recursion_depth " +
                            std::to_string(limits_.max_recursion_depth) + ")");
  auto scope = std::make_shared<Scope>();
  scope->parent = def_scope;
  const size_t n = s.params.size();
  std::vector<bool> bound(n, false);
  std::vector<Value> varargs;
  for (size_t i = 0; i < args.positional.size(); ++i) {
    if (i < n) {
      scope->set(s.params[i], args.positional[i]);
      bound[i] = true;
    } else if (s.uses_varargs || s.kind == StmtKind::CallBlock) {
      varargs.push_back(args.positional[i]);
    } else {
      raise("TypeError",
            "macro '" + name + "' takes not more than " + std::to_string(n) + " argument(s)");
    }
  }
  DictObject kwargs;
  Value caller;
  bool has_caller = false;
  for (auto& [key, value] : args.keyword) {
    size_t idx = n;
    for (size_t i = 0; i < n; ++i)
      if (s.params[i] == key) idx = i;
    if (idx < n) {
      if (bound[idx])
        raise("TypeError", "macro '" + name + "' got multiple values for argument '" + key + "'");
      scope->set(key, value);
      bound[idx] = true;
    } else if (key == "caller" && s.kind == StmtKind::Macro) {
      caller = value;
      has_caller = true;
    } else if (s.uses_kwargs) {
      kwargs.set(Value(key), value);
    } else {
      raise("TypeError", "macro '" + name + "' takes no keyword argument '" + key + "'");
    }
  }
  for (size_t i = 0; i < n; ++i) {
    if (bound[i]) continue;
    if (s.defaults[i])
      scope->set(s.params[i], eval(*s.defaults[i], scope));
    else
      scope->set(s.params[i],
                 Value::undefined("parameter " + repr_string(s.params[i]) + " was not provided"));
  }
  if (s.kind == StmtKind::Macro) {
    scope->set("varargs", Value::list(std::move(varargs), true));
    scope->set("kwargs", Value::dict(std::move(kwargs)));
    if (has_caller) scope->set("caller", caller);
  }
  ++depth_;
  std::string text;
  try {
    text = capture(s.body, scope);
  } catch (...) {
    --depth_;
    throw;
  }
  --depth_;
  return Value(std::move(text));
}

// ---- expressions --------------------------------------------------------------------------------

Value Interpreter::call(const Value& callee, CallArgs& args) {
  if (callee.is_callable()) return callee.as_callable().fn(*this, args);
  if (callee.is_undefined()) callee.fail_undefined();
  raise("TypeError", "'" + type_name(callee) + "' object is not callable");
}

Value Interpreter::apply_filter(const std::string& name, const Value& subject, CallArgs& args) {
  return builtin_filter(*this, name, subject, args);
}

bool Interpreter::apply_test(const std::string& name, const Value& subject, CallArgs& args) {
  return builtin_test(*this, name, subject, args);
}

Value Interpreter::getattr(const Value& obj, const std::string& name) {
  if (obj.is_undefined()) obj.fail_undefined();
  if (name.size() > 1 && name[0] == '_' && name[1] == '_')
    return Value::undefined("access to attribute " + repr_string(name) + " of " +
                                repr_string(type_name(obj)) + " object is unsafe.",
                            "SecurityError");
  if (auto method = builtin_method(obj, name)) return *method;
  if (obj.is_dict()) {
    if (const Value* v = obj.as_dict().find(Value(name))) return *v;
  } else if (obj.is_namespace()) {
    if (const Value* v = obj.as_namespace().find(name)) return *v;
  } else if (obj.is_loop()) {
    const LoopObject& loop = obj.as_loop();
    const auto& items = loop.items->items;
    const int64_t len = static_cast<int64_t>(items.size());
    const int64_t i = static_cast<int64_t>(loop.index0);
    if (name == "index") return Value(i + 1);
    if (name == "index0") return Value(i);
    if (name == "revindex") return Value(len - i);
    if (name == "revindex0") return Value(len - i - 1);
    if (name == "first") return Value(i == 0);
    if (name == "last") return Value(i == len - 1);
    if (name == "length") return Value(len);
    if (name == "depth") return Value(static_cast<int64_t>(loop.depth0 + 1));
    if (name == "depth0") return Value(static_cast<int64_t>(loop.depth0));
    if (name == "previtem")
      return i > 0 ? items[i - 1] : Value::undefined("there is no previous item");
    if (name == "nextitem")
      return i + 1 < len ? items[i + 1] : Value::undefined("there is no next item");
    if (name == "cycle") {
      const int64_t index0 = i;
      return Value::callable("cycle", [index0](Interpreter&, CallArgs& a) -> Value {
        if (a.positional.empty()) raise("TypeError", "no items for cycling given");
        return a.positional[index0 % static_cast<int64_t>(a.positional.size())];
      });
    }
  }
  return Value::undefined(repr_string(object_type_repr(obj)) + " has no attribute " +
                          repr_string(name));
}

Value Interpreter::getitem(const Value& obj, const Value& key) {
  if (obj.is_undefined()) obj.fail_undefined();
  if (obj.is_dict()) {
    if (const Value* v = obj.as_dict().find(key)) return *v;
  } else if ((obj.is_list() || obj.is_string()) && (key.is_int() || key.is_bool())) {
    const bool is_list = obj.is_list();
    int64_t index = key.int_value();
    if (is_list) {
      const auto& items = obj.as_list().items;
      const int64_t len = static_cast<int64_t>(items.size());
      if (index < 0) index += len;
      if (index >= 0 && index < len) return items[index];
    } else {
      const std::u32string cps = decode_utf8(obj.as_string());
      const int64_t len = static_cast<int64_t>(cps.size());
      if (index < 0) index += len;
      if (index >= 0 && index < len) {
        std::string c;
        append_utf8(c, cps[index]);
        return Value(std::move(c));
      }
    }
    return Value::undefined(object_type_repr(obj) + " has no element " + py_repr(key));
  }
  if (key.is_string()) {
    if (obj.is_dict() || obj.is_namespace() || obj.is_loop() || obj.is_string() || obj.is_list()) {
      Value v = getattr(obj, key.as_string());
      return v;
    }
    return Value::undefined(repr_string(object_type_repr(obj)) + " has no attribute " +
                            repr_string(key.as_string()));
  }
  return Value::undefined(object_type_repr(obj) + " has no element " + py_repr(key));
}

Value Interpreter::eval(const Expr& e, const ScopePtr& scope) {
  try {
    return eval_inner(e, scope);
  } catch (JinjaError& err) {
    if (err.line == 0) err.line = e.line;
    throw;
  }
}

void Interpreter::eval_args(const Expr& e, size_t first, const ScopePtr& scope, CallArgs& args) {
  for (size_t i = first; i < e.children.size(); ++i)
    args.positional.push_back(eval(*e.children[i], scope));
  for (const auto& [key, value] : e.kwargs) args.keyword.emplace_back(key, eval(*value, scope));
  if (e.star_args)
    for (auto& v : iterate(eval(*e.star_args, scope))) args.positional.push_back(std::move(v));
  if (e.star_kwargs) {
    Value d = eval(*e.star_kwargs, scope);
    if (!d.is_dict())
      raise("TypeError", "argument after ** must be a mapping, not " + type_name(d));
    for (const auto& [k, v] : d.as_dict().items) args.keyword.emplace_back(py_str(k), v);
  }
}

Value Interpreter::eval_filter(const Expr& e, const ScopePtr& scope, const Value* subject) {
  Value input = e.children[0] ? eval(*e.children[0], scope) : (subject ? *subject : Value());
  if (!e.children[0] && !subject) raise("TemplateRuntimeError", "filter without input");
  CallArgs args;
  eval_args(e, 1, scope, args);
  try {
    return apply_filter(e.name, input, args);
  } catch (JinjaError& err) {
    if (err.line == 0) err.line = e.line;
    throw;
  }
}

Value Interpreter::eval_inner(const Expr& e, const ScopePtr& scope) {
  switch (e.kind) {
    case ExprKind::Const:
      return e.value;
    case ExprKind::Name: {
      if (e.name == "loop") {
        // `loop(...)` inside a recursive loop calls the recursion helper.
        if (const Value* v = scope->lookup(e.name)) return *v;
      }
      if (const Value* v = scope->lookup(e.name)) return *v;
      return Value::undefined(repr_string(e.name) + " is undefined");
    }
    case ExprKind::GetAttr:
      return getattr(eval(*e.children[0], scope), e.name);
    case ExprKind::GetItem: {
      Value obj = eval(*e.children[0], scope);
      const Expr& key = *e.children[1];
      if (key.kind == ExprKind::Slice) {
        Value parts[3];
        for (int i = 0; i < 3; ++i)
          parts[i] = key.children[i] ? eval(*key.children[i], scope) : Value(nullptr);
        if (obj.is_undefined()) obj.fail_undefined();
        if (auto sliced = slice_value(obj, parts[0], parts[1], parts[2])) return *sliced;
        return Value::undefined(object_type_repr(obj) + " has no element slice");
      }
      return getitem(obj, eval(key, scope));
    }
    case ExprKind::Slice:
      raise("TemplateSyntaxError", "slice outside of a subscript");
    case ExprKind::List:
    case ExprKind::Tuple: {
      std::vector<Value> items;
      items.reserve(e.children.size());
      for (const auto& c : e.children) items.push_back(eval(*c, scope));
      return Value::list(std::move(items), e.kind == ExprKind::Tuple);
    }
    case ExprKind::Dict: {
      DictObject d;
      for (size_t i = 0; i + 1 < e.children.size(); i += 2) {
        Value k = eval(*e.children[i], scope);
        if (k.is_list() && !k.as_list().is_tuple) raise("TypeError", "unhashable type: 'list'");
        if (k.is_dict()) raise("TypeError", "unhashable type: 'dict'");
        d.set(std::move(k), eval(*e.children[i + 1], scope));
      }
      return Value::dict(std::move(d));
    }
    case ExprKind::Unary: {
      Value a = eval(*e.children[0], scope);
      if (e.name == "not") return Value(!truthy(a));
      return unary_op(e.name, a);
    }
    case ExprKind::Binary: {
      if (e.name == "and") {
        Value a = eval(*e.children[0], scope);
        return truthy(a) ? eval(*e.children[1], scope) : a;
      }
      if (e.name == "or") {
        Value a = eval(*e.children[0], scope);
        return truthy(a) ? a : eval(*e.children[1], scope);
      }
      Value a = eval(*e.children[0], scope);
      Value b = eval(*e.children[1], scope);
      return binary_op(*this, e.name, a, b);
    }
    case ExprKind::Compare: {
      Value left = eval(*e.children[0], scope);
      for (size_t i = 0; i < e.ops.size(); ++i) {
        Value right = eval(*e.children[i + 1], scope);
        const std::string& op = e.ops[i];
        bool result;
        if (op == "==")
          result = py_eq(left, right);
        else if (op == "!=")
          result = !py_eq(left, right);
        else if (op == "<")
          result = py_lt(left, right);
        else if (op == ">")
          result = py_lt(right, left);
        else if (op == "<=")
          result = py_lt(left, right) || py_eq(left, right);
        else if (op == ">=")
          result = py_lt(right, left) || py_eq(left, right);
        else if (op == "in")
          result = contains(right, left);
        else
          result = !contains(right, left);
        if (!result) return Value(false);
        left = std::move(right);
      }
      return Value(true);
    }
    case ExprKind::CondExpr: {
      if (truthy(eval(*e.children[1], scope))) return eval(*e.children[0], scope);
      if (e.children[2]) return eval(*e.children[2], scope);
      return Value::undefined("the inline if-expression on line " + std::to_string(e.line) +
                              " evaluated to false and no else section was defined.");
    }
    case ExprKind::Filter:
      return eval_filter(e, scope, nullptr);
    case ExprKind::Test: {
      Value subject = eval(*e.children[0], scope);
      CallArgs args;
      eval_args(e, 1, scope, args);
      return Value(apply_test(e.name, subject, args));
    }
    case ExprKind::Call: {
      const Expr& callee_expr = *e.children[0];
      Value callee;
      if (callee_expr.kind == ExprKind::Name && callee_expr.name == "loop") {
        if (const Value* r = scope->lookup("__loop_recurse__"))
          callee = *r;
        else
          callee = eval(callee_expr, scope);
      } else {
        callee = eval(callee_expr, scope);
      }
      CallArgs args;
      eval_args(e, 1, scope, args);
      if (depth_ + 1 > limits_.max_recursion_depth)
        raise("LimitError", "maximum recursion depth exceeded (max_recursion_depth " +
                                std::to_string(limits_.max_recursion_depth) + ")");
      return call(callee, args);
    }
    case ExprKind::NamespaceRef:
      raise("TemplateSyntaxError", "namespace reference outside of set");
  }
  return Value();
}

}  // namespace moetune::jinja
