// Safetensors reader and writer: write -> read round trips bit-exactly, dtype conversion,
// and every malformed header (hand-built bytes) gives an Error that names the file, the
// tensor and the problem. Files written by Python's safetensors are read when it is
// installed (the check is skipped otherwise).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <random>

#include "core/error.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace moetune {
namespace {

// Writes a raw safetensors file: 8-byte length, the header text as given, `data_bytes` bytes.
void write_raw(const std::filesystem::path& path, const std::string& header, size_t data_bytes,
               std::optional<uint64_t> header_length = std::nullopt) {
  std::ofstream out(path, std::ios::binary);
  uint64_t length = header_length.value_or(header.size());
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>(length >> (8 * i)));
  out << header;
  out << std::string(data_bytes, '\x01');
}

std::string open_error(const std::filesystem::path& path) {
  try {
    SafetensorsFile file(path);
  } catch (const Error& error) {
    return error.what();
  }
  return "";
}

TEST(Safetensors, RoundTripIsBitExact) {
  testing::TempDir dir;
  std::vector<float> weights = testing::random_floats(6, 1);
  weights[5] = NAN;
  std::vector<uint16_t> halves = {0x3f80, 0xc000, 0x7fc1, 0x0001};
  std::vector<int64_t> ids = {-1, 7, 1ll << 40};
  std::vector<NamedTensor> tensors = {
      {"x.weight", Tensor(weights.data(), DType::F32, {2, 3})},
      {"b.bias", Tensor(halves.data(), DType::BF16, {4})},
      {"a.ids", Tensor(ids.data(), DType::I64, {3, 1})},
      {"empty", Tensor(nullptr, DType::F32, {0, 5})},
  };
  auto path = dir / "model.safetensors";
  write_safetensors(path, tensors, {{"step", "12"}});
  EXPECT_FALSE(std::filesystem::exists(dir / "model.safetensors.tmp"));

  SafetensorsFile file(path);
  EXPECT_EQ(file.metadata().at("format"), "pt");
  EXPECT_EQ(file.metadata().at("step"), "12");
  std::vector<std::string> names;
  for (const auto& named : tensors) names.push_back(named.name);
  // 24 + 8 bytes precede the I64 tensor: it stays aligned, so the given order is kept.
  EXPECT_EQ(file.names(), names);
  for (const auto& named : tensors) {
    SCOPED_TRACE(named.name);
    const TensorInfo& info = file.info(named.name);
    EXPECT_EQ(info.dtype, named.tensor.dtype);
    EXPECT_EQ(info.shape, named.tensor.shape);
    Tensor view = file.tensor(named.name);
    ASSERT_EQ(view.bytes(), named.tensor.bytes());
    if (view.bytes() > 0) {
      EXPECT_EQ(std::memcmp(view.data, named.tensor.data, view.bytes()), 0);
    }
  }
  // The header is padded to 8 bytes and the file is exactly header + data.
  std::ifstream in(path, std::ios::binary);
  uint64_t header_length = 0;
  in.read(reinterpret_cast<char*>(&header_length), 8);
  EXPECT_EQ(header_length % 8, 0u);
  EXPECT_EQ(std::filesystem::file_size(path), 8 + header_length + 24 + 8 + 24);
}

TEST(Safetensors, ReorderOnlyWhenAlignmentNeedsIt) {
  testing::TempDir dir;
  std::vector<uint16_t> three = {1, 2, 3};
  std::vector<float> floats = {1.0f, 2.0f};
  std::vector<NamedTensor> tensors = {{"half", Tensor(three.data(), DType::BF16, {3})},
                                      {"float", Tensor(floats.data(), DType::F32, {2})}};
  write_safetensors(dir / "a.safetensors", tensors);
  SafetensorsFile file(dir / "a.safetensors");
  EXPECT_EQ(file.names(), (std::vector<std::string>{"float", "half"}));
  Tensor view = file.tensor("float");
  EXPECT_EQ(view.ptr<float>()[1], 2.0f);
}

