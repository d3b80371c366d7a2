// Recursive-descent parser of Jinja templates (see parser.h); function names follow
// jinja2/parser.py so the two can be read side by side.
#include "data/jinja/parser.h"

#include <cstdlib>
#include <set>

#include "data/jinja/lexer.h"

namespace moetune::jinja {

namespace {

constexpr int kMaxNesting = 200;

const std::set<std::string>& known_filters() {
  static const std::set<std::string> names = {
      "abs",       "attr",       "batch",       "capitalize", "center",  "count",
      "d",         "default",    "dictsort",    "e",          "escape",  "filesizeformat",
      "first",     "float",      "forceescape", "format",     "groupby", "indent",
      "int",       "join",       "last",        "length",     "list",    "lower",
      "items",     "map",        "min",         "max",        "pprint",  "random",
      "reject",    "rejectattr", "replace",     "reverse",    "round",   "safe",
      "select",    "selectattr", "slice",       "sort",       "string",  "striptags",
      "sum",       "title",      "trim",        "truncate",   "unique",  "upper",
      "urlencode", "urlize",     "wordcount",   "wordwrap",   "xmlattr", "tojson"};
  return names;
}

const std::set<std::string>& known_tests() {
  static const std::set<std::string> names = {
      "odd",    "even",     "divisibleby", "defined",     "undefined", "filter",   "test",
      "none",   "boolean",  "false",       "true",        "integer",   "float",    "lower",
      "upper",  "string",   "mapping",     "number",      "sequence",  "iterable", "callable",
      "sameas", "escaped",  "in",          "==",          "eq",        "equalto",  "!=",
      "ne",     ">",        "gt",          "greaterthan", "ge",        ">=",       "<",
      "lt",     "lessthan", "<=",          "le"};
  return names;
}

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : tokens_(std::move(tokens)) {}

  ParsedTemplate run() {
    ParsedTemplate result;
    result.body = subparse({});
    result.has_generation = has_generation_;
    return result;
  }

 private:
  // ---- token stream ----
  const Token& current() const { return tokens_[pos_]; }
  const Token& look(size_t ahead = 1) const {
    return tokens_[std::min(pos_ + ahead, tokens_.size() - 1)];
  }
  const Token& next() {
    const Token& t = tokens_[pos_];
    if (pos_ + 1 < tokens_.size()) ++pos_;
    return t;
  }
  bool is_op(const char* op) const {
    return current().type == TokenType::Operator && current().value == op;
  }
  bool is_name(const char* name) const {
    return current().type == TokenType::Name && current().value == name;
  }
  bool skip_op(const char* op) {
    if (!is_op(op)) return false;
    next();
    return true;
  }
  bool skip_name(const char* name) {
    if (!is_name(name)) return false;
    next();
    return true;
  }
  [[noreturn]] void fail(const std::string& message, int line) const {
    throw JinjaError("TemplateSyntaxError", message, line);
  }
  [[noreturn]] void fail_unexpected(const Token& t, const std::string& expected) const {
    if (t.type == TokenType::End)
      fail("unexpected end of template, expected '" + expected + "'.", t.line);
    fail("expected token '" + expected + "', got '" + describe(t) + "'", t.line);
  }
  void expect_op(const char* op) {
    if (!skip_op(op)) fail_unexpected(current(), op);
  }
  std::string expect_name() {
    if (current().type != TokenType::Name) fail_unexpected(current(), "name");
    return next().value;
  }
  void expect_block_end() {
    if (current().type != TokenType::BlockEnd) fail_unexpected(current(), "end of statement block");
    next();
  }

  struct DepthGuard {
    Parser& p;
    explicit DepthGuard(Parser& parser) : p(parser) {
      if (++p.depth_ > kMaxNesting)
        p.fail("template nesting too deep (more than " + std::to_string(kMaxNesting) + " levels)",
               p.current().line);
    }
    ~DepthGuard() { --p.depth_; }
  };

