// The BPE model of tokenizer.json (HF models/bpe): vocab, ranked merges ("a b" strings or
// ["a", "b"] pairs), unk/fuse_unk, byte_fallback (<0xXX>), continuing_subword_prefix,
// end_of_word_suffix, ignore_merges. Merging follows HF's Word::merge_all exactly: a min-heap
// of (rank, position) candidate pairs over a doubly linked list of symbols, stale entries
// skipped on pop, so a word of n symbols costs O(n log n). Results of words up to 256 bytes
// are kept in a bounded cache (cleared when full).
#include <queue>

#include "data/tokenizer_internal.h"
#include "data/tokenizer_unicode.h"

namespace moetune::tokenizer_detail {

namespace {
uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}
}  // namespace

BpeModel::BpeModel(const json& model, const std::string& source) {
  const std::string context = source + ": model";
  const std::string type = string_member(model, "type", context, "BPE");
  if (type != "BPE") fail(source, ": unsupported model type '", type, "' (only BPE is supported)");
  if (model.contains("dropout") && !model.at("dropout").is_null() &&
      model.at("dropout").get<double>() != 0.0)
    fail(context, ": BPE dropout is not supported (encoding would be random)");

  const json& vocab = member(model, "vocab", context);
  if (!vocab.is_object()) fail(context, ": 'vocab' must be an object");
  vocab_.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() > INT32_MAX)
      fail(context, ": vocab entry '", it.key(), "' must have a non-negative integer id");
    const auto id = static_cast<int32_t>(it.value().get<int64_t>());
    vocab_[it.key()] = id;
    if (static_cast<size_t>(id) >= id_to_token_.size()) id_to_token_.resize(id + 1);
    id_to_token_[id] = it.key();
  }

  continuing_subword_prefix_ = string_member(model, "continuing_subword_prefix", context);
  end_of_word_suffix_ = string_member(model, "end_of_word_suffix", context);
  fuse_unk_ = bool_member(model, "fuse_unk", context, false);
  byte_fallback_ = bool_member(model, "byte_fallback", context, false);
  ignore_merges_ = bool_member(model, "ignore_merges", context, false);
  const std::string unk = string_member(model, "unk_token", context);
  if (!unk.empty()) {
    auto it = vocab_.find(unk);
    if (it == vocab_.end()) fail(context, ": unk_token '", unk, "' is not in the vocab");
    unk_id_ = it->second;
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    auto it = vocab_.find(std::string_view(name));
    byte_ids_[b] = it == vocab_.end() ? -1 : it->second;
  }

  const json& merges = member(model, "merges", context);
  if (!merges.is_array()) fail(context, ": 'merges' must be an array");
  merges_.reserve(merges.size());
  const size_t prefix_len = continuing_subword_prefix_.size();
  int32_t rank = 0;
  for (const json& merge : merges) {
    std::string left, right;
    if (merge.is_string()) {
      const std::string& line = merge.get_ref<const std::string&>();
      if (line.rfind("#version", 0) == 0) continue;
      const size_t space = line.find(' ');
      // HF refuses a file with a legacy merge that is not exactly two space-separated tokens
      // (llama2's onnxruntime-extensions copy has such merges of raw spaces whose result is
      // not in the vocab); such a merge cannot apply, so it is skipped here.
      if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
        ++rank;
        continue;
      }
      left = line.substr(0, space);
      right = line.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
               merge[1].is_string()) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else {
      fail(context, ": merge ", rank, " must be \"a b\" or [\"a\", \"b\"]");
    }
    auto left_it = vocab_.find(left), right_it = vocab_.find(right);
    if (left_it == vocab_.end()) fail(context, ": merge token '", left, "' is not in the vocab");
    if (right_it == vocab_.end()) fail(context, ": merge token '", right, "' is not in the vocab");
    if (right.size() < prefix_len) fail(context, ": merge token '", right, "' lacks the prefix");
    const std::string merged = left + right.substr(prefix_len);
    auto merged_it = vocab_.find(merged);
    if (merged_it == vocab_.end())
      fail(context, ": merged token '", merged, "' is not in the vocab");
    merges_[pair_key(left_it->second, right_it->second)] = {rank, merged_it->second};
    ++rank;
  }
}

