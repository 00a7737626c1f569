"""Write the CLIP tokenizer's vocabulary (``vocab.json``, ``merges.txt``) that single-file checkpoints
need offline, from the byte-pair-encoding table OpenAI released with CLIP (MIT licence), as the PyPI
wheel of ``open_clip_torch`` ships it (``open_clip/bpe_simple_vocab_16e6.txt.gz``):

    pip download --no-deps open_clip_torch -d /tmp/oc && unzip -o /tmp/oc/*.whl 'open_clip/*.gz' -d /tmp/oc
    python scripts/make_clip_vocab.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz

CLIP's tokenizer uses the first 48,894 merges of that table. Its vocabulary is the 256 byte symbols
(in the byte-to-unicode order of GPT-2's byte-level BPE), the same 256 with the end-of-word mark
``</w>``, one token per merge in order, then ``<|startoftext|>`` and ``<|endoftext|>``: 49,408
tokens, the ids of SD 1.x, 2.x and SDXL's tokenizers (``tests/test_single_file.py`` checks known ids).
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

MERGES = 49152 - 256 - 2   # the merges CLIP uses: its vocabulary is 49,408 tokens
OUT = Path(__file__).resolve().parents[1] / "tokenflow" / "models" / "configs" / "clip-vocab"


def byte_symbols() -> list:
    """The 256 byte symbols of byte-level BPE, in byte order: printable Latin-1 bytes stand for
    themselves, every other byte for chr(256 + k), k counting those bytes in order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        | set(range(ord("\u00ae"), ord("\u00ff") + 1))
    order = sorted(printable) + [b for b in range(256) if b not in printable]
    shown = {b: chr(b) for b in printable}
    shown.update((b, chr(256 + k)) for k, b in enumerate(b for b in range(256) if b not in printable))
    return [shown[b] for b in order]


def main(table: str) -> int:
    lines = gzip.open(table, "rt", encoding="utf-8").read().split("\n")[1: MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    assert len(merges) == MERGES and all(len(m) == 2 for m in merges), "not CLIP's merge table"
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == len(set(tokens)) == 49408
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    print(f"wrote {OUT}/vocab.json ({len(tokens)} tokens) and merges.txt ({len(merges)} merges)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