TEST(Safetensors, ConvertsBetweenFloatTypes) {
  testing::TempDir dir;
  std::vector<float> values = {1.0f, -2.5f, 1.0f + std::ldexp(1.0f, -8), 3.0e-3f};
  std::vector<uint16_t> bf16(values.size()), f16(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    bf16[i] = float_to_bf16(values[i]);
    f16[i] = float_to_f16(values[i]);
  }
  std::vector<uint8_t> fp8 = {0x38, 0x40};
  std::vector<NamedTensor> tensors = {{"f32", Tensor(values.data(), DType::F32, {2, 2})},
                                      {"bf16", Tensor(bf16.data(), DType::BF16, {2, 2})},
                                      {"f16", Tensor(f16.data(), DType::F16, {2, 2})},
                                      {"fp8", Tensor(fp8.data(), DType::F8_E4M3, {2})}};
  write_safetensors(dir / "m.safetensors", tensors);
  SafetensorsFile file(dir / "m.safetensors");

  std::vector<float> out(4);
  file.read_as_f32("bf16", out);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(out[i], bf16_to_float(bf16[i]));
  file.read_as_f32("f16", out);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(out[i], f16_to_float(f16[i]));
  file.read_as_f32("f32", out);
  EXPECT_EQ(out, values);

  std::vector<uint16_t> as_bf16(4);
  file.read_into("f32", Tensor(as_bf16.data(), DType::BF16, {2, 2}));
  EXPECT_EQ(as_bf16, bf16);

  // fp8 is readable as raw info and bytes, but does not convert yet.
  EXPECT_EQ(file.info("fp8").dtype, DType::F8_E4M3);
  EXPECT_EQ(file.bytes("fp8").size(), 2u);
  std::vector<float> two(2);
  try {
    file.read_as_f32("fp8", two);
    FAIL() << "expected an error";
  } catch (const Error& error) {
    std::string message = error.what();
    EXPECT_NE(message.find("m.safetensors: tensor 'fp8'"), std::string::npos) << message;
    EXPECT_NE(message.find("dtype F8_E4M3 is not supported yet"), std::string::npos) << message;
  }
  std::vector<uint8_t> raw(2);
  file.read_into("fp8", Tensor(raw.data(), DType::F8_E4M3, {2}));  // same dtype: a copy
  EXPECT_EQ(raw, fp8);

  // Shape and size mismatches name the tensor.
  std::vector<float> three(3);
  EXPECT_THROW(file.read_as_f32("f32", three), Error);
  std::vector<float> four(4);
  try {
    file.read_into("f32", Tensor(four.data(), DType::F32, {4}));
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what())
                  .find("tensor 'f32': has shape [2, 2] but the destination has shape [4]"),
              std::string::npos)
        << error.what();
  }
  try {
    file.info("nope");
    FAIL() << "expected an error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("m.safetensors: no tensor 'nope'"), std::string::npos);
  }
}

struct BadFile {
  const char* what;
  std::string header;
  size_t data_bytes;
  const char* expected;
};

TEST(Safetensors, MalformedFilesNameTheProblem) {
  const std::string x = R"("x.weight":{"dtype":"F32","shape":[2,3],"data_offsets":)";
  const std::vector<BadFile> cases = {
      {"not json", "{not json", 0, "header is not valid JSON"},
      {"not object", "[1, 2]   ", 0, "header does not start with '{'"},
      {"json array", "{\"a\":1} [", 0, "header is not valid JSON"},
      {"entry not object", R"({"x":3})", 0, "tensor 'x': entry must be an object"},
      {"missing dtype", R"({"x":{"shape":[1],"data_offsets":[0,4]}})", 4,
       "tensor 'x': missing 'dtype'"},
      {"missing shape", R"({"x":{"dtype":"F32","data_offsets":[0,4]}})", 4,
       "tensor 'x': missing 'shape'"},
      {"missing offsets", R"({"x":{"dtype":"F32","shape":[1]}})", 4,
       "tensor 'x': missing 'data_offsets'"},
      {"dtype not string", R"({"x":{"dtype":4,"shape":[1],"data_offsets":[0,4]}})", 4,
       "tensor 'x': dtype must be a string"},
      {"unknown dtype", R"({"x":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}})", 16,
       "tensor 'x': unknown dtype \"F128\""},
      {"negative dim", R"({"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4,
       "tensor 'x': shape must be a list of non-negative integers"},
      {"float dim", R"({"x":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", 4,
       "tensor 'x': shape must be a list of non-negative integers"},
      {"shape not list", R"({"x":{"dtype":"F32","shape":"big","data_offsets":[0,4]}})", 4,
       "tensor 'x': shape must be a list"},
      {"rank 7", R"({"x":{"dtype":"F32","shape":[1,1,1,1,1,1,1],"data_offsets":[0,4]}})", 4,
       "has rank 7, more than the 6 supported"},
      {"huge shape",
       R"({"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}})", 4,
       "tensor 'x': shape [4294967296, 4294967296] is too large"},
      {"offsets three", "{" + x + "[0,12,24]}}", 24,
       "tensor 'x.weight': data_offsets must be [begin, end]"},
      {"offsets negative", "{" + x + "[-4,24]}}", 24,
       "data_offsets must be a list of non-negative integers"},
      {"offsets reversed", "{" + x + "[24,0]}}", 24,
       "tensor 'x.weight': data_offsets [24, 0] end before they begin"},
      {"past end", "{" + x + "[0,24]}}", 20,
       "data_offsets [0, 24] run past the end of the data section (20 bytes)"},
      {"wrong size", "{" + x + "[0,12]}}", 12,
       "tensor 'x.weight': data_offsets [0, 12] hold 12 bytes but shape [2, 3] of F32 needs 24"},
      {"overlap", "{" + x + R"([0,24]},"y":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}})",
       24, "tensor 'y': bytes [16, 24) overlap tensor 'x.weight' [0, 24)"},
      {"hole", "{" + x + R"([8,32]}})", 32,
       "hole: bytes [0, 8) before tensor 'x.weight' belong to no tensor"},
      {"trailing", "{" + x + R"([0,24]}})", 30, "6 trailing bytes after the last tensor"},
      {"duplicate", "{" + x + "[0,24]}," + x + "[0,24]}}", 24,
       "header lists tensor 'x.weight' twice"},
      {"bad metadata", R"({"__metadata__":{"format":1}})", 0,
       "__metadata__ value of 'format' must be a string"},
      {"metadata list", R"({"__metadata__":[1]})", 0, "__metadata__ must be an object"},
      {"deep nesting", "{\"x\":" + std::string(100000, '[') + std::string(100000, ']') + "}", 0,
       "header JSON is nested deeper than 8 levels"},
  };
  testing::TempDir dir;
  for (const BadFile& bad : cases) {
    auto path = dir / "model.safetensors";
    write_raw(path, bad.header, bad.data_bytes);
    std::string message = open_error(path);
    EXPECT_NE(message.find(path.string() + ": "), std::string::npos) << bad.what << ": " << message;
    EXPECT_NE(message.find(bad.expected), std::string::npos) << bad.what << ": " << message;
  }
}

