#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string_view>
#include <unordered_set>

#include "core/error.h"

namespace fathom {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

namespace {

constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kSingleName = "model.safetensors";

// A name from an untrusted file, quoted for a message: long ones are cut and control bytes
// escaped, so that a hostile header cannot turn an error into megabytes or terminal escapes.
// (Not called "quoted": ADL would pick std::quoted for std::string arguments.)
std::string shown(std::string_view s) {
  constexpr size_t kMaxShown = 160;
  std::string out = "\"";
  for (size_t i = 0; i < s.size() && i < kMaxShown; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f || c == '"' || c == '\\') {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += char(c);
    }
  }
  if (s.size() > kMaxShown) out += "...";
  out += "\"";
  return out;
}

// What a JSON value is, for "expected X, found Y" messages. Never dumps a nested value:
// serializing is recursive and a hostile header can nest millions deep.
std::string describe(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return v.get<bool>() ? "true" : "false";
    case json::value_t::string: return cat("the string ", shown(v.get_ref<const std::string&>()));
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
    case json::value_t::number_float: return cat("the number ", v.dump());
    case json::value_t::object: return cat("an object with ", v.size(), " keys");
    case json::value_t::array: {
      bool small_flat = v.size() <= 8 && std::all_of(v.begin(), v.end(), [](const json& e) { return e.is_primitive(); });
      if (!small_flat) return cat("an array of ", v.size(), " elements");
      std::string out = "the array [";
      for (size_t i = 0; i < v.size(); ++i)
        out += cat(i ? ", " : "", v[i].is_string() ? shown(v[i].get_ref<const std::string&>()) : v[i].dump());
      return out + "]";
    }
    default: return "an unsupported JSON value";
  }
}

// nlohmann's message with its "[json.exception...] " prefix dropped and its length bounded
// (the "last read" part can quote an unterminated string of any length).
std::string json_reason(const json::exception& e) {
  std::string_view what = e.what();
  if (auto close = what.find("] "); what.substr(0, 1) == "[" && close != std::string_view::npos) what.remove_prefix(close + 2);
  constexpr size_t kMaxShown = 200;
  std::string out(what.substr(0, kMaxShown));
  if (what.size() > kMaxShown) out += "...";
  return out;
}

// Parses JSON and reports the first key repeated within one object (nlohmann silently keeps
// one of them; a header naming a tensor twice, or giving data_offsets twice, is ambiguous).
json parse_json_no_duplicates(const char* begin, const char* end, std::string* duplicate) {
  std::vector<std::unordered_set<std::string>> open_objects;
  json::parser_callback_t on_event = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start: open_objects.emplace_back(); break;
      case json::parse_event_t::object_end: open_objects.pop_back(); break;
      case json::parse_event_t::key: {
        const auto& key = parsed.get_ref<const std::string&>();
        if (!open_objects.back().insert(key).second && duplicate->empty()) *duplicate = key;
        break;
      }
      default: break;
    }
    return true;
  };
  return json::parse(begin, end, on_event);
}

std::string dtype_names_list() {
  std::string out;
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::F8_E4M3, DType::F64, DType::I64, DType::I32, DType::I16,
                  DType::I8, DType::U8, DType::BOOL})
    out += cat(out.empty() ? "" : ", ", dtype_name(t));
  return out;
}

// Reads a small text file (an index) whole, refusing anything but a regular file so that a
// FIFO in its place cannot block us.
std::string read_text_file(const std::string& path, uint64_t max_bytes) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    int e = errno;
    if (e == ENOENT) throw Error(cat(path, " does not exist"));
    throw Error(cat(path, " cannot be read: ", std::strerror(e)));
  }
  if (!S_ISREG(st.st_mode)) throw Error(cat(path, " is not a regular file"));
  if (uint64_t(st.st_size) > max_bytes)
    throw Error(cat(path, " has ", st.st_size, " bytes, more than the ", max_bytes, "-byte limit for an index"));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(cat(path, " cannot be opened for reading: ", std::strerror(errno)));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw Error(cat(path, " could not be read completely"));
  return std::move(text).str();
}