  ExprPtr make(ExprKind kind, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line;
    return e;
  }

  // ---- statements ----
  Body subparse(const std::vector<std::string>& end_tokens) {
    DepthGuard guard(*this);
    end_token_stack_.push_back(end_tokens);
    struct Pop {
      std::vector<std::vector<std::string>>& stack;
      ~Pop() { stack.pop_back(); }
    } pop{end_token_stack_};
    Body body;
    while (true) {
      const Token& t = current();
      if (t.type == TokenType::End) {
        if (!end_tokens.empty()) {
          std::string names;
          for (size_t i = 0; i < end_tokens.size(); ++i)
            names += (i ? " or '" : "'") + end_tokens[i] + "'";
          fail("Unexpected end of template. Jinja was looking for the following tags: " + names +
                   ". The innermost block that needs to be closed is '" + block_stack_.back() +
                   "'.",
               t.line);
        }
        return body;
      }
      if (t.type == TokenType::Data) {
        auto s = std::make_unique<Stmt>();
        s->kind = StmtKind::Data;
        s->line = t.line;
        s->text = t.value;
        body.push_back(std::move(s));
        next();
      } else if (t.type == TokenType::VariableBegin) {
        next();
        auto s = std::make_unique<Stmt>();
        s->kind = StmtKind::Output;
        s->line = t.line;
        s->expr = parse_tuple(true, {}, false);
        if (current().type != TokenType::VariableEnd)
          fail_unexpected(current(), "end of print statement");
        next();
        body.push_back(std::move(s));
      } else if (t.type == TokenType::BlockBegin) {
        next();
        if (current().type == TokenType::Name)
          for (const auto& end : end_tokens)
            if (current().value == end) return body;
        body.push_back(parse_statement());
      } else {
        fail("unexpected '" + describe(t) + "'", t.line);
      }
    }
  }

  // Parses a block up to one of `end_tokens`; leaves the end tag's name as current token.
  Body parse_statements(const std::vector<std::string>& end_tokens, bool drop_needle) {
    expect_block_end();
    Body body = subparse(end_tokens);
    if (drop_needle) next();
    return body;
  }

  StmtPtr parse_statement() {
    const Token& t = current();
    if (t.type != TokenType::Name) fail("tag name expected", t.line);
    const std::string tag = t.value;
    const int line = t.line;
    auto s = std::make_unique<Stmt>();
    s->line = line;
    block_stack_.push_back(tag);
    next();
    if (tag == "for") {
      parse_for(*s);
    } else if (tag == "if") {
      parse_if(*s);
    } else if (tag == "set") {
      parse_set(*s);
    } else if (tag == "macro") {
      parse_macro(*s);
    } else if (tag == "call") {
      parse_call_block(*s);
    } else if (tag == "filter") {
      s->kind = StmtKind::FilterBlock;
      s->filter = parse_filter(nullptr, true);
      s->body = parse_statements({"endfilter"}, true);
    } else if (tag == "with") {
      s->kind = StmtKind::With;
      while (current().type != TokenType::BlockEnd) {
        if (!s->with_targets.empty()) expect_op(",");
        s->with_targets.push_back(parse_assign_target(false));
        expect_op("=");
        s->with_values.push_back(parse_expression(true));
      }
      s->body = parse_statements({"endwith"}, true);
    } else if (tag == "block") {
      s->kind = StmtKind::With;  // without extends, a block renders in place with its own scope
      expect_name();
      while (is_name("scoped") || is_name("required")) next();
      s->body = parse_statements({"endblock"}, true);
      if (current().type == TokenType::Name) next();
    } else if (tag == "break" || tag == "continue") {
      s->kind = tag == "break" ? StmtKind::Break : StmtKind::Continue;
      if (loop_depth_ == 0) fail("'" + tag + "' outside loop", line);
    } else if (tag == "generation") {
      s->kind = StmtKind::Generation;
      has_generation_ = true;
      s->body = parse_statements({"endgeneration"}, true);
    } else {
      block_stack_.pop_back();
      if (!block_stack_.empty() && !end_token_stack_.empty() && !end_token_stack_.back().empty()) {
        std::string names;
        for (const auto& end : end_token_stack_.back())
          names += (names.empty() ? "'" : " or '") + end + "'";
        fail("Encountered unknown tag '" + tag +
                 "'. Jinja was looking for the following tags: " + names +
                 ". The innermost block that needs to be closed is '" + block_stack_.back() + "'.",
             line);
      }
      fail("Encountered unknown tag '" + tag + "'.", line);
    }
    block_stack_.pop_back();
    expect_block_end();
    return s;
  }