TEST(Safetensors, TruncatedFilesNameTheProblem) {
  testing::TempDir dir;
  auto path = dir / "short.safetensors";
  std::ofstream(path, std::ios::binary) << "abc";
  EXPECT_NE(open_error(path).find(
                "short.safetensors: file is 3 bytes, shorter than the 8-byte header length"),
            std::string::npos)
      << open_error(path);
  write_raw(path, "{}", 0, /*header_length=*/64);
  EXPECT_NE(open_error(path).find("header length 64 runs past the end of the file (10 bytes)"),
            std::string::npos)
      << open_error(path);
  write_raw(path, "{}", 0, /*header_length=*/uint64_t{1} << 60);
  EXPECT_NE(open_error(path).find("is larger than the limit"), std::string::npos)
      << open_error(path);
  EXPECT_NE(open_error(dir / "missing.safetensors").find("missing.safetensors: cannot open"),
            std::string::npos);
  EXPECT_NE(open_error(dir.path()).find("not a regular file"), std::string::npos);

  // An empty header object with no data is a valid (empty) file.
  write_raw(path, "{}      ", 0);
  SafetensorsFile empty(path);
  EXPECT_TRUE(empty.names().empty());
}

TEST(Safetensors, MoveKeepsTheMapping) {
  testing::TempDir dir;
  std::vector<float> values = {1, 2, 3};
  std::vector<NamedTensor> tensors = {{"v", Tensor(values.data(), DType::F32, {3})}};
  write_safetensors(dir / "v.safetensors", tensors);
  SafetensorsFile first(dir / "v.safetensors");
  SafetensorsFile second = std::move(first);
  EXPECT_EQ(second.tensor("v").ptr<float>()[2], 3.0f);
  std::vector<SafetensorsFile> files;
  files.push_back(std::move(second));
  EXPECT_EQ(files[0].tensor("v").ptr<float>()[0], 1.0f);
}

TEST(Safetensors, WriterRejectsBadInput) {
  testing::TempDir dir;
  std::vector<float> values = {1, 2};
  std::vector<NamedTensor> twice = {{"a", Tensor(values.data(), DType::F32, {2})},
                                    {"a", Tensor(values.data(), DType::F32, {2})}};
  EXPECT_THROW(write_safetensors(dir / "x.safetensors", twice), Error);
  std::vector<NamedTensor> on_gpu = {{"a", Tensor(values.data(), DType::F32, {2}, Device::CUDA)}};
  EXPECT_THROW(write_safetensors(dir / "x.safetensors", on_gpu), Error);
  std::vector<NamedTensor> fine = {{"a", Tensor(values.data(), DType::F32, {2})}};
  EXPECT_THROW(write_safetensors(dir / "no" / "such" / "x.safetensors", fine), Error);
  EXPECT_FALSE(std::filesystem::exists(dir / "x.safetensors"));
}

