#!/usr/bin/env bash
# Builds the tokenizer benchmark corpus: about 4 MB of mixed English prose and source code
# taken from files that a Debian 12 machine able to build fathom has anyway:
#   prose: /usr/share/common-licenses/*, /usr/share/doc/*/copyright, the Debian changelogs
#          (/usr/share/doc/*/changelog.Debian.gz, decompressed);
#   code:  Python sources under /usr/lib/python3.*/ and C headers under /usr/include
#          (libc6-dev and linux-libc-dev come with g++).
# Deterministic for a given set of installed files: byte-order sorted file lists, a fixed cap
# per file (cut at a line end, so no UTF-8 character is split), files whose text is not valid
# UTF-8 dropped, each piece followed by one blank line. Every k-th file of a sorted list is
# taken, k chosen from the sizes so that the quota is spread over all directories.
#
# usage: scripts/make-tokenizer-corpus.sh OUT_FILE
# Writes OUT_FILE, OUT_FILE.sha256 (sha256sum format) and OUT_FILE.manifest (the files taken
# and the bytes taken from each); prints the size and sha256. Fails when too little text was found.
set -euo pipefail
export LC_ALL=C

if [ $# -ne 1 ]; then
  echo "usage: $0 OUT_FILE" >&2
  exit 2
fi
out="$1"
for tool in iconv sha256sum zcat find sort; do
  command -v "$tool" >/dev/null || { echo "make-tokenizer-corpus: '$tool' is needed and was not found" >&2; exit 1; }
done

readonly cap=16384               # bytes at most from one file
readonly prose_quota=2000000     # bytes of prose
readonly code_quota=2000000      # bytes of code (half Python, half C headers; one fills in for the other)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
: >"$tmp/body"
: >"$tmp/manifest"

# take_piece SRC LABEL NAME: the first <= $cap bytes of SRC (plain text) cut at the last line
# end, appended to the corpus when valid UTF-8, free of NUL bytes and not empty; NAME goes in
# the manifest. Prints the bytes added (0 when skipped).
take_piece() {
  local src="$1" label="$2" name="$3" size n keep
  size=$(stat -c %s "$src")
  if [ "$size" -gt "$cap" ]; then
    head -c "$cap" "$src" >"$tmp/piece"
    # keep whole lines only (a file with no line end within the cap gives an empty piece)
    keep=$(grep -c '' "$tmp/piece" || true)
    if [ -n "$(tail -c 1 "$tmp/piece")" ]; then keep=$((keep - 1)); fi
    head -n "$keep" "$tmp/piece" >"$tmp/piece2"
    mv "$tmp/piece2" "$tmp/piece"
  else
    cp "$src" "$tmp/piece"
    if [ "$size" -gt 0 ] && [ -n "$(tail -c 1 "$tmp/piece")" ]; then printf '\n' >>"$tmp/piece"; fi
  fi
  n=$(stat -c %s "$tmp/piece")
  if [ "$n" -eq 0 ] || [ "$(tr -d '\000' <"$tmp/piece" | wc -c)" -ne "$n" ] \
     || ! iconv -f UTF-8 -t UTF-8 "$tmp/piece" >/dev/null 2>&1; then
    echo 0
    return
  fi
  cat "$tmp/piece" >>"$tmp/body"
  printf '\n' >>"$tmp/body"
  printf '%s\t%s\t%d\n' "$label" "$name" "$n" >>"$tmp/manifest"
  echo $((n + 1))
}

# fill LIST QUOTA LABEL [gz]: takes pieces of the listed files not yet in the manifest until
# QUOTA bytes. The files are visited in list order with a stride chosen from their sizes so
# that one pass over the whole list gives about QUOTA (rather than only the first
# directories), then the ones in between when that was not enough. Prints the bytes taken.
fill() {
  local list="$1" quota="$2" label="$3" gz="${4:-}"
  if [ "$quota" -le 0 ]; then echo 0; return; fi
  # files not taken yet, and the bytes one pass over all of them would give (a compressed
  # changelog is counted as 3 times its size)
  awk -F'\t' 'FILENAME == ARGV[1] { taken[$2] = 1; next } !($1 in taken)' "$tmp/manifest" "$list" >"$tmp/todo"
  local -a files
  mapfile -t files < <(cut -f1 "$tmp/todo")
  local count=${#files[@]} taken=0 stride offset i file added expected
  if [ "$count" -eq 0 ]; then echo 0; return; fi
  expected=$(awk -F'\t' -v cap="$cap" -v f="${gz:+3}" '{ s = $2 * (f ? f : 1); t += (s < cap ? s : cap) } END { printf "%d", t }' "$tmp/todo")
  stride=$((expected / quota))
  if [ "$stride" -lt 1 ]; then stride=1; fi
  for ((offset = 0; offset < stride && taken < quota; offset++)); do
    for ((i = offset; i < count && taken < quota; i += stride)); do
      file="${files[$i]}"
      if [ -n "$gz" ]; then
        # only the first $cap bytes are needed: stop decompressing early
        { zcat -- "$file" 2>/dev/null || true; } | head -c $((cap + 1)) >"$tmp/unz"
        added=$(take_piece "$tmp/unz" "$label" "$file")
      else
        added=$(take_piece "$file" "$label" "$file")
      fi
      taken=$((taken + added))
    done
  done
  echo "$taken"
}

list() {  # list OUT_LIST FIND_ARGS...: regular readable files as "path<TAB>size", byte-order sorted
  local dest="$1"
  shift
  { find "$@" -type f -readable -printf '%p\t%s\n' 2>/dev/null || true; } | sort >"$dest"
}

# ---- prose: the licence texts, copyright files up to half the quota, changelogs for the
# rest; more copyright files when the changelogs run short
list "$tmp/licenses" /usr/share/common-licenses
list "$tmp/copyrights" /usr/share/doc -mindepth 2 -maxdepth 2 -name copyright
list "$tmp/changelogs" /usr/share/doc -mindepth 2 -maxdepth 2 -name changelog.Debian.gz
prose=0
prose=$((prose + $(fill "$tmp/licenses" "$prose_quota" prose)))
prose=$((prose + $(fill "$tmp/copyrights" $((prose_quota / 2 - prose)) prose)))
prose=$((prose + $(fill "$tmp/changelogs" $((prose_quota - prose)) prose gz)))
prose=$((prose + $(fill "$tmp/copyrights" $((prose_quota - prose)) prose)))

# ---- code: Python sources of the newest /usr/lib/python3.X up to half the quota, C headers
# for the rest; more Python when the headers run short
python_dir=$(find /usr/lib -mindepth 1 -maxdepth 1 -type d -name 'python3.[0-9]*' 2>/dev/null | sort -V | tail -n 1 || true)
: >"$tmp/python"
if [ -n "$python_dir" ]; then list "$tmp/python" "$python_dir" -name '*.py' -not -path '*-packages/*'; fi
list "$tmp/headers" /usr/include -name '*.h'
code=0
code=$((code + $(fill "$tmp/python" $((code_quota / 2)) code)))
code=$((code + $(fill "$tmp/headers" $((code_quota - code)) code)))
code=$((code + $(fill "$tmp/python" $((code_quota - code)) code)))

total=$(stat -c %s "$tmp/body")
if [ "$prose" -lt 1000000 ] || [ "$code" -lt 1000000 ] || [ "$total" -lt 3000000 ]; then
  echo "make-tokenizer-corpus: too little text found: $prose bytes of prose (licences, /usr/share/doc/*/copyright," \
       "changelog.Debian.gz) and $code bytes of code (${python_dir:-no /usr/lib/python3.X}/*.py, /usr/include/*.h);" \
       "need at least 1 MB of each and 3 MB in all. Install a few packages with documentation, python3 and libc6-dev." >&2
  exit 1
fi
if ! iconv -f UTF-8 -t UTF-8 "$tmp/body" >/dev/null 2>&1; then
  echo "make-tokenizer-corpus: internal error: the corpus is not valid UTF-8" >&2
  exit 1
fi

mkdir -p "$(dirname "$out")"
cp "$tmp/body" "$out.tmp" && mv "$out.tmp" "$out"
cp "$tmp/manifest" "$out.manifest"
(cd "$(dirname "$out")" && sha256sum "$(basename "$out")") >"$out.sha256"
sha=$(cut -d' ' -f1 "$out.sha256")
n_prose=$(grep -c '^prose' "$out.manifest" || true)
n_code=$(grep -c '^code' "$out.manifest" || true)
echo "corpus: $out  $total bytes (prose $prose bytes from $n_prose files, code $code bytes from $n_code files)  sha256 $sha"
