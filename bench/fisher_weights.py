#!/usr/bin/env python3
"""Fisher information weights for KVQuant's k-means: squared gradients of the language-model loss with
respect to every key (pre-RoPE) and value activation, written for `kvshard calibrate --fisher_weights`.

The model is Hugging Face transformers loading the same GGUF file the C++ side runs (dequantized to
fp32). The text is tokenized with the model's tokenizer (no BOS, as `kvshard calibrate` does); windows
of --ctx tokens; the loss of a window is the mean next-token cross entropy over it. The gradient of the
k_proj / v_proj outputs is taken per element and squared (the diagonal Fisher information of KVQuant).

File format (coordinator/quality.h, LoadFisherWeights), little-endian:
  8 bytes "KVSHFSH\\n"; u32 version 1; i32 n_layers; i32 channels; i64 n_tokens; i64 ctx;
  i32 tokens[n_tokens]; per layer: bf16 key[n_tokens][channels], bf16 value[n_tokens][channels]

Usage: fisher_weights.py --model MODEL.gguf --text FILE --out FILE [--tokens 16384] [--ctx 2048]
Needs: torch, transformers, gguf (PyPI). CPU is enough (a few minutes for 16K tokens).
"""
import argparse
import os
import struct
import sys
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    directory, name = os.path.split(os.path.abspath(args.model))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = min(len(ids), args.tokens) // args.ctx
    if windows == 0:
        sys.exit(f"fisher_weights.py: the text has {len(ids)} tokens, shorter than one window of {args.ctx}")
    n_tokens = windows * args.ctx
    ids = ids[:n_tokens]

    layers = model.model.layers
    n_layers = len(layers)
    channels = layers[0].self_attn.k_proj.out_features
    captured = {}

    def capture(key):
        def hook(module, inputs, output):
            output.retain_grad()
            captured[key] = output
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.k_proj.register_forward_hook(capture(("k", i))))
        handles.append(layer.self_attn.v_proj.register_forward_hook(capture(("v", i))))

    key_w = [np.empty((n_tokens, channels), dtype=np.uint16) for _ in range(n_layers)]
    value_w = [np.empty((n_tokens, channels), dtype=np.uint16) for _ in range(n_layers)]

    def to_bf16_bits(t):
        return t.detach().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

    start = time.time()
    for w in range(windows):
        window = torch.tensor([ids[w * args.ctx:(w + 1) * args.ctx]])
        # The hooked projection outputs need gradients although the weights do not: make the embedding
        # output require them so the graph is built.
        embeds = model.model.embed_tokens(window).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1], window[0, 1:])
        loss.backward()
        rows = slice(w * args.ctx, (w + 1) * args.ctx)
        for i in range(n_layers):
            key_w[i][rows] = to_bf16_bits(captured[("k", i)].grad[0] ** 2)
            value_w[i][rows] = to_bf16_bits(captured[("v", i)].grad[0] ** 2)
        captured.clear()
        print(f"fisher_weights.py: window {w + 1}/{windows}, loss {loss.item():.4f}, "
              f"{time.time() - start:.0f} s", file=sys.stderr, flush=True)

    with open(args.out, "wb") as f:
        f.write(b"KVSHFSH\n")
        f.write(struct.pack("<Iiiqq", 1, n_layers, channels, n_tokens, args.ctx))
        f.write(np.asarray(ids, dtype="<i4").tobytes())
        for i in range(n_layers):
            f.write(key_w[i].tobytes())
            f.write(value_w[i].tobytes())
    print(f"fisher_weights.py: wrote {args.out} ({n_tokens} tokens, {n_layers} layers)", file=sys.stderr)


if __name__ == "__main__":
    main()
