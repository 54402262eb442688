#!/usr/bin/env bash
# The fathom-mini training corpus, rebuilt by anyone from Debian 12 packages: English prose
# (the Python 3.11 documentation, the Linux kernel documentation, the Git manuals, the Bash
# manual, the Debian Reference, the SQLite documentation) and code (the Python standard
# library, the Bash examples), all freely licensed (PSF, GPL-2, GPL, public domain — each
# package's copyright file is kept in the output).
#
#   bash scripts/make-mini-corpus.sh OUT_DIR
#
# 1. `apt-get download`s the packages below (run `apt-get update` first on a fresh machine; the
#    versions fetched and their .deb sha256 go in the manifest) and unpacks them with dpkg-deb;
# 2. takes the text of each: reStructuredText and asciidoc sources as they are (decompressed),
#    HTML through a tag stripper that keeps paragraphs and <pre> blocks, Python and shell
#    sources as code; files that are not UTF-8, binaries, images and tiny files are skipped;
# 3. normalises line ends and blank runs, strips the site navigation every HTML page of a
#    package repeats (short lines found in more than half of its pages), and drops documents
#    whose text (ignoring whitespace) was already taken;
# 4. writes one document per file under OUT_DIR/text/<package>/, OUT_DIR/manifest.json
#    (packages, versions, sha256s, document and byte counts per package, what was dropped and
#    why), and OUT_DIR/corpus.tar.xz (the text, to carry to the GPU machine).
# Deterministic for the same package versions: files are walked in sorted order.
set -euo pipefail
export LC_ALL=C
if [ $# -ne 1 ]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
out="$1"
for tool in apt-get dpkg-deb python3 sha256sum xz tar; do
  command -v "$tool" >/dev/null || { echo "make-mini-corpus: '$tool' is needed and was not found" >&2; exit 1; }
done
packages=(python3.11-doc linux-doc-6.1 git-doc bash-doc debian-reference-en sqlite3-doc libpython3.11-stdlib
          libpython3.11-minimal)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/debs" "$work/x"
(cd "$work/debs" && apt-get download "${packages[@]}" 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
for p in "${packages[@]}"; do
  deb=$(ls "$work/debs/${p}"_*.deb 2>/dev/null | head -1)
  [ -n "$deb" ] || { echo "make-mini-corpus: could not download $p (run 'apt-get update' first?)" >&2; exit 1; }
  mkdir -p "$work/x/$p"
  dpkg-deb -x "$deb" "$work/x/$p"
done
rm -rf "$out"
mkdir -p "$out"
python3 - "$work" "$out" "${packages[@]}" <<'PY'
import gzip, hashlib, html.parser, json, os, re, sys

work, out, packages = sys.argv[1], sys.argv[2], sys.argv[3:]

class HtmlText(html.parser.HTMLParser):
    """Visible text of an HTML page: block elements end lines, <pre> keeps its layout."""
    SKIP = {"script", "style", "head", "nav", "footer", "noscript", "svg"}
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr", "table",
             "dt", "dd", "dl", "blockquote", "section", "hr", "title"}
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip, self.pre = [], 0, 0
    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP: self.skip += 1
        if tag == "pre": self.pre += 1
        if tag in self.BLOCK: self.parts.append("\n")
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6"): self.parts.append("\n")
    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skip: self.skip -= 1
        if tag == "pre" and self.pre: self.pre -= 1
        if tag in self.BLOCK: self.parts.append("\n")
    def handle_data(self, data):
        if self.skip: return
        self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))
    def text(self):
        lines = [l.rstrip() for l in "".join(self.parts).split("\n")]
        return "\n".join(l.lstrip() if not l.startswith("    ") else l for l in lines)

def html_text(raw):
    p = HtmlText()
    p.feed(raw)
    p.close()
    return p.text()

# (package, which files, how to read them); paths are relative to the unpacked package
RULES = {
    "python3.11-doc": [(r"usr/share/doc/python3\.11/html/_sources/.*\.rst\.txt$", "text")],
    "linux-doc-6.1": [(r"usr/share/doc/linux-doc-6\.1/Documentation/.*\.(rst|txt)\.gz$", "text")],
    "git-doc": [(r"usr/share/doc/git-doc/.*\.txt$", "text")],
    "bash-doc": [(r"usr/share/doc/bash/bash\.html$", "html"),
                 (r"usr/share/doc/bash/examples/.*\.(sh|bash)$", "text"),
                 (r"usr/share/doc/bash/examples/(scripts|functions|misc|startup-files)/[^.]+$", "text")],
    "debian-reference-en": [(r"usr/share/debian-reference/.*\.en\.html$", "html")],
    "sqlite3-doc": [(r"usr/share/doc/sqlite3/.*\.html$", "html")],
    "libpython3.11-stdlib": [(r"usr/lib/python3\.11/.*\.py$", "text")],
    "libpython3.11-minimal": [(r"usr/lib/python3\.11/.*\.py$", "text")],
}
MIN_BYTES = 200

