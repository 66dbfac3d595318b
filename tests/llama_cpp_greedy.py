"""Run under a Python that has llama-cpp-python: what llama.cpp makes of one GGUF file.

    python llama_cpp_greedy.py MODEL.gguf '{"ids": [...], "n": 16, "texts": ["..."], "lora": "A.gguf"}'

``lora`` (optional) is a LoRA GGUF llama.cpp applies to the model at scale 1. Prints JSON: the n greedy ids after ``ids``, and llama.cpp's tokenization of each text.
``vocab_only`` (optional): the file holds a vocabulary and no weights; only the texts are tokenized.
"""
import json
import sys

import numpy as np
from llama_cpp import Llama

path, spec = sys.argv[1], json.loads(sys.argv[2])
llm = Llama(model_path=path, n_threads=2, n_ctx=256, logits_all=True, verbose=False,
            vocab_only=bool(spec.get("vocab_only")), **({"lora_path": spec["lora"]} if spec.get("lora") else {}))
greedy = []
if not spec.get("vocab_only"):
    llm.reset()
    llm.eval(spec["ids"])
for _ in range(0 if spec.get("vocab_only") else spec.get("n", 16)):
    t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    greedy.append(t)
    llm.eval([t])
tokens = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in spec.get("texts", [])]
print(json.dumps({"greedy": greedy, "tokens": tokens}))