const BpeModel::MergeInfo* BpeModel::find_merge(int32_t left, int32_t right) const {
  auto it = merges_.find(pair_key(left, right));
  return it == merges_.end() ? nullptr : &it->second;
}

void BpeModel::merge_word(std::string_view word, std::vector<int32_t>& ids) const {
  struct Symbol {
    int32_t id;
    int32_t prev, next;  // -1 at the ends
    bool removed;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  auto add = [&](int32_t id) {
    const auto index = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, index - 1, -1, false});
    if (index > 0) symbols[index - 1].next = index;
  };

  // Initial symbols: one per character (or its bytes, or unk).
  int32_t pending_unk = -1;  // an unk waiting to be emitted (fused with followers)
  std::string scratch;
  for (size_t pos = 0; pos < word.size();) {
    const size_t len = utf8_length(static_cast<unsigned char>(word[pos]));
    const bool is_first = pos == 0, is_last = pos + len >= word.size();
    std::string_view piece = word.substr(pos, len);
    if ((!is_first && !continuing_subword_prefix_.empty()) ||
        (is_last && !end_of_word_suffix_.empty())) {
      scratch.clear();
      if (!is_first) scratch += continuing_subword_prefix_;
      scratch += piece;
      if (is_last) scratch += end_of_word_suffix_;
      piece = scratch;
    }
    pos += len;
    if (auto it = vocab_.find(piece); it != vocab_.end()) {
      if (pending_unk >= 0) add(pending_unk), pending_unk = -1;
      add(it->second);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (unsigned char byte : piece) all = all && byte_ids_[byte] >= 0;
      if (all) {
        // HF does not flush a pending unk here: it stays pending until the next known token.
        for (unsigned char byte : piece) add(byte_ids_[byte]);
        continue;
      }
    }
    if (unk_id_) {
      if (pending_unk >= 0 && !fuse_unk_) add(pending_unk);
      pending_unk = *unk_id_;
    }
  }
  if (pending_unk >= 0) add(pending_unk);

  // Merge loop: pop the lowest (rank, position); skip entries made stale by earlier merges.
  struct Candidate {
    int32_t rank, pos, new_id;
    bool operator>(const Candidate& other) const {
      return rank != other.rank ? rank > other.rank : pos > other.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  for (size_t i = 0; i + 1 < symbols.size(); ++i)
    if (const MergeInfo* m = find_merge(symbols[i].id, symbols[i + 1].id))
      queue.push({m->rank, static_cast<int32_t>(i), m->new_id});
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& current = symbols[top.pos];
    if (current.removed || current.next < 0) continue;
    const Symbol right = symbols[current.next];
    const MergeInfo* m = find_merge(current.id, right.id);
    if (!m || m->new_id != top.new_id) continue;
    current.id = top.new_id;
    symbols[current.next].removed = true;
    current.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (current.prev >= 0)
      if (const MergeInfo* pm = find_merge(symbols[current.prev].id, current.id))
        queue.push({pm->rank, current.prev, pm->new_id});
    if (current.next >= 0)
      if (const MergeInfo* nm = find_merge(current.id, symbols[current.next].id))
        queue.push({nm->rank, top.pos, nm->new_id});
  }
  for (const Symbol& symbol : symbols)
    if (!symbol.removed) ids.push_back(symbol.id);
}

void BpeModel::tokenize(std::string_view word, std::vector<int32_t>& ids) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (auto it = vocab_.find(word); it != vocab_.end()) {
      ids.push_back(it->second);
      return;
    }
  }
  const bool cacheable = word.size() < kCacheMaxWordBytes;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (auto it = cache_.find(word); it != cache_.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = ids.size();
  merge_word(word, ids);
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (cache_.size() >= kCacheCapacity) cache_.clear();
    cache_.emplace(std::string(word),
                   std::vector<int32_t>(ids.begin() + static_cast<long>(first), ids.end()));
  }
}

}  // namespace moetune::tokenizer_detail
