// Post-processors of tokenizer.json for single sequences: TemplateProcessing (list or
// "$A [SEP]" string templates, multi-id special tokens), RobertaProcessing, BertProcessing,
// ByteLevel (offsets only: ids unchanged) and Sequence. Special tokens are added only when
// add_special_tokens is set, as in HF.
#include <sstream>

#include "data/tokenizer_internal.h"

namespace moetune::tokenizer_detail {

namespace {

// A template item: the sequence itself (ids empty) or a special token's ids.
struct TemplateItem {
  bool is_sequence = false;
  std::vector<int32_t> ids;
};

class TemplatePostProcessor final : public PostProcessor {
 public:
  TemplatePostProcessor(const json& config, const std::string& context) {
    // special_tokens: {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
    std::unordered_map<std::string, std::vector<int32_t>> specials;
    if (config.contains("special_tokens") && config.at("special_tokens").is_object()) {
      for (auto it = config.at("special_tokens").begin(); it != config.at("special_tokens").end();
           ++it) {
        std::vector<int32_t> ids;
        for (const json& id : member(it.value(), "ids", context)) {
          if (!id.is_number_integer())
            fail(context, ": special token '", it.key(), "' ids must be integers");
          ids.push_back(id.get<int32_t>());
        }
        specials[it.key()] = std::move(ids);
      }
    }
    auto special = [&](const std::string& name) {
      auto it = specials.find(name);
      if (it == specials.end()) fail(context, ": template uses unknown special token '", name, "'");
      return it->second;
    };
    const json& single = member(config, "single", context);
    if (single.is_string()) {
      std::istringstream words(single.get<std::string>());
      for (std::string word; words >> word;) {
        const std::string name = word.substr(
            0, word.rfind(':') == std::string::npos || word.rfind(':') == 0 ? word.size()
                                                                            : word.rfind(':'));
        TemplateItem item;
        if (!name.empty() && name[0] == '$') {
          const std::string which = name.substr(1);
          if (which == "B" || which == "b") fail(context, ": the single template uses $B");
          item.is_sequence = true;
        } else {
          item.ids = special(name);
        }
        items_.push_back(std::move(item));
      }
    } else if (single.is_array()) {
      for (const json& entry : single) {
        TemplateItem item;
        if (entry.contains("Sequence")) {
          item.is_sequence = true;
        } else if (entry.contains("SpecialToken")) {
          item.ids = special(string_member(entry.at("SpecialToken"), "id", context));
        } else {
          fail(context, ": template items must be Sequence or SpecialToken");
        }
        items_.push_back(std::move(item));
      }
    } else {
      fail(context, ": 'single' must be a list or a string");
    }
  }
  void process(std::vector<int32_t>& ids, bool add_special_tokens) const override {
    if (!add_special_tokens) return;
    std::vector<int32_t> out;
    out.reserve(ids.size() + 4);
    for (const TemplateItem& item : items_) {
      if (item.is_sequence)
        out.insert(out.end(), ids.begin(), ids.end());
      else
        out.insert(out.end(), item.ids.begin(), item.ids.end());
    }
    ids = std::move(out);
  }

 private:
  std::vector<TemplateItem> items_;
};

// RobertaProcessing / BertProcessing: [cls] A [sep].
class WrapPostProcessor final : public PostProcessor {
 public:
  WrapPostProcessor(const json& config, const std::string& context) {
    auto read = [&](const char* key) {
      const json& pair = member(config, key, context);
      if (!pair.is_array() || pair.size() != 2 || !pair[1].is_number_integer())
        fail(context, ": '", key, "' must be [token, id]");
      return pair[1].get<int32_t>();
    };
    cls_ = read("cls");
    sep_ = read("sep");
  }
  void process(std::vector<int32_t>& ids, bool add_special_tokens) const override {
    if (!add_special_tokens) return;
    ids.insert(ids.begin(), cls_);
    ids.push_back(sep_);
  }

 private:
  int32_t cls_ = 0, sep_ = 0;
};

class NoOpPostProcessor final : public PostProcessor {
 public:
  void process(std::vector<int32_t>&, bool) const override {}
};

class SequencePostProcessor final : public PostProcessor {
 public:
  explicit SequencePostProcessor(std::vector<std::unique_ptr<PostProcessor>> parts)
      : parts_(std::move(parts)) {}
  void process(std::vector<int32_t>& ids, bool add_special_tokens) const override {
    for (const auto& part : parts_) part->process(ids, add_special_tokens);
  }

 private:
  std::vector<std::unique_ptr<PostProcessor>> parts_;
};

}  // namespace

std::unique_ptr<PostProcessor> make_post_processor(const json& config, const Vocab& vocab,
                                                   const std::string& source) {
  if (config.is_null()) return nullptr;
  const std::string type = string_member(config, "type", source + ": post_processor");
  const std::string context = source + ": post_processor " + type;
  if (type == "TemplateProcessing") return std::make_unique<TemplatePostProcessor>(config, context);
  if (type == "RobertaProcessing" || type == "BertProcessing")
    return std::make_unique<WrapPostProcessor>(config, context);
  if (type == "ByteLevel") return std::make_unique<NoOpPostProcessor>();
  if (type == "Sequence") {
    std::vector<std::unique_ptr<PostProcessor>> parts;
    for (const json& part : member(config, "processors", context))
      if (auto made = make_post_processor(part, vocab, source)) parts.push_back(std::move(made));
    return std::make_unique<SequencePostProcessor>(std::move(parts));
  }
  fail(source, ": unsupported post_processor type '", type, "'");
}

}  // namespace moetune::tokenizer_detail