  void parse_for(Stmt& s) {
    s.kind = StmtKind::For;
    s.target = parse_assign_target(true, "in");
    if (!skip_name("in")) fail_unexpected(current(), "in");
    s.expr = parse_tuple(false, "recursive", false);
    if (skip_name("if")) s.condition = parse_expression(true);
    if (skip_name("recursive")) s.recursive = true;
    ++loop_depth_;
    s.body = parse_statements({"endfor", "else"}, false);
    --loop_depth_;
    if (next().value != "endfor") s.else_body = parse_statements({"endfor"}, true);
  }

  void parse_if(Stmt& s) {
    s.kind = StmtKind::If;
    while (true) {
      s.conditions.push_back(parse_tuple(false, {}, false));
      s.bodies.push_back(parse_statements({"elif", "else", "endif"}, false));
      const std::string token = next().value;
      if (token == "elif") continue;
      if (token == "else") s.else_body = parse_statements({"endif"}, true);
      break;
    }
  }

  void parse_set(Stmt& s) {
    s.target = parse_assign_target(true, {}, true);
    if (skip_op("=")) {
      s.kind = StmtKind::Set;
      s.expr = parse_tuple(true, {}, false);
      return;
    }
    if (s.target->kind != ExprKind::Name)
      fail("expected token '=', got '" + describe(current()) + "'", current().line);
    s.kind = StmtKind::SetBlock;
    if (is_op("|")) s.filter = parse_filter(nullptr, false);
    s.body = parse_statements({"endset"}, true);
  }

  void parse_signature(Stmt& s) {
    expect_op("(");
    while (!is_op(")")) {
      if (!s.params.empty()) expect_op(",");
      if (is_op(")")) break;
      s.params.push_back(expect_name());
      if (skip_op("=")) {
        s.defaults.push_back(parse_expression(true));
      } else {
        if (!s.defaults.empty() && s.defaults.back())
          fail("non-default argument follows default argument", current().line);
        s.defaults.push_back(nullptr);
      }
    }
    next();
  }

  void parse_macro(Stmt& s) {
    s.kind = StmtKind::Macro;
    s.name = expect_name();
    parse_signature(s);
    macro_stack_.push_back(&s);
    const int saved_loops = loop_depth_;
    loop_depth_ = 0;
    s.body = parse_statements({"endmacro"}, true);
    loop_depth_ = saved_loops;
    macro_stack_.pop_back();
  }

  void parse_call_block(Stmt& s) {
    s.kind = StmtKind::CallBlock;
    if (is_op("(")) parse_signature(s);
    const int line = current().line;
    s.expr = parse_expression(true);
    if (s.expr->kind != ExprKind::Call) fail("expected call", line);
    s.body = parse_statements({"endcall"}, true);
  }