// Writes all n bytes or throws; write(2) may write less than asked.
void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    size_t chunk = std::min<size_t>(n, size_t(1) << 30);
    ssize_t w = ::write(fd, p, chunk);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw Error(cat("writing ", path, " failed: ", std::strerror(errno)));
    }
    p += w;
    n -= size_t(w);
  }
}

// PATH ends up either as it was or complete: the bytes go to PATH.tmp.<pid>, are fsynced and
// renamed over PATH; on any failure the temporary file is removed.
void write_atomically(const std::string& path, const std::function<void(int fd)>& write_body) {
  std::string tmp = cat(path, ".tmp.", ::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw Error(cat("cannot write ", path, ": creating the temporary file ", tmp, " failed: ", std::strerror(errno)));
  try {
    write_body(fd);
    if (::fsync(fd) != 0) throw Error(cat("writing ", path, " failed: fsync: ", std::strerror(errno)));
    int rc = ::close(fd);
    fd = -1;
    if (rc != 0) throw Error(cat("writing ", path, " failed: close: ", std::strerror(errno)));
    if (::rename(tmp.c_str(), path.c_str()) != 0)
      throw Error(cat("cannot write ", path, ": renaming ", tmp, " to it failed: ", std::strerror(errno)));
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  // Make the rename itself durable. Best effort: the file is complete either way.
  std::string parent = fs::path(path).parent_path().string();
  int dir_fd = ::open(parent.empty() ? "." : parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    (void)::fsync(dir_fd);
    ::close(dir_fd);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// SafetensorsFile

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  // stat before open: opening a FIFO for reading would block until a writer appears.
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    int e = errno;
    if (e == ENOENT) throw Error(cat("safetensors file ", path, " does not exist"));
    throw Error(cat("safetensors file ", path, " cannot be opened for reading: ", std::strerror(e)));
  }
  if (!S_ISREG(st.st_mode)) throw Error(cat(path, " is not a regular file, so it cannot be a safetensors file"));
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) throw Error(cat("safetensors file ", path, " cannot be opened for reading: ", std::strerror(errno)));
  // The path may have been replaced between stat and open; judge what we actually opened.
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(cat(path, " is not a regular file, so it cannot be a safetensors file"));
  }
  uint64_t file_bytes = uint64_t(st.st_size);
  if (file_bytes < 8) {
    ::close(fd);
    throw Error(cat("safetensors file ", path, " is truncated: it has ", file_bytes,
                    " bytes, fewer than the 8-byte header length every safetensors file starts with"));
  }
  void* map = ::mmap(nullptr, size_t(file_bytes), PROT_READ, MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  ::close(fd);  // the mapping keeps the file open
  if (map == MAP_FAILED)
    throw Error(cat("safetensors file ", path, " cannot be memory-mapped: ", std::strerror(map_errno)));

  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->map_ = map;  // from here on the destructor unmaps, also when validation throws
  file->map_bytes_ = size_t(file_bytes);

  const uint8_t* bytes = static_cast<const uint8_t*>(map);
  uint64_t header_bytes = 0;
  for (int i = 0; i < 8; ++i) header_bytes |= uint64_t(bytes[i]) << (8 * i);  // little-endian on any host
  if (header_bytes > file_bytes - 8)
    throw Error(cat("safetensors file ", path, " declares a header length of ", header_bytes, " bytes but only ",
                    file_bytes - 8, " bytes follow the 8-byte length field (corrupt or truncated file)"));
  if (header_bytes > kSafetensorsMaxHeaderBytes)
    throw Error(cat("safetensors file ", path, " declares a header length of ", header_bytes,
                    " bytes, more than the 100 MB limit safetensors readers accept"));
  file->data_ = bytes + 8 + header_bytes;
  file->data_bytes_ = file_bytes - 8 - header_bytes;
  file->parse_header(reinterpret_cast<const char*>(bytes + 8), size_t(header_bytes));
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_bytes_);
}

