// Parser of Jinja templates: tokens -> statement tree, with jinja2.parser's grammar and
// precedence (condexpr < or < and < not < compare < + - < ~ < * / // % < ** < unary < postfix,
// filters and tests binding to unary operands). Unknown filters and tests are compile-time
// errors, as in Jinja. Nesting is bounded so hostile templates cannot exhaust the stack.
#pragma once

#include <string>

#include "data/jinja/ast.h"

namespace moetune::jinja {

struct ParsedTemplate {
  Body body;
  bool has_generation = false;
};

// Raises JinjaError(TemplateSyntaxError / TemplateAssertionError) naming the line.
ParsedTemplate parse_template(const std::string& source);

bool is_known_filter(const std::string& name);
bool is_known_test(const std::string& name);

}  // namespace moetune::jinja