  // A name, a tuple of names, or (with_namespace) ns.attr.
  ExprPtr parse_assign_target(bool with_tuple, const std::string& end_name = {},
                              bool with_namespace = false) {
    const int line = current().line;
    if (with_namespace && current().type == TokenType::Name && look().type == TokenType::Operator &&
        look().value == ".") {
      auto ns = make(ExprKind::Name, line);
      ns->name = next().value;
      next();
      auto ref = make(ExprKind::NamespaceRef, line);
      ref->name = expect_name();
      ref->children.push_back(std::move(ns));
      return ref;
    }
    std::vector<ExprPtr> names;
    bool is_tuple = false;
    const bool paren = with_tuple && skip_op("(");
    while (true) {
      if (!names.empty()) {
        if (!skip_op(",")) break;
        is_tuple = true;
        if (paren && is_op(")")) break;
        if (!end_name.empty() && is_name(end_name.c_str())) break;
      }
      if (current().type != TokenType::Name)
        fail("can't assign to '" + describe(current()) + "'", current().line);
      auto n = make(ExprKind::Name, current().line);
      n->name = next().value;
      if (n->name == "true" || n->name == "false" || n->name == "none" || n->name == "True" ||
          n->name == "False" || n->name == "None")
        fail("Can't assign to special constant '" + n->name + "'", line);
      names.push_back(std::move(n));
      if (!with_tuple) break;
    }
    if (paren) {
      expect_op(")");
      is_tuple = true;
    }
    if (!is_tuple) return std::move(names[0]);
    auto t = make(ExprKind::Tuple, line);
    t->children = std::move(names);
    return t;
  }

  // ---- expressions ----
  bool is_tuple_end(const std::string& extra_end) const {
    const Token& t = current();
    if (t.type == TokenType::VariableEnd || t.type == TokenType::BlockEnd ||
        t.type == TokenType::End)
      return true;
    if (t.type == TokenType::Operator && t.value == ")") return true;
    return !extra_end.empty() && t.type == TokenType::Name && t.value == extra_end;
  }

  ExprPtr parse_tuple(bool with_condexpr, const std::string& extra_end, bool explicit_parentheses) {
    const int line = current().line;
    std::vector<ExprPtr> args;
    bool is_tuple = false;
    while (true) {
      if (!args.empty()) expect_op(",");
      if (is_tuple_end(extra_end)) break;
      args.push_back(parse_expression(with_condexpr));
      if (is_op(","))
        is_tuple = true;
      else
        break;
    }
    if (!is_tuple) {
      if (!args.empty()) return std::move(args[0]);
      if (!explicit_parentheses)
        fail("Expected an expression, got '" + describe(current()) + "'", current().line);
    }
    auto t = make(ExprKind::Tuple, line);
    t->children = std::move(args);
    return t;
  }

  ExprPtr parse_expression(bool with_condexpr) {
    DepthGuard guard(*this);
    return with_condexpr ? parse_condexpr() : parse_or();
  }

  ExprPtr parse_condexpr() {
    const int line = current().line;
    ExprPtr expr1 = parse_or();
    while (skip_name("if")) {
      ExprPtr expr2 = parse_or();
      ExprPtr expr3 = skip_name("else") ? parse_condexpr() : nullptr;
      auto c = make(ExprKind::CondExpr, line);
      c->children.push_back(std::move(expr1));
      c->children.push_back(std::move(expr2));
      c->children.push_back(std::move(expr3));
      expr1 = std::move(c);
    }
    return expr1;
  }

  ExprPtr binary(const std::string& op, ExprPtr a, ExprPtr b, int line) {
    auto e = make(ExprKind::Binary, line);
    e->name = op;
    e->children.push_back(std::move(a));
    e->children.push_back(std::move(b));
    return e;
  }

  ExprPtr parse_or() {
    ExprPtr left = parse_and();
    while (is_name("or")) {
      const int line = next().line;
      left = binary("or", std::move(left), parse_and(), line);
    }
    return left;
  }

  ExprPtr parse_and() {
    ExprPtr left = parse_not();
    while (is_name("and")) {
      const int line = next().line;
      left = binary("and", std::move(left), parse_not(), line);
    }
    return left;
  }