// Random byte flips and truncations of a valid file: every outcome is a clean open or an
// Error, never a crash or an out-of-bounds read (run under ASan).
TEST(Safetensors, RandomCorruptionGivesErrorsNotCrashes) {
  testing::TempDir dir;
  std::vector<float> a = testing::random_floats(12, 3);
  std::vector<uint16_t> b = {1, 2, 3, 4, 5, 6};
  std::vector<NamedTensor> tensors = {{"layer.a", Tensor(a.data(), DType::F32, {3, 4})},
                                      {"layer.b", Tensor(b.data(), DType::BF16, {2, 3})}};
  write_safetensors(dir / "good.safetensors", tensors);
  std::ifstream in(dir / "good.safetensors", std::ios::binary);
  std::string good((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::mt19937 rng(5);
  int opened = 0, refused = 0;
  for (int trial = 0; trial < 400; ++trial) {
    std::string bytes = good;
    if (trial % 4 == 0) {
      bytes.resize(rng() % bytes.size());
    } else {
      for (int flips = 1 + trial % 3; flips > 0; --flips)
        bytes[rng() % std::min<size_t>(bytes.size(), 200)] = static_cast<char>(rng());
    }
    auto path = dir / "bad.safetensors";
    std::ofstream(path, std::ios::binary) << bytes;
    try {
      SafetensorsFile file(path);
      for (const std::string& name : file.names()) {
        std::vector<float> out(static_cast<size_t>(file.info(name).shape.numel()));
        try {
          file.read_as_f32(name, out);
        } catch (const Error&) {  // e.g. a dtype flipped to I8
        }
      }
      ++opened;
    } catch (const Error& error) {
      EXPECT_NE(std::string(error.what()).find("bad.safetensors"), std::string::npos)
          << error.what();
      ++refused;
    }
  }
  EXPECT_GT(refused, 100);
  EXPECT_EQ(opened + refused, 400);
}

// Reads a file written by the Python safetensors package (when installed).
TEST(Safetensors, ReadsFilesWrittenByPython) {
  if (testing::run_command("python3 -c 'import safetensors.numpy, numpy'").exit_code != 0)
    GTEST_SKIP() << "python safetensors not installed";
  testing::TempDir dir;
  auto path = dir / "py.safetensors";
  std::string script =
      "import numpy as np, safetensors.numpy as st; "
      "st.save_file({'b': np.arange(6, dtype=np.float32).reshape(2, 3), "
      "'a': np.array([1, -2], dtype=np.int64), 'h': np.array([0.5, 2], dtype=np.float16)}, '" +
      path.string() + "', metadata={'format': 'np'})";
  auto result = testing::run_command("python3 -c \"" + script + "\"");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  SafetensorsFile file(path);
  EXPECT_EQ(file.metadata().at("format"), "np");
  std::vector<float> b(6);
  file.read_as_f32("b", b);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(b[i], static_cast<float>(i));
  EXPECT_EQ(file.info("b").shape, Shape({2, 3}));
  EXPECT_EQ(file.tensor("a").ptr<int64_t>()[1], -2);
  std::vector<float> h(2);
  file.read_as_f32("h", h);
  EXPECT_EQ(h, (std::vector<float>{0.5f, 2.0f}));

  // And Python reads what we write.
  std::vector<float> values = {1.5f, -3.0f, 0.25f, 8.0f};
  std::vector<NamedTensor> tensors = {{"w", Tensor(values.data(), DType::F32, {2, 2})}};
  auto ours = dir / "ours.safetensors";
  write_safetensors(ours, tensors);
  auto check = testing::run_command(
      "python3 -c \"import safetensors.numpy as st, safetensors; t = st.load_file('" +
      ours.string() + "'); print(t['w'].tolist()); print(safetensors.safe_open('" + ours.string() +
      "', 'np').metadata())\"");
  ASSERT_EQ(check.exit_code, 0) << check.output;
  EXPECT_NE(check.output.find("[[1.5, -3.0], [0.25, 8.0]]"), std::string::npos) << check.output;
  EXPECT_NE(check.output.find("'format': 'pt'"), std::string::npos) << check.output;
}

}  // namespace
}  // namespace moetune