void SafetensorsFile::parse_header(const char* text, size_t text_bytes) {
  json header;
  std::string duplicate;
  try {
    header = parse_json_no_duplicates(text, text + text_bytes, &duplicate);
  } catch (const json::exception& e) {
    throw Error(cat("the header of safetensors file ", path_, " is not valid JSON: ", json_reason(e)));
  }
  if (!duplicate.empty())
    throw Error(cat("the header of safetensors file ", path_, " has the key ", shown(duplicate),
                    " twice in one object, so it is ambiguous"));
  if (!header.is_object())
    throw Error(cat("the header of safetensors file ", path_, " is not a JSON object: found ", describe(header)));

  tensors_.reserve(header.size());
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      if (!value.is_object())
        throw Error(cat("__metadata__ in safetensors file ", path_, " must be an object mapping strings to strings, found ",
                        describe(value)));
      for (const auto& [meta_key, meta_value] : value.items()) {
        if (!meta_value.is_string())
          throw Error(cat("__metadata__ in safetensors file ", path_, " must map strings to strings, but key ",
                          shown(meta_key), " maps to ", describe(meta_value)));
        metadata_[meta_key] = meta_value.get<std::string>();
      }
      continue;
    }

    const std::string where = cat("tensor ", shown(key), " in safetensors file ", path_);
    if (!value.is_object())
      throw Error(cat(where, " is described by ", describe(value),
                      " instead of an object with dtype, shape and data_offsets"));
    auto field = [&](const char* name) -> const json& {
      auto it = value.find(name);
      if (it == value.end()) throw Error(cat(where, " has no \"", name, "\" field"));
      return *it;
    };

    TensorInfo info;
    info.name = key;

    const json& dtype = field("dtype");
    if (!dtype.is_string()) throw Error(cat(where, " has a \"dtype\" that is not a string: found ", describe(dtype)));
    if (!dtype_from_name(dtype.get_ref<const std::string&>(), &info.dtype))
      throw Error(cat(where, " has unknown dtype ", shown(dtype.get_ref<const std::string&>()), "; fathom reads ",
                      dtype_names_list()));

    const json& shape = field("shape");
    if (!shape.is_array()) throw Error(cat(where, " has a \"shape\" that is not an array: found ", describe(shape)));
    info.shape.reserve(shape.size());
    for (size_t i = 0; i < shape.size(); ++i) {
      const json& dim = shape[i];
      bool ok = dim.is_number_unsigned() && dim.get<uint64_t>() <= uint64_t(std::numeric_limits<int64_t>::max());
      if (!ok)
        throw Error(cat(where, " has shape dimension ", i, " equal to ", describe(dim),
                        "; dimensions must be non-negative integers"));
      info.shape.push_back(int64_t(dim.get<uint64_t>()));
    }
    // Overflow guard: the product of the non-zero dimensions must fit in int64, so that every
    // element count and stride computed from this shape later is exact. (A zero dimension makes
    // the tensor empty, but its other dimensions still feed strides.)
    uint64_t numel = 1, nonzero_product = 1;
    bool overflow = false;
    for (int64_t d : info.shape) {
      if (d == 0) {
        numel = 0;
        continue;
      }
      overflow |= __builtin_mul_overflow(nonzero_product, uint64_t(d), &nonzero_product);
      overflow |= nonzero_product > uint64_t(std::numeric_limits<int64_t>::max());
      if (numel) numel = nonzero_product;
    }
    uint64_t expected_bytes = 0;
    overflow = overflow || __builtin_mul_overflow(numel, uint64_t(dtype_size(info.dtype)), &expected_bytes);
    if (overflow)
      throw Error(cat(where, " has shape ", shape_str(info.shape), ", with more elements than a 64-bit size can count"));

    const json& offsets = field("data_offsets");
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned())
      throw Error(cat(where, " has data_offsets set to ", describe(offsets),
                      "; expected two non-negative integers [begin, end]"));
    info.begin = offsets[0].get<uint64_t>();
    info.end = offsets[1].get<uint64_t>();
    if (info.begin > info.end)
      throw Error(cat(where, " has data_offsets [", info.begin, ", ", info.end, "] whose begin is after its end"));
    if (info.end > data_bytes_)
      throw Error(cat("safetensors file ", path_, " is truncated or its header lies: tensor ", shown(key), " ends at byte ",
                      info.end, " but the data section has ", data_bytes_, " bytes"));
    if (info.end - info.begin != expected_bytes)
      throw Error(cat(where, " has ", info.end - info.begin, " bytes in data_offsets [", info.begin, ", ", info.end,
                      "] but its shape ", shape_str(info.shape), " of ", dtype_name(info.dtype), " needs ",
                      expected_bytes, " bytes (a size mismatch)"));
    tensors_.push_back(std::move(info));
  }

  std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.name < b.name;
  });
  // Sorted by begin, any overlap shows up against the earlier tensor that reaches furthest.
  // Empty tensors occupy no bytes and overlap nothing. Gaps are allowed (they are harmless,
  // though HF's own writer never leaves any).
  const TensorInfo* furthest = nullptr;
  for (const TensorInfo& t : tensors_) {
    if (t.begin == t.end) continue;
    if (furthest && t.begin < furthest->end)
      throw Error(cat("tensors ", shown(furthest->name), " and ", shown(t.name), " in safetensors file ", path_,
                      " overlap: bytes [", furthest->begin, ", ", furthest->end, ") and [", t.begin, ", ", t.end,
                      ") of the data section"));
    if (!furthest || t.end > furthest->end) furthest = &t;
  }
  index_.reserve(tensors_.size());
  for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Tensor SafetensorsFile::tensor(const std::string& name) const {
  const TensorInfo* info = find(name);
  if (!info) throw Error(cat("safetensors file ", path_, " has no tensor ", shown(name)));
  const uint8_t* p = data_ + info->begin;
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(info->dtype) != 0) {
    Tensor copy = Tensor::empty(info->shape, info->dtype);
    std::memcpy(copy.data(), p, size_t(info->end - info->begin));
    return copy;
  }
  // The view's owner is this file object, which unmaps only when the last view is gone.
  std::shared_ptr<SafetensorsFile> self = std::const_pointer_cast<SafetensorsFile>(shared_from_this());
  return Tensor::view(const_cast<uint8_t*>(p), info->shape, info->dtype, std::move(self));
}

