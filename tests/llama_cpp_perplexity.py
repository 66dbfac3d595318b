"""Run under a Python that has llama-cpp-python: its perplexity of token ids on one GGUF file.

    python llama_cpp_perplexity.py MODEL.gguf IDS.json

Prints the perplexity of every token after the first, each predicted from all before it (one
pass with every position's logits), as a JSON number.
"""
import json
import sys

import numpy as np
from llama_cpp import Llama

path, ids = sys.argv[1], json.load(open(sys.argv[2]))
llm = Llama(model_path=path, n_threads=2, n_ctx=len(ids) + 8, n_batch=512, logits_all=True, verbose=False)
llm.reset()
llm.eval(ids)
logits = np.array(llm.scores[:len(ids) - 1], dtype=np.float64)
m = logits.max(-1, keepdims=True)
logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
print(json.dumps(float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))))