def normalise(t):
    t = t.replace("\r\n", "\n").replace("\r", "\n")
    t = "\n".join(l.rstrip() for l in t.split("\n"))
    t = re.sub(r"\n{3,}", "\n\n", t).strip("\n")
    return t + "\n"

seen = {}
manifest = {"packages": [], "documents": 0, "bytes": 0, "dropped": {"duplicate": 0, "not_utf8": 0, "too_small": 0}}
for pkg in packages:
    root = os.path.join(work, "x", pkg)
    deb = [f for f in sorted(os.listdir(os.path.join(work, "debs"))) if f.startswith(pkg + "_")][0]
    sha = hashlib.sha256(open(os.path.join(work, "debs", deb), "rb").read()).hexdigest()
    version = deb[len(pkg) + 1:].rsplit("_", 1)[0].replace("%3a", ":")
    files = []
    for d, _, names in os.walk(root):
        for n in names:
            files.append(os.path.relpath(os.path.join(d, n), root))
    files.sort()
    entry = {"name": pkg, "version": version, "deb": deb, "sha256": sha, "documents": 0, "bytes": 0,
             "duplicates": 0, "not_utf8": 0, "too_small": 0}
    docs = []  # (rel, text, how)
    for rel in files:
        how = next((h for pat, h in RULES.get(pkg, []) if re.match(pat, rel)), None)
        if how is None or os.path.islink(os.path.join(root, rel)):
            continue
        raw = open(os.path.join(root, rel), "rb").read()
        if rel.endswith(".gz"):
            raw = gzip.decompress(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            entry["not_utf8"] += 1
            continue
        if "\x00" in text:
            entry["not_utf8"] += 1
            continue
        if how == "html":
            text = html_text(text)
        docs.append((rel, normalise(text), how))
    # site navigation repeated on every HTML page (menus, headers): the short lines found in
    # more than half of a package's pages are dropped from them
    pages = [t for _, t, h in docs if h == "html"]
    common = {}
    for t in pages:
        for line in set(l for l in t.split("\n") if l.strip() and len(l) < 100):
            common[line] = common.get(line, 0) + 1
    boiler = {l for l, n in common.items() if len(pages) >= 10 and n > len(pages) // 2}
    entry["boilerplate_lines"] = len(boiler)
    for rel, text, how in docs:
        if how == "html" and boiler:
            text = normalise("\n".join(l for l in text.split("\n") if l not in boiler))
        if len(text.encode("utf-8")) < MIN_BYTES:
            entry["too_small"] += 1
            continue
        key = hashlib.sha256(re.sub(r"\s+", "", text).encode("utf-8")).hexdigest()
        if key in seen:
            entry["duplicates"] += 1
            continue
        seen[key] = rel
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", rel)
        name = re.sub(r"\.gz$", "", name) + ("" if name.endswith(".txt") else ".txt")
        dst = os.path.join(out, "text", pkg, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "w", encoding="utf-8", newline="").write(text)
        entry["documents"] += 1
        entry["bytes"] += len(text.encode("utf-8"))
    # the package's licence terms travel with its text
    cr = [f for f in files if f.endswith("/copyright")]
    if cr:
        os.makedirs(os.path.join(out, "licenses"), exist_ok=True)
        open(os.path.join(out, "licenses", pkg + ".copyright"), "wb").write(open(os.path.join(root, cr[0]), "rb").read())
    manifest["packages"].append(entry)
    manifest["documents"] += entry["documents"]
    manifest["bytes"] += entry["bytes"]
    for k in ("duplicates", "not_utf8", "too_small"):
        manifest["dropped"]["duplicate" if k == "duplicates" else k] += entry[k]
    print(f"{pkg} {version}: {entry['documents']} documents, {entry['bytes'] / 1e6:.1f} MB "
          f"({entry['duplicates']} duplicates, {entry['not_utf8']} not UTF-8, {entry['too_small']} too small dropped)")
json.dump(manifest, open(os.path.join(out, "manifest.json"), "w"), indent=1)
print(f"corpus: {manifest['documents']} documents, {manifest['bytes'] / 1e6:.1f} MB")
PY
tar -C "$out" -cf - text licenses manifest.json | xz -T0 -9 >"$out/corpus.tar.xz"
(cd "$out" && sha256sum corpus.tar.xz >corpus.tar.xz.sha256)
echo "make-mini-corpus: $out/corpus.tar.xz ($(du -h "$out/corpus.tar.xz" | cut -f1)), sha256 $(cut -c1-16 "$out/corpus.tar.xz.sha256")…"