// ---------------------------------------------------------------------------------------------
// SafetensorsSet

SafetensorsSet SafetensorsSet::open_file(const std::string& path) {
  SafetensorsSet set;
  auto file = SafetensorsFile::open(path);
  std::string parent = fs::path(path).parent_path().string();
  set.dir_ = parent.empty() ? "." : parent;
  set.source_ = cat("safetensors file ", path);
  for (const TensorInfo& info : file->tensors()) set.entries_.emplace(info.name, Entry{file.get(), &info});
  set.files_.push_back(std::move(file));
  return set;
}

SafetensorsSet SafetensorsSet::open_dir(const std::string& dir) {
  std::error_code ec;
  fs::file_status status = fs::status(dir, ec);
  if (!fs::exists(status)) {
    if (ec && ec != std::errc::no_such_file_or_directory)
      throw Error(cat("checkpoint directory ", dir, " cannot be read: ", ec.message()));
    throw Error(cat("checkpoint directory ", dir, " does not exist"));
  }
  if (fs::is_regular_file(status)) return open_file(dir);
  if (!fs::is_directory(status)) throw Error(cat("checkpoint ", dir, " is neither a directory nor a safetensors file"));

  std::string index_path = (fs::path(dir) / kIndexName).string();
  std::string single_path = (fs::path(dir) / kSingleName).string();
  bool has_index = fs::exists(fs::symlink_status(index_path, ec));
  if (!has_index) {
    if (!fs::exists(fs::symlink_status(single_path, ec)))
      throw Error(cat(dir, " contains neither ", kSingleName, " nor ", kIndexName));
    SafetensorsSet set = open_file(single_path);
    set.dir_ = dir;
    set.source_ = cat("checkpoint ", dir);
    return set;
  }

  std::string text = read_text_file(index_path, kSafetensorsMaxHeaderBytes);
  json index;
  std::string duplicate;
  try {
    index = parse_json_no_duplicates(text.data(), text.data() + text.size(), &duplicate);
  } catch (const json::exception& e) {
    throw Error(cat("index ", index_path, " is not valid JSON: ", json_reason(e)));
  }
  if (!duplicate.empty())
    throw Error(cat("index ", index_path, " has the key ", shown(duplicate), " twice in one object, so it is ambiguous"));
  if (!index.is_object()) throw Error(cat("index ", index_path, " is not a JSON object: found ", describe(index)));
  if (auto meta = index.find("metadata"); meta != index.end() && !meta->is_object() && !meta->is_null())
    throw Error(cat("index ", index_path, " has a \"metadata\" that is not an object: found ", describe(*meta)));
  auto weight_map = index.find("weight_map");
  if (weight_map == index.end()) throw Error(cat("index ", index_path, " has no \"weight_map\""));
  if (!weight_map->is_object())
    throw Error(cat("index ", index_path, " has a \"weight_map\" that is not an object: found ", describe(*weight_map)));

  SafetensorsSet set;
  set.dir_ = dir;
  set.source_ = cat("checkpoint ", dir);
  std::map<std::string, const SafetensorsFile*> shards;  // shard name -> opened file, each opened once
  for (const auto& [name, shard_value] : weight_map->items()) {
    if (!shard_value.is_string())
      throw Error(cat("index ", index_path, " maps tensor ", shown(name), " to ", describe(shard_value),
                      " instead of a shard file name"));
    const std::string& shard = shard_value.get_ref<const std::string&>();
    auto it = shards.find(shard);
    if (it == shards.end()) {
      fs::path rel(shard);
      bool escapes = shard.empty() || rel.is_absolute() ||
                     std::any_of(rel.begin(), rel.end(), [](const fs::path& part) { return part == ".."; });
      if (escapes)
        throw Error(cat("index ", index_path, " maps tensor ", shown(name), " to shard ", shown(shard),
                        ", which is not a file name inside ", dir));
      std::string shard_path = (fs::path(dir) / rel).string();
      if (!fs::exists(fs::symlink_status(shard_path, ec)))
        throw Error(cat("index ", index_path, " maps tensor ", shown(name), " to shard ", shown(shard), ", but ",
                        shard_path, " does not exist"));
      set.files_.push_back(SafetensorsFile::open(shard_path));
      it = shards.emplace(shard, set.files_.back().get()).first;
    }
    const TensorInfo* info = it->second->find(name);
    if (!info)
      throw Error(cat("index ", index_path, " maps tensor ", shown(name), " to shard ", shown(shard), ", but ",
                      it->second->path(), " has no tensor ", shown(name)));
    set.entries_.emplace(name, Entry{it->second, info});
  }
  return set;
}

