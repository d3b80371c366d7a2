// Turning a normalized Example into token ids and a loss mask.
//
// Chats are rendered once through the chat template. The trained byte spans of that text
// are the template's {% generation %} spans when it has them, else found by rendering
// prefixes: messages[:i] with add_generation_prompt=true gives where assistant turn i
// starts, messages[:i+1] where it ends (anchored on the message content when the template
// renders a last turn differently, as Qwen3's thinking block does). With train_on: all the
// whole text is trained.
//
// Tokens: the text is encoded piece by piece at the span boundaries (add_special_tokens
// off, as apply_chat_template does), so each token is either inside a span or outside it.
// When the pieces' concatenation differs from the encoding of the whole text (a BPE merge
// crossing a boundary), the whole encoding is used and each token's byte range is found by
// decoding prefixes; a token is trained when its bytes overlap a trained span. When the
// decoded text does not reproduce the rendered text either, the piecewise encoding is used.
//
// Prompt/completion: encode(prompt, add_special_tokens=true) + encode(completion) + eos;
// text: encode(text, add_special_tokens=true) + eos.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "data/chat_template.h"
#include "data/data_config.h"
#include "data/dataset_formats.h"
#include "data/tokenizer.h"

namespace moetune {

struct EncodedExample {
  std::vector<int32_t> input_ids;
  std::vector<uint8_t> trained;  // 1 where input_ids[t] is a training target
  bool realigned = false;        // piecewise encoding differed from the whole-text encoding
};

// Text with the byte spans the loss is taken on.
struct MaskedText {
  std::string text;
  std::vector<std::pair<size_t, size_t>> trained_spans;  // sorted, disjoint [begin, end)
};

class ExampleEncoder {
 public:
  // chat_template may be null (then chat examples are an error). `train_on` Auto picks
  // per example kind (responses for chat and prompt/completion, all for text).
  ExampleEncoder(const Tokenizer& tokenizer, const ChatTemplate* chat_template, TrainOn train_on,
                 bool add_eos);

  EncodedExample encode(const Example& example) const;

  // The rendered chat and its trained spans (exposed for tests and previews).
  MaskedText render_chat(const Example& example) const;

  // Encodes `masked` piecewise (see above).
  EncodedExample encode_masked_text(const MaskedText& masked) const;

 private:
  RecordJson template_variables(const Example& example, size_t message_count,
                                bool add_generation_prompt) const;
  std::vector<std::pair<size_t, size_t>> spans_from_prefixes(const Example& example,
                                                             const std::string& full) const;
  int32_t eos_id() const;

  const Tokenizer& tokenizer_;
  const ChatTemplate* chat_template_;
  TrainOn train_on_;
  bool add_eos_;
  RecordJson special_variables_;
};

}  // namespace moetune
