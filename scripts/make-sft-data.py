#!/usr/bin/env python3
"""Chat examples for fathom-mini's supervised stage, answered from the documentation itself.

    python3 scripts/make-sft-data.py CORPUS_TEXT_DIR OUT.jsonl [--max 600] [--seed 0]

CORPUS_TEXT_DIR is the text/ folder scripts/make-mini-corpus.sh writes. Each output line is one
conversation, {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}, for
`fathom data prepare --chat`:
- from the Python 3.11 library reference: every `.. function::`, `.. method::` and `.. class::`
  directive with its first paragraph becomes "what does X do?" answered by that paragraph (RST
  roles such as :func:`len` reduced to their text);
- from the Git manuals: each command's NAME line and the first paragraph of its DESCRIPTION;
- a few conversations written here about who the model is and what it knows.
Questions are phrased from a few templates; of --max conversations, the written ones take three
copies each, the Git commands up to a quarter, Python entries (sampled with the seed) the rest.
Deterministic for a given corpus.
"""
import argparse
import json
import os
import random
import re
import sys

ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`!?~?([^`<]*?)(?:\s*<[^>]*>)?`")


def clean(text):
    """RST inline markup to plain text, whitespace collapsed."""
    text = ROLE.sub(lambda m: m.group(1), text)
    text = text.replace("``", "`").replace("**", "").replace("\\", "")
    return re.sub(r"\s+", " ", text).strip()


def first_paragraph(lines, i, indent):
    """The first paragraph of the block indented deeper than `indent`, from line i on."""
    para = []
    while i < len(lines) and not lines[i].strip():
        i += 1
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            break
        if len(line) - len(line.lstrip()) <= indent or line.strip().startswith(".."):
            break
        para.append(line.strip())
        i += 1
    return clean(" ".join(para))


def python_examples(text_dir):
    out = []
    pydir = os.path.join(text_dir, "python3.11-doc")
    if not os.path.isdir(pydir):
        return out
    for name in sorted(os.listdir(pydir)):
        if "_library_" not in name:
            continue
        lines = open(os.path.join(pydir, name), encoding="utf-8").read().split("\n")
        module = ""
        for i, line in enumerate(lines):
            m = re.match(r"^\.\. (?:py:)?module:: (\S+)", line)
            if m:
                module = m.group(1)
                continue
            m = re.match(r"^(\s*)\.\. (function|method|class):: (.+)$", line)
            if not m:
                continue
            indent, kind, sig = len(m.group(1)), m.group(2), m.group(3).strip()
            desc = first_paragraph(lines, i + 1, indent)
            if len(desc) < 40 or len(desc) > 700:
                continue
            short = sig.split("(")[0].strip()
            full = f"{module}.{short}" if module and kind == "function" and "." not in short else short
            out.append(("python", kind, full, sig, desc))
    return out


def git_examples(text_dir):
    out = []
    gitdir = os.path.join(text_dir, "git-doc")
    if not os.path.isdir(gitdir):
        return out
    for name in sorted(os.listdir(gitdir)):
        m = re.match(r"usr_share_doc_git-doc_(git-[a-z0-9-]+)\.txt$", name)
        if not m:
            continue
        text = open(os.path.join(gitdir, name), encoding="utf-8").read()
        nm = re.search(r"^NAME\n-+\n(git-[a-z0-9-]+) - (.+)$", text, re.M)
        ds = re.search(r"^DESCRIPTION\n-+\n(.+?)(?:\n\n|\Z)", text, re.M | re.S)
        if not nm or not ds:
            continue
        desc = clean(ds.group(1))
        if len(desc) < 40 or len(desc) > 900:
            continue
        command = nm.group(1).replace("git-", "git ", 1)
        out.append(("git", "command", command, nm.group(2).strip(), desc))
    return out


WRITTEN = [
    ("Hi!", "Hello! I am fathom-mini, a small language model trained by fathom on the Python 3.11 and Linux "
            "documentation. Ask me about Python, Git, Bash or Linux."),
    ("Who are you?", "I am fathom-mini: a small DeepSeek-V3-style model (MLA attention, a mixture of experts, "
                     "multi-token prediction) that fathom trained from scratch on freely licensed documentation."),
    ("What can you help me with?", "Questions about the Python standard library, Git commands, Bash and the Linux "
                                   "kernel documentation. I am small, so check what I say against the documentation."),
    ("Thanks!", "You're welcome. Ask again any time."),
    ("Can you browse the web?", "No. I only know what was in my training text: the Python, Git, Bash, SQLite, "
                                "Debian and Linux documentation packaged by Debian 12."),
]


def conversations(py, git, rng, n):
    """n conversations: the Git commands (up to a quarter of n), Python entries for the rest."""
    git = rng.sample(git, min(len(git), n // 4))
    py = rng.sample(py, min(len(py), n - len(git)))
    convs = []
    for _, kind, full, sig, desc in py:
        q = rng.choice([f"What does `{full}` do in Python?", f"Explain `{sig}`.",
                        f"How is the Python {kind} `{full}` used?", f"Tell me about `{full}`."])
        convs.append([{"role": "user", "content": q}, {"role": "assistant", "content": f"`{sig}`: {desc}"}])
    for _, _, command, summary, desc in git:
        q = rng.choice([f"What does `{command}` do?", f"How do I use {command}?", f"Explain the {command} command."])
        a = f"`{command}` — {summary[0].lower() + summary[1:]}. {desc}"
        convs.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    return convs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("text_dir")
    ap.add_argument("out")
    ap.add_argument("--max", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not os.path.isdir(a.text_dir):
        sys.exit(f"make-sft-data: {a.text_dir} is not a directory (the text/ folder of make-mini-corpus.sh)")
    rng = random.Random(a.seed)
    py, git = python_examples(a.text_dir), git_examples(a.text_dir)
    if not py and not git:
        sys.exit(f"make-sft-data: no Python or Git documentation found under {a.text_dir}")
    # the written ones three times each, the generated ones for the rest
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": r}] for q, r in WRITTEN] * 3 + \
        conversations(py, git, rng, max(0, a.max - 3 * len(WRITTEN)))
    rng.shuffle(convs)
    with open(a.out + ".tmp", "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")
    os.replace(a.out + ".tmp", a.out)
    print(f"make-sft-data: {len(convs)} conversations ({len(py)} Python and {len(git)} Git entries found) -> {a.out}")


if __name__ == "__main__":
    main()