  ExprPtr parse_not() {
    if (is_name("not")) {
      DepthGuard guard(*this);
      const int line = next().line;
      auto e = make(ExprKind::Unary, line);
      e->name = "not";
      e->children.push_back(parse_not());
      return e;
    }
    return parse_compare();
  }

  ExprPtr parse_compare() {
    const int line = current().line;
    ExprPtr expr = parse_math1();
    std::vector<ExprPtr> operands;
    std::vector<std::string> ops;
    while (true) {
      const Token& t = current();
      if (t.type == TokenType::Operator && (t.value == "==" || t.value == "!=" || t.value == "<" ||
                                            t.value == "<=" || t.value == ">" || t.value == ">=")) {
        ops.push_back(next().value);
      } else if (is_name("in")) {
        next();
        ops.push_back("in");
      } else if (is_name("not") && look().type == TokenType::Name && look().value == "in") {
        next(), next();
        ops.push_back("notin");
      } else {
        break;
      }
      operands.push_back(parse_math1());
    }
    if (ops.empty()) return expr;
    auto c = make(ExprKind::Compare, line);
    c->children.push_back(std::move(expr));
    for (auto& o : operands) c->children.push_back(std::move(o));
    c->ops = std::move(ops);
    return c;
  }

  ExprPtr parse_math1() {
    ExprPtr left = parse_concat();
    while (is_op("+") || is_op("-")) {
      const Token& t = next();
      left = binary(t.value, std::move(left), parse_concat(), t.line);
    }
    return left;
  }

  ExprPtr parse_concat() {
    ExprPtr left = parse_math2();
    while (is_op("~")) {
      const int line = next().line;
      left = binary("~", std::move(left), parse_math2(), line);
    }
    return left;
  }

  ExprPtr parse_math2() {
    ExprPtr left = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const Token& t = next();
      left = binary(t.value, std::move(left), parse_pow(), t.line);
    }
    return left;
  }

  ExprPtr parse_pow() {
    ExprPtr left = parse_unary(true);
    while (is_op("**")) {
      const int line = next().line;
      left = binary("**", std::move(left), parse_unary(true), line);
    }
    return left;
  }

  ExprPtr parse_unary(bool with_filter) {
    DepthGuard guard(*this);
    const int line = current().line;
    ExprPtr node;
    if (is_op("-") || is_op("+")) {
      const std::string op = next().value;
      node = make(ExprKind::Unary, line);
      node->name = op;
      node->children.push_back(parse_unary(false));
    } else {
      node = parse_primary();
    }
    node = parse_postfix(std::move(node));
    if (with_filter) node = parse_filter_expr(std::move(node));
    return node;
  }

