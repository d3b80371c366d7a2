// Lexer of Jinja templates with Transformers' settings (trim_blocks, lstrip_blocks,
// keep_trailing_newline off): turns the source into data / tag delimiters / expression tokens,
// each with its line. Whitespace control (-, +), comments and {% raw %} are resolved here,
// following jinja2.lexer's regex rules step by step (see lexer.cpp).
#pragma once

#include <string>
#include <vector>

namespace moetune::jinja {

enum class TokenType {
  Data,           // literal template text
  VariableBegin,  // {{
  VariableEnd,    // }}
  BlockBegin,     // {%
  BlockEnd,       // %}
  Name,
  String,  // value holds the decoded string
  Integer,
  Float,
  Operator,  // value holds the operator text: + - ** == ( ...
  End,
};

struct Token {
  TokenType type;
  std::string value;
  int line = 1;
};

// Raises JinjaError(TemplateSyntaxError) with the line on malformed input.
std::vector<Token> tokenize(const std::string& source);

std::string describe(const Token& token);  // as Jinja names tokens in syntax errors

}  // namespace moetune::jinja