const SafetensorsSet::Entry& SafetensorsSet::entry(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw Error(cat(source_, " has no tensor ", shown(name)));
  return it->second;
}

const TensorInfo* SafetensorsSet::find(const std::string& name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : it->second.info;
}

Tensor SafetensorsSet::tensor(const std::string& name) const { return entry(name).file->tensor(name); }

const std::string& SafetensorsSet::file_of(const std::string& name) const { return entry(name).file->path(); }

std::vector<std::string> SafetensorsSet::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& kv : entries_) out.push_back(kv.first);
  return out;
}

// ---------------------------------------------------------------------------------------------
// SafetensorsWriter

SafetensorsWriter::SafetensorsWriter() { metadata_["format"] = "pt"; }

namespace {
// The header is JSON, which must be UTF-8; nlohmann refuses to serialize anything else.
void check_utf8(const std::string& s, const char* what) {
  try {
    (void)json(s).dump();
  } catch (const json::exception&) {
    throw Error(cat(what, " ", shown(s), " is not valid UTF-8, which the JSON header of a safetensors file requires"));
  }
}
}  // namespace

void SafetensorsWriter::add(const std::string& name, const Tensor& t) {
  check_utf8(name, "tensor name");
  if (name == "__metadata__") throw Error("a tensor cannot be named \"__metadata__\": safetensors reserves that key");
  if (index_.count(name)) throw Error(cat("SafetensorsWriter already has a tensor named ", shown(name)));
  if (t.device() != Device::CPU) throw Error(cat("tensor ", shown(name), " is not on the CPU; copy it there before saving"));
  for (int64_t d : t.shape())
    if (d < 0) throw Error(cat("tensor ", shown(name), " has shape ", shape_str(t.shape()), " with a negative dimension"));
  if (!t.defined() && t.nbytes() != 0) throw Error(cat("tensor ", shown(name), " has no data"));
  index_.emplace(name, entries_.size());
  entries_.push_back(Entry{name, t});
}

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) {
  check_utf8(key, "metadata key");
  check_utf8(value, "metadata value");
  metadata_[key] = value;
}