  ExprPtr parse_primary() {
    const Token& t = current();
    const int line = t.line;
    if (t.type == TokenType::Name) {
      next();
      auto e = make(ExprKind::Const, line);
      if (t.value == "true" || t.value == "True")
        e->value = Value(true);
      else if (t.value == "false" || t.value == "False")
        e->value = Value(false);
      else if (t.value == "none" || t.value == "None")
        e->value = Value(nullptr);
      else {
        e->kind = ExprKind::Name;
        e->name = t.value;
        if (!macro_stack_.empty()) {
          if (t.value == "caller") macro_stack_.back()->uses_caller = true;
          if (t.value == "varargs") macro_stack_.back()->uses_varargs = true;
          if (t.value == "kwargs") macro_stack_.back()->uses_kwargs = true;
        }
      }
      return e;
    }
    if (t.type == TokenType::String) {
      std::string s;
      while (current().type == TokenType::String) s += next().value;
      auto e = make(ExprKind::Const, line);
      e->value = Value(std::move(s));
      return e;
    }
    if (t.type == TokenType::Integer || t.type == TokenType::Float) {
      next();
      auto e = make(ExprKind::Const, line);
      if (t.type == TokenType::Integer) {
        errno = 0;
        const long long v = std::strtoll(t.value.c_str(), nullptr, 10);
        if (errno == ERANGE) fail("integer literal too large", line);
        e->value = Value(static_cast<int64_t>(v));
      } else {
        e->value = Value(std::strtod(t.value.c_str(), nullptr));
      }
      return e;
    }
    if (t.type == TokenType::Operator && t.value == "(") {
      next();
      ExprPtr e = parse_tuple(true, {}, true);
      expect_op(")");
      return e;
    }
    if (t.type == TokenType::Operator && t.value == "[") {
      next();
      auto e = make(ExprKind::List, line);
      while (!is_op("]")) {
        if (!e->children.empty()) expect_op(",");
        if (is_op("]")) break;
        e->children.push_back(parse_expression(true));
      }
      expect_op("]");
      return e;
    }
    if (t.type == TokenType::Operator && t.value == "{") {
      next();
      auto e = make(ExprKind::Dict, line);
      while (!is_op("}")) {
        if (!e->children.empty()) expect_op(",");
        if (is_op("}")) break;
        e->children.push_back(parse_expression(true));
        expect_op(":");
        e->children.push_back(parse_expression(true));
      }
      expect_op("}");
      return e;
    }
    if (t.type == TokenType::End) fail("unexpected end of template", line);
    fail("unexpected '" + describe(t) + "'", line);
  }

  ExprPtr parse_postfix(ExprPtr node) {
    while (true) {
      if (is_op(".") || is_op("[")) {
        node = parse_subscript(std::move(node));
      } else if (is_op("(")) {
        node = parse_call(std::move(node));
      } else {
        return node;
      }
    }
  }

  ExprPtr parse_filter_expr(ExprPtr node) {
    while (true) {
      if (is_op("|")) {
        node = parse_filter(std::move(node), false);
      } else if (is_name("is")) {
        node = parse_test(std::move(node));
      } else if (is_op("(")) {
        node = parse_call(std::move(node));
      } else {
        return node;
      }
    }
  }

  ExprPtr parse_subscript(ExprPtr node) {
    const Token& t = next();
    if (t.value == ".") {
      const Token& attr = current();
      if (attr.type == TokenType::Name) {
        next();
        auto e = make(ExprKind::GetAttr, t.line);
        e->name = attr.value;
        e->children.push_back(std::move(node));
        return e;
      }
      if (attr.type == TokenType::Integer) {
        next();
        auto e = make(ExprKind::GetItem, t.line);
        auto index = make(ExprKind::Const, t.line);
        index->value = Value(static_cast<int64_t>(std::strtoll(attr.value.c_str(), nullptr, 10)));
        e->children.push_back(std::move(node));
        e->children.push_back(std::move(index));
        return e;
      }
      fail("expected name or number", attr.line);
    }
    std::vector<ExprPtr> args;
    while (!is_op("]")) {
      if (!args.empty()) expect_op(",");
      args.push_back(parse_subscribed());
    }
    expect_op("]");
    auto e = make(ExprKind::GetItem, t.line);
    e->children.push_back(std::move(node));
    if (args.size() == 1) {
      e->children.push_back(std::move(args[0]));
    } else {
      auto tuple = make(ExprKind::Tuple, t.line);
      tuple->children = std::move(args);
      e->children.push_back(std::move(tuple));
    }
    return e;
  }

  ExprPtr parse_subscribed() {
    const int line = current().line;
    std::vector<ExprPtr> args;
    if (is_op(":")) {
      next();
      args.push_back(nullptr);
    } else {
      ExprPtr node = parse_expression(true);
      if (!is_op(":")) return node;
      next();
      args.push_back(std::move(node));
    }
    auto stop_or_step_end = [&] { return is_op("]") || is_op(","); };
    if (is_op(":"))
      args.push_back(nullptr);
    else if (!stop_or_step_end())
      args.push_back(parse_expression(true));
    else
      args.push_back(nullptr);
    if (is_op(":")) {
      next();
      if (!stop_or_step_end())
        args.push_back(parse_expression(true));
      else
        args.push_back(nullptr);
    } else {
      args.push_back(nullptr);
    }
    auto e = make(ExprKind::Slice, line);
    e->children = std::move(args);
    return e;
  }

