// safetensors: the checkpoint format of HuggingFace (https://github.com/huggingface/safetensors).
//
//   [8 bytes: little-endian u64 N] [N bytes: JSON header, space padded] [data section]
//
// The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} with
// offsets relative to the data section, plus an optional "__metadata__" string->string map.
//
// SafetensorsFile memory-maps a file read-only and validates the whole header before anyone
// sees a tensor, so that a corrupt or hostile file becomes one fathom::Error sentence and never
// an out-of-bounds read. Tensors are views into the mapping; each view's owner keeps the
// mapping alive, so a Tensor may outlive every SafetensorsFile handle. (Truncating a file in
// place while it is mapped would still fault on access, as with any mmap reader; the writer
// below replaces files by rename, which leaves existing mappings intact.)
// SafetensorsSet is a checkpoint directory (one file, or shards listed by
// model.safetensors.index.json). SafetensorsWriter writes files HF transformers loads.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"

namespace fathom {

// HF's reader refuses headers above 100 MB; so do we, which bounds the work a header costs.
constexpr uint64_t kSafetensorsMaxHeaderBytes = 100'000'000;

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  uint64_t begin = 0, end = 0;  // byte range [begin, end) relative to the data section
};

class SafetensorsFile : public std::enable_shared_from_this<SafetensorsFile> {
 public:
  // Maps and validates `path`; throws fathom::Error naming the file (and tensor) on any problem.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  // nullptr when absent.
  const TensorInfo* find(const std::string& name) const;
  // Every tensor, ordered by position in the data section.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // A read-only view into the mapping (writing through it faults). If the file places the
  // tensor at an address not aligned to its element size (legal in the format, though the HF
  // and fathom writers never do it) this returns an aligned copy instead, so that typed
  // access stays defined behaviour. Throws fathom::Error "FILE has no tensor NAME" if absent.
  Tensor tensor(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Size of the data section in bytes.
  uint64_t data_bytes() const { return data_bytes_; }

 private:
  SafetensorsFile() = default;
  void parse_header(const char* header, size_t header_bytes);

  std::string path_;
  void* map_ = nullptr;      // the whole file, PROT_READ
  size_t map_bytes_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data section inside map_
  uint64_t data_bytes_ = 0;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

// A checkpoint: one safetensors file or a sharded set behind model.safetensors.index.json.
class SafetensorsSet {
 public:
  // Opens DIR/model.safetensors.index.json and its shards when the index exists, else
  // DIR/model.safetensors. Given a regular file instead of a directory, opens that file alone.
  static SafetensorsSet open_dir(const std::string& dir);
  // Opens one explicit .safetensors file as a set of one.
  static SafetensorsSet open_file(const std::string& path);

  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  // nullptr when absent.
  const TensorInfo* find(const std::string& name) const;
  // Throws fathom::Error naming the checkpoint and the tensor when absent.
  Tensor tensor(const std::string& name) const;
  // All tensor names, sorted. With an index, exactly the names of its weight_map.
  std::vector<std::string> names() const;
  // Path of the file that holds `name`; throws fathom::Error when absent.
  const std::string& file_of(const std::string& name) const;
  // The checkpoint directory (for a single explicit file: the directory that holds it).
  const std::string& dir() const { return dir_; }
  // The opened files, each once, in the order they were first referenced.
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }

 private:
  struct Entry {
    const SafetensorsFile* file;
    const TensorInfo* info;
  };
  const Entry& entry(const std::string& name) const;

  std::string dir_;
  std::string source_;  // what error messages name: the index, the file or the directory
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, Entry> entries_;
};

// Collects tensors and writes them as a standard safetensors file (or a sharded set).
// Tensors are referenced, not copied: they must not change until the last write returns.
class SafetensorsWriter {
 public:
  // The metadata starts as {"format": "pt"}: HF transformers refuses safetensors files whose
  // metadata lacks a known format.
  SafetensorsWriter();

  // Any dtype, CPU only; throws fathom::Error on a duplicate or invalid name.
  void add(const std::string& name, const Tensor& t);
  void set_metadata(const std::string& key, const std::string& value);

  // Writes PATH atomically: PATH.tmp.<pid>, fsync, rename. On failure the temporary file is
  // removed, PATH is left as it was, and fathom::Error says why.
  void write(const std::string& path) const;
  // Writes DIR/model-0000i-of-0000n.safetensors, each at most max_shard_bytes of tensor data
  // (a larger tensor gets a shard of its own), in insertion order, then
  // DIR/model.safetensors.index.json; each file atomically, the index last, so the index
  // only ever names complete shards. DIR must exist.
  void write_sharded(const std::string& dir, size_t max_shard_bytes) const;

  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    std::string name;
    Tensor tensor;
  };
  void write_entries(const std::string& path, const std::vector<const Entry*>& entries) const;

  std::vector<Entry> entries_;
  std::unordered_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace fathom
