// Example -> (token ids, loss mask); the method is described in dataset_encode.h. The only
// subtle part is mapping byte spans of rendered text onto tokens: piecewise encoding makes
// the mapping exact by construction, and it is checked against the whole-text encoding.
#include "data/dataset_encode.h"

#include <algorithm>

#include "core/error.h"

namespace moetune {

using json = RecordJson;
using Spans = std::vector<std::pair<size_t, size_t>>;

namespace {

// Sorted, merged, non-empty spans clipped to [0, limit).
Spans normalize_spans(Spans spans, size_t limit) {
  for (auto& [begin, end] : spans) {
    begin = std::min(begin, limit);
    end = std::min(end, limit);
  }
  std::sort(spans.begin(), spans.end());
  Spans merged;
  for (const auto& [begin, end] : spans) {
    if (begin >= end) continue;
    if (!merged.empty() && begin <= merged.back().second)
      merged.back().second = std::max(merged.back().second, end);
    else
      merged.emplace_back(begin, end);
  }
  return merged;
}

// Keeps only the parts of spans at or after `cutoff`.
Spans clip_before(Spans spans, size_t cutoff) {
  for (auto& span : spans) span.first = std::max(span.first, cutoff);
  return spans;
}

// Where the longest tail of `turn` (at least `min_tail` bytes) ends in `full`, when that
// tail starts at or after `start` and no more than the left-out head's length after it;
// npos if none. Binary search: if a tail of length L fits, every shorter tail fits too.
// With bounded = false the tail may start anywhere at or after `start`.
size_t matching_tail_end(const std::string& full, size_t start, const std::string& turn,
                         size_t min_tail, bool bounded = true) {
  auto fits = [&](size_t length) -> size_t {
    const size_t found = full.find(std::string_view(turn).substr(turn.size() - length), start);
    if (found == std::string::npos) return std::string::npos;
    if (bounded && found - start > turn.size() - length) return std::string::npos;
    return found + length;
  };
  size_t low = std::max<size_t>(min_tail, 1), high = turn.size();
  if (low > high || fits(low) == std::string::npos) return std::string::npos;
  while (low < high) {
    const size_t middle = low + (high - low + 1) / 2;
    if (fits(middle) != std::string::npos)
      low = middle;
    else
      high = middle - 1;
  }
  return fits(low);
}

// The tail a match must keep: from the message's content (when it is a non-empty string
// found in the turn) to the end, so a match cannot stop at a stray end-of-turn marker.
size_t required_tail(const json& message, const std::string& turn) {
  const json& content = message["content"];
  if (!content.is_string() || content.get<std::string>().empty()) return 1;
  const size_t at = turn.rfind(content.get<std::string>());
  return at == std::string::npos ? 1 : turn.size() - at;
}

void append(std::vector<int32_t>& ids, std::vector<uint8_t>& trained,
            const std::vector<int32_t>& piece, bool is_trained) {
  ids.insert(ids.end(), piece.begin(), piece.end());
  trained.insert(trained.end(), piece.size(), is_trained ? 1 : 0);
}

}  // namespace

ExampleEncoder::ExampleEncoder(const Tokenizer& tokenizer, const ChatTemplate* chat_template,
                               TrainOn train_on, bool add_eos)
    : tokenizer_(tokenizer),
      chat_template_(chat_template),
      train_on_(train_on),
      add_eos_(add_eos),
      special_variables_(
          special_token_variables(RecordJson::parse(tokenizer.special_tokens().config.dump()))) {}

int32_t ExampleEncoder::eos_id() const {
  const auto& eos = tokenizer_.special_tokens().eos_token;
  const auto id = eos ? tokenizer_.token_to_id(*eos) : std::nullopt;
  if (!id) fail("the tokenizer has no eos_token to end examples with; set data.add_eos: false");
  return *id;
}

json ExampleEncoder::template_variables(const Example& example, size_t message_count,
                                        bool add_generation_prompt) const {
  json variables = special_variables_.is_object() ? special_variables_ : json::object();
  json messages = json::array();
  for (size_t i = 0; i < message_count; ++i) messages.push_back(example.messages[i]);
  variables["messages"] = std::move(messages);
  variables["add_generation_prompt"] = add_generation_prompt;
  if (!example.tools.is_null()) variables["tools"] = example.tools;
  return variables;
}

Spans ExampleEncoder::spans_from_prefixes(const Example& example, const std::string& full) const {
  Spans spans;
  size_t previous_end = 0;
  const size_t count = example.messages.size();
  for (size_t i = example.first_trained_message; i < count; ++i) {
    if (example.messages[i]["role"] != "assistant") continue;
    auto inconsistent = [&](const char* what) {
      fail(
          "the chat template renders assistant message ", i, " ", what,
          "; use a template with {% generation %} tags (data.chat_template) or data.train_on: all");
    };
    // Start: the text before the turn, generation prompt included.
    std::string prefix, generation_prefix;
    bool prefix_ok = false;
    for (bool generation_prompt : {true, false}) {
      try {
        prefix =
            i == 0 && !generation_prompt
                ? std::string()
                : chat_template_->render_ordered(template_variables(example, i, generation_prompt))
                      .text;
      } catch (const Error&) {
        if (i != 0) throw;
        prefix.clear();  // some templates cannot render an empty conversation
      }
      if (generation_prompt) generation_prefix = prefix;
      if (full.compare(0, prefix.size(), prefix) == 0) {
        prefix_ok = true;
        break;
      }
    }
    size_t start = prefix.size();
    if (!prefix_ok) {
      // An earlier turn renders differently once later messages exist (Qwen3 drops the
      // reasoning of turns before the last user message): the turn starts where the
      // prefix's tail (from the previous message's content on) appears in the whole chat.
      prefix = generation_prefix;
      const size_t tail = i > 0 ? required_tail(example.messages[i - 1], prefix) : 1;
      start = matching_tail_end(full, previous_end, prefix, tail, /*bounded=*/false);
      if (start == std::string::npos)
        inconsistent("after a context that renders differently in the whole chat");
    }
    // End: the turn as rendered when it is the last message.
    const std::string through =
        chat_template_->render_ordered(template_variables(example, i + 1, false)).text;
    if (through.compare(0, prefix.size(), prefix) != 0)
      inconsistent("so that its prefix is not a prefix of the rendered turn");
    const std::string turn = through.substr(prefix.size());
    size_t end = std::string::npos;
    if (full.compare(start, turn.size(), turn) == 0) {
      end = start + turn.size();
    } else {
      // The last-turn rendering may add text at its head (Qwen3's <think></think> block, or
      // reasoning that earlier turns drop); the rest of the turn is the same in context.
      // Find the longest tail of the turn that appears in the whole chat no further from
      // `start` than the head it leaves out; that tail ends the turn in context.
      end = matching_tail_end(full, start, turn, required_tail(example.messages[i], turn));
    }
    if (end == std::string::npos) inconsistent("differently as the last turn than in context");
    if (start < previous_end) inconsistent("overlapping the previous assistant turn");
    spans.emplace_back(start, end);
    previous_end = end;
  }
  return spans;
}

MaskedText ExampleEncoder::render_chat(const Example& example) const {
  if (!chat_template_)
    fail("the tokenizer has no chat template for chat data (set data.chat_template)");
  const RenderedChat rendered =
      chat_template_->render_ordered(template_variables(example, example.messages.size(), false));
  MaskedText masked;
  masked.text = rendered.text;
  if (train_on_ == TrainOn::All) {
    masked.trained_spans = {{0, masked.text.size()}};
    return masked;
  }
  Spans spans;
  if (chat_template_->has_generation_tags()) {
    spans = rendered.generation_spans;
    if (example.first_trained_message > 0) {
      // Where the completion starts: the prompt rendered with (or, when it ends with an
      // assistant turn, without) the generation prompt.
      std::optional<size_t> cutoff;
      for (bool generation_prompt : {true, false}) {
        const std::string context =
            chat_template_
                ->render_ordered(
                    template_variables(example, example.first_trained_message, generation_prompt))
                .text;
        if (masked.text.compare(0, context.size(), context) == 0) {
          cutoff = context.size();
          break;
        }
      }
      if (!cutoff)
        fail("the chat template renders the prompt messages differently in the whole chat");
      spans = clip_before(std::move(spans), *cutoff);
    }
  } else {
    spans = spans_from_prefixes(example, masked.text);
  }
  masked.trained_spans = normalize_spans(std::move(spans), masked.text.size());
  return masked;
}

EncodedExample ExampleEncoder::encode_masked_text(const MaskedText& masked) const {
  const std::string& text = masked.text;
  const Spans spans = normalize_spans(masked.trained_spans, text.size());
  EncodedExample piecewise;
  size_t position = 0;
  for (const auto& [begin, end] : spans) {
    if (begin > position)
      append(piecewise.input_ids, piecewise.trained,
             tokenizer_.encode(std::string_view(text).substr(position, begin - position), false),
             false);
    append(piecewise.input_ids, piecewise.trained,
           tokenizer_.encode(std::string_view(text).substr(begin, end - begin), false), true);
    position = end;
  }
  if (position < text.size())
    append(piecewise.input_ids, piecewise.trained,
           tokenizer_.encode(std::string_view(text).substr(position), false), false);
  if (spans.size() == 0 ||
      (spans.size() == 1 && spans[0].first == 0 && spans[0].second == text.size()))
    return piecewise;  // one piece: it is the whole-text encoding

  std::vector<int32_t> whole = tokenizer_.encode(text, false);
  if (whole == piecewise.input_ids) return piecewise;

  // A merge crossed a span boundary: align the whole encoding to bytes by decoding prefixes
  // (quadratic, but only for these rare examples), when decoding reproduces the text.
  constexpr size_t kMaxAlignTokens = 16384;
  if (whole.size() > kMaxAlignTokens || tokenizer_.decode(whole) != text) {
    piecewise.realigned = true;
    return piecewise;
  }
  EncodedExample aligned;
  aligned.realigned = true;
  aligned.input_ids = whole;
  aligned.trained.assign(whole.size(), 0);
  size_t token_begin = 0, span_index = 0;
  for (size_t t = 0; t < whole.size(); ++t) {
    const size_t decoded = tokenizer_.decode(std::span<const int32_t>(whole.data(), t + 1)).size();
    const size_t token_end = std::max(token_begin, std::min(decoded, text.size()));
    while (span_index < spans.size() && spans[span_index].second <= token_begin) ++span_index;
    if (span_index < spans.size() && spans[span_index].first < token_end &&
        token_begin < spans[span_index].second)
      aligned.trained[t] = 1;
    token_begin = token_end;
  }
  return aligned;
}

EncodedExample ExampleEncoder::encode(const Example& example) const {
  switch (example.kind) {
    case ExampleKind::Chat:
      return encode_masked_text(render_chat(example));
    case ExampleKind::PromptCompletion: {
      EncodedExample encoded;
      const bool train_prompt = train_on_ == TrainOn::All;
      append(encoded.input_ids, encoded.trained, tokenizer_.encode(example.prompt, true),
             train_prompt);
      append(encoded.input_ids, encoded.trained, tokenizer_.encode(example.completion, false),
             true);
      if (add_eos_) append(encoded.input_ids, encoded.trained, {eos_id()}, true);
      return encoded;
    }
    case ExampleKind::Text: {
      EncodedExample encoded;
      const bool trained = true;  // plain text has no prompt: every token is a target
      append(encoded.input_ids, encoded.trained, tokenizer_.encode(example.text, true), trained);
      if (add_eos_) {
        const int32_t eos = eos_id();
        if (encoded.input_ids.empty() || encoded.input_ids.back() != eos)
          append(encoded.input_ids, encoded.trained, {eos}, trained);
      }
      return encoded;
    }
  }
  fail("internal: unknown example kind");
}

}  // namespace moetune