  // Parses `( args )` into e's children (after any already there) and kwargs.
  void parse_call_args(Expr& e) {
    expect_op("(");
    bool first = true;
    while (!is_op(")")) {
      if (!first) expect_op(",");
      first = false;
      if (is_op(")")) break;
      if (is_op("*") || is_op("**")) {
        const bool star2 = next().value == "**";
        (star2 ? e.star_kwargs : e.star_args) = parse_expression(true);
        continue;
      }
      if (current().type == TokenType::Name && look().type == TokenType::Operator &&
          look().value == "=") {
        std::string key = next().value;
        next();
        e.kwargs.emplace_back(std::move(key), parse_expression(true));
        continue;
      }
      if (!e.kwargs.empty() || e.star_args || e.star_kwargs)
        fail("Invalid argument syntax", current().line);
      e.children.push_back(parse_expression(true));
    }
    next();
  }

  ExprPtr parse_call(ExprPtr node) {
    auto e = make(ExprKind::Call, current().line);
    e->children.push_back(std::move(node));
    parse_call_args(*e);
    return e;
  }

  std::string parse_dotted_name() {
    std::string name = expect_name();
    while (is_op(".")) {
      next();
      name += "." + expect_name();
    }
    return name;
  }

  ExprPtr parse_filter(ExprPtr node, bool start_inline) {
    while (is_op("|") || start_inline) {
      if (!start_inline) next();
      start_inline = false;
      const int line = current().line;
      auto e = make(ExprKind::Filter, line);
      e->name = parse_dotted_name();
      if (!known_filters().count(e->name))
        throw JinjaError("TemplateAssertionError", "No filter named '" + e->name + "'.", line);
      e->children.push_back(std::move(node));
      if (is_op("(")) parse_call_args(*e);
      node = std::move(e);
    }
    return node;
  }

  ExprPtr parse_test(ExprPtr node) {
    const int line = next().line;  // 'is'
    const bool negated = skip_name("not");
    auto e = make(ExprKind::Test, line);
    e->name = parse_dotted_name();
    if (!known_tests().count(e->name))
      throw JinjaError("TemplateAssertionError", "No test named '" + e->name + "'.", line);
    e->children.push_back(std::move(node));
    const Token& t = current();
    if (is_op("(")) {
      parse_call_args(*e);
    } else if ((t.type == TokenType::Name || t.type == TokenType::String ||
                t.type == TokenType::Integer || t.type == TokenType::Float || is_op("[") ||
                is_op("{")) &&
               !is_name("else") && !is_name("or") && !is_name("and")) {
      if (is_name("is")) fail("You cannot chain multiple tests with is", t.line);
      e->children.push_back(parse_postfix(parse_primary()));
    }
    if (!negated) return e;
    auto n = make(ExprKind::Unary, line);
    n->name = "not";
    n->children.push_back(std::move(e));
    return n;
  }

  std::vector<Token> tokens_;
  size_t pos_ = 0;
  int depth_ = 0;
  bool has_generation_ = false;
  std::vector<std::string> block_stack_;
  std::vector<std::vector<std::string>> end_token_stack_;
  int loop_depth_ = 0;
  std::vector<Stmt*> macro_stack_;
};

}  // namespace

bool is_known_filter(const std::string& name) { return known_filters().count(name) > 0; }
bool is_known_test(const std::string& name) { return known_tests().count(name) > 0; }

ParsedTemplate parse_template(const std::string& source) { return Parser(tokenize(source)).run(); }

}  // namespace moetune::jinja
