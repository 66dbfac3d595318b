"""Regenerate tests/data/embeddings/: tiny sentence-transformers folders and their vectors.

Needs torch and transformers, which the kiln venv deliberately does not have (see
scripts/make_hf_variant_fixtures.py for such a venv); sentence-transformers is not needed:
the pooling and normalization are computed here as its Pooling and Normalize modules
compute them.

    /work/peers/torch/bin/python scripts/make_embedding_fixtures.py

Two folders, each in sentence-transformers' layout (``modules.json``, ``1_Pooling/config.json``,
a Normalize module, ``sentence_bert_config.json``) with random weights (fixed seeds):

* ``bert_mean``: a 2-layer BERT encoder (bidirectional attention, token types, absolute
  positions, post-LayerNorm, GELU), a WordPiece tokenizer adding [CLS] ... [SEP], mean pooling.
* ``qwen3_last``: a 2-layer qwen3 decoder saved as ``Qwen3Model`` (no ``model.`` prefix, no
  LM head: what sentence-transformers saves for Qwen3-Embedding), a word-level tokenizer that
  appends ``<|endoftext|>``, last-token pooling.

``reference.json`` holds the texts, transformers' token ids for them, and the pooled,
normalized vectors, each computed from the text alone (no padding) in float32 with eager
attention; ``batched_max_abs`` is how far a right-padded batch of all texts (with the
attention mask) moves them, a check that padding is handled.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "embeddings"

WORDS = ("the a an of to and in is it that for on with as was at by be this are from or have not "
         "cat dog bird fish tree house car road sky sun moon star red blue green small big fast slow "
         "runs sleeps eats sings quickly happy sad day night water fire stone city river").split()
TEXTS = ["the cat sleeps", "a big red dog runs quickly on the road at night",
         "Sun", "happy birds sing in the green tree by the river", "unknownword and the moon"]


def _st_layout(folder: Path, pooling: str, max_seq_length: int) -> None:
    """modules.json, the Pooling config and sentence_bert_config.json as sentence-transformers writes them."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    modes = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
    hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
    pool = {"word_embedding_dimension": hidden, **{f"pooling_mode_{m}": m == pooling for m in modes},
            "include_prompt": True}
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pool, indent=2) + "\n")
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                  "do_lower_case": False}, indent=2) + "\n")


def _pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """sentence-transformers' Pooling: mean over the unmasked tokens, or the last unmasked one."""
    if mode == "mean_tokens":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
    if mode == "lasttoken":
        last = mask.sum(1) - 1          # right padding
        return hidden[torch.arange(hidden.shape[0]), last]
    raise ValueError(mode)


def _vectors(model, tok, mode: str, token_types: bool) -> dict:
    ids = [tok(t)["input_ids"] for t in TEXTS]
    out = []
    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            kw = {"token_type_ids": torch.zeros_like(x)} if token_types else {}
            h = model(input_ids=x, attention_mask=torch.ones_like(x), **kw).last_hidden_state
            out.append(torch.nn.functional.normalize(_pool(h, torch.ones_like(x), mode), p=2, dim=1)[0])
        n = max(map(len, ids))
        x = torch.tensor([r + [0] * (n - len(r)) for r in ids])
        mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in ids])
        kw = {"token_type_ids": torch.zeros_like(x)} if token_types else {}
        h = model(input_ids=x, attention_mask=mask, **kw).last_hidden_state
        batched = torch.nn.functional.normalize(_pool(h, mask, mode), p=2, dim=1)
    vec = torch.stack(out)
    return {"texts": TEXTS, "input_ids": ids, "pooling": mode, "normalize": True,
            "embeddings": [[float(v) for v in row] for row in vec],
            "batched_max_abs": float((batched - vec).abs().max()),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def make_bert(folder: Path) -> dict:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"##{c}" for c in "sdeyr"] + list("abcdefghijklmnopqrstuvwxyz")
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tok.model_max_length = 64
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
                                  hidden_act="gelu", layer_norm_eps=1e-12, initializer_range=0.2,
                                  attn_implementation="eager")
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    return _finish(model, folder, tok, "LayerNorm", "mean_tokens", token_types=True)


def _finish(model, folder: Path, tok, norms: str, pooling: str, token_types: bool) -> dict:
    """Norm weights moved away from the identity (the parameters named with ``norms``), the
    model saved in the sentence-transformers layout, and its reference vectors."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if norms in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    _st_layout(folder, pooling, 64)
    return _vectors(model, tok, pooling, token_types=token_types)


def make_qwen3(folder: Path) -> dict:
    vocab = {w: i for i, w in enumerate(["<unk>", "<|endoftext|>"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", pair="$A $B <|endoftext|>",
                                                        special_tokens=[("<|endoftext|>", 1)])
    folder.mkdir(parents=True)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                               pad_token="<|endoftext|>", unk_token="<unk>", model_max_length=64)
    tok.save_pretrained(folder)
    torch.manual_seed(1)
    cfg = transformers.Qwen3Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.2,
                                   tie_word_embeddings=True, eos_token_id=1, pad_token_id=1,
                                   attn_implementation="eager")
    model = transformers.Qwen3Model(cfg).eval()
    return _finish(model, folder, tok, "norm", "lasttoken", token_types=False)


def main() -> None:
    for name, make in (("bert_mean", make_bert), ("qwen3_last", make_qwen3)):
        folder = OUT / name
        shutil.rmtree(folder, ignore_errors=True)
        ref = make(folder)
        (folder / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
        print(f"{name}: {len(ref['texts'])} texts, dimension {len(ref['embeddings'][0])}, "
              f"padded batch moves them by {ref['batched_max_abs']:.2e}")


if __name__ == "__main__":
    main()
