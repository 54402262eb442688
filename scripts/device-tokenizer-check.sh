#!/usr/bin/env bash
# Does HuggingFace load what `fathom tokenizer train` writes, and encode as fathom does?
#
# Here (carry ["device-data/trained-tokenizer"] afterwards):
#   bash scripts/device-tokenizer-check.sh --prepare [FATHOM_BINARY]
# trains a 12,000-token tokenizer on the first 3 MB of the tokenizer benchmark corpus
# (scripts/make-tokenizer-corpus.sh), and writes with it, into device-data/trained-tokenizer/:
# the tokenizer, a held-out sample (the rest of the corpus plus a Unicode stress text), fathom's
# ids for it with and without special tokens, and fathom's rendering of a conversation.
# On the GPU machine (which has `tokenizers` and `transformers`):
#   bash scripts/device-tokenizer-check.sh
# loads the tokenizer with `tokenizers.Tokenizer.from_file` and `transformers.AutoTokenizer`,
# compares the ids and the chat template's output with fathom's and prints a table.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=device-data/trained-tokenizer
if [ "${1:-}" = "--prepare" ]; then
  fathom=${2:-build/fathom}
  corpus=bench-models/tokenizer-corpus.txt
  [ -s "$corpus" ] || scripts/make-tokenizer-corpus.sh "$corpus"
  rm -rf "$dir" && mkdir -p "$dir/tok"
  head -c 3000000 "$corpus" >"$dir/train.txt"
  # keep whole UTF-8 characters: cut at the last line end
  python3 - "$dir/train.txt" <<'PY'
import sys
p = sys.argv[1]
b = open(p, "rb").read()
open(p, "wb").write(b[: b.rfind(b"\n") + 1])
PY
  tail -c +"$(($(stat -c %s "$dir/train.txt") + 1))" "$corpus" >"$dir/sample.txt"
  printf '\n漢字とかなカナ交じり文 读书 🙂👍🏽 e\xcc\x81 \t\r\n 12345678 <think>why</think> <｜User｜>hi<｜Assistant｜>\n' >>"$dir/sample.txt"
  "$fathom" tokenizer train -q "$dir/train.txt" -o "$dir/tok" --vocab-size 12000
  rm "$dir/train.txt"
  "$fathom" tokenize --tokenizer "$dir/tok" --json <"$dir/sample.txt" >"$dir/ids.json"
  "$fathom" tokenize --tokenizer "$dir/tok" --json --add-special <"$dir/sample.txt" >"$dir/ids-special.json"
  printf '%s' '[{"role":"system","content":"Answer from the docs."},{"role":"user","content":"What is a list?"},'\
'{"role":"assistant","content":"A sequence.","reasoning_content":"Recall the tutorial."},{"role":"user","content":"And a dict?"}]' \
    >"$dir/messages.json"
  "$fathom" chat-template --tokenizer "$dir/tok" --messages "$dir/messages.json" --add-generation-prompt >"$dir/chat.txt"
  echo "device-tokenizer-check: $dir prepared ($(du -sh "$dir" | cut -f1)); carry [\"$dir\"]"
  exit 0
fi
[ -s "$dir/ids.json" ] || { echo "device-tokenizer-check: $dir is missing: run --prepare here and carry it" >&2; exit 1; }
python3 - "$dir" <<'PY'
import json, sys
d = sys.argv[1]
rows = []
text = open(f"{d}/sample.txt", encoding="utf-8", newline="").read()  # newline="": keep \r as it is
want = json.load(open(f"{d}/ids.json"))["ids"]
want_sp = json.load(open(f"{d}/ids-special.json"))["ids"]
from tokenizers import Tokenizer
t = Tokenizer.from_file(f"{d}/tok/tokenizer.json")
got = t.encode(text, add_special_tokens=False).ids
got_sp = t.encode(text, add_special_tokens=True).ids
def first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
rows.append(("tokenizers: ids of the sample", got == want, f"{len(want)} ids" if got == want else f"differ at {first_diff(got, want)}"))
rows.append(("tokenizers: ids with special tokens", got_sp == want_sp, f"first {got_sp[:1]} vs {want_sp[:1]}"))
rows.append(("tokenizers: decode(ids) == text", t.decode(want, skip_special_tokens=False) == text, ""))
from transformers import AutoTokenizer
at = AutoTokenizer.from_pretrained(f"{d}/tok")
rows.append(("transformers: ids of the sample", at.encode(text, add_special_tokens=False) == want, type(at).__name__))
msgs = json.load(open(f"{d}/messages.json"))
chat = at.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
want_chat = open(f"{d}/chat.txt", encoding="utf-8", newline="").read()
rows.append(("transformers: chat template", chat == want_chat or chat == want_chat.rstrip("\n"), repr(chat[:60])))
rows.append(("vocab size", at.vocab_size + len(at.get_added_vocab()) >= 12000 and len(at) == 12000, f"len {len(at)}"))
print("| check | result | note |\n|---|---|---|")
for name, ok, note in rows:
    print(f"| {name} | {'ok' if ok else 'FAILED'} | {note} |")
sys.exit(0 if all(ok for _, ok, _ in rows) else 1)
PY
