// Syntax tree of a parsed Jinja template: expressions (Expr) and statements (Stmt), one
// struct each with a kind tag and generic child slots (llm.c style: plain data, no virtuals).
// Every node carries its template line so runtime errors can name it.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "data/jinja/value.h"

namespace moetune::jinja {

struct Expr;
struct Stmt;
using ExprPtr = std::unique_ptr<Expr>;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

enum class ExprKind {
  Const,         // value
  Name,          // name
  GetAttr,       // a.name                    children: [a]
  GetItem,       // a[b]                      children: [a, b]
  Slice,         // start:stop:step           children: [start?, stop?, step?] (null = omitted)
  List,          // [a, b]                    children
  Tuple,         // (a, b)                    children
  Dict,          // {k: v}                    children: k0, v0, k1, v1, ...
  Unary,         // op in name: "not", "-", "+"     children: [a]
  Binary,        // op in name: + - * / // % ** ~ and or      children: [a, b]
  Compare,       // children: [a, b, c...], ops: ==, !=, <, <=, >, >=, in, notin
  CondExpr,      // children: [then, test, else?]
  Filter,        // name; children: [subject (null in filter blocks), args...]; kwargs
  Test,          // name; children: [subject, args...]; kwargs
  Call,          // children: [callee, args...]; kwargs; star/star_star
  NamespaceRef,  // assignment target ns.attr: children: [ns]; name = attr
};

struct Expr {
  ExprKind kind;
  int line = 0;
  std::string name;
  Value value;
  std::vector<ExprPtr> children;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  std::vector<std::string> ops;  // Compare operators
  ExprPtr star_args, star_kwargs;
};

enum class StmtKind {
  Data,         // text
  Output,       // expr
  If,           // conditions[i] -> bodies[i]; else_body
  For,          // target, iter, condition (loop filter), body, else_body, recursive
  Set,          // target = expr
  SetBlock,     // target (Name), filter (Filter chain with null subject, optional), body
  Macro,        // name, params, defaults, body
  CallBlock,    // call (Call expr), params/defaults (caller's), body
  FilterBlock,  // filter, body
  With,         // targets/values, body
  Break,
  Continue,
  Generation,  // body
};

struct Stmt {
  StmtKind kind;
  int line = 0;
  std::string text;  // Data
  std::string name;  // Macro name
  ExprPtr target, expr, condition, filter;
  std::vector<ExprPtr> conditions;
  std::vector<Body> bodies;
  Body body, else_body;
  std::vector<std::string> params;
  std::vector<ExprPtr> defaults;  // aligned with params (null = none)
  std::vector<ExprPtr> with_targets, with_values;
  bool recursive = false;
  bool uses_caller = false, uses_varargs = false, uses_kwargs = false;  // Macro
};

}  // namespace moetune::jinja