void SafetensorsWriter::write_entries(const std::string& path, const std::vector<const Entry*>& entries) const {
  // Header keys in insertion order with __metadata__ first, as HF's writer does.
  ordered_json header = ordered_json::object();
  ordered_json meta = ordered_json::object();
  for (const auto& [k, v] : metadata_) meta[k] = v;
  header["__metadata__"] = std::move(meta);
  uint64_t offset = 0;
  for (const Entry* e : entries) {
    uint64_t bytes = e->tensor.nbytes();
    ordered_json info = ordered_json::object();
    info["dtype"] = dtype_name(e->tensor.dtype());
    info["shape"] = ordered_json::array();
    for (int64_t d : e->tensor.shape()) info["shape"].push_back(d);
    info["data_offsets"] = ordered_json::array({offset, offset + bytes});
    header[e->name] = std::move(info);
    offset += bytes;
  }
  std::string text = header.dump();
  // Padding to a multiple of 8 puts the data section, and so every tensor whose offset is a
  // multiple of its element size, at an aligned address in a mapping.
  text.append((8 - text.size() % 8) % 8, ' ');
  uint8_t length[8];
  for (int i = 0; i < 8; ++i) length[i] = uint8_t(uint64_t(text.size()) >> (8 * i));

  write_atomically(path, [&](int fd) {
    write_all(fd, length, 8, path);
    write_all(fd, text.data(), text.size(), path);
    for (const Entry* e : entries) write_all(fd, e->tensor.data(), e->tensor.nbytes(), path);
  });
}

void SafetensorsWriter::write(const std::string& path) const {
  std::vector<const Entry*> all;
  all.reserve(entries_.size());
  for (const Entry& e : entries_) all.push_back(&e);
  write_entries(path, all);
}

void SafetensorsWriter::write_sharded(const std::string& dir, size_t max_shard_bytes) const {
  if (max_shard_bytes == 0) throw Error(cat("cannot shard a checkpoint into ", dir, " with a shard size limit of 0 bytes"));
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw Error(cat("cannot write a sharded checkpoint to ", dir, ": it is not an existing directory"));

  // Greedy in insertion order, like HF's save_pretrained: start a new shard when the next tensor
  // would overflow the current one; a tensor above the limit gets a shard of its own.
  std::vector<std::vector<const Entry*>> shards(1);
  size_t shard_bytes = 0;
  uint64_t total_bytes = 0;
  for (const Entry& e : entries_) {
    size_t bytes = e.tensor.nbytes();
    if (!shards.back().empty() && bytes > max_shard_bytes - std::min(shard_bytes, max_shard_bytes)) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(&e);
    shard_bytes += bytes;
    total_bytes += bytes;
  }

  json weight_map = json::object();
  const size_t n = shards.size();
  for (size_t i = 0; i < n; ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, n);
    write_entries((fs::path(dir) / name).string(), shards[i]);
    for (const Entry* e : shards[i]) weight_map[e->name] = name;
  }
  json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", std::move(weight_map)}};
  std::string text = index.dump(2) + "\n";
  std::string index_path = (fs::path(dir) / kIndexName).string();
  write_atomically(index_path, [&](int fd) { write_all(fd, text.data(), text.size(), index_path); });
}

}  // namespace fathom
