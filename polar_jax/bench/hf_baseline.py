"""What users run today: Hugging Face transformers + torch dense decoding of the benchmark shapes.

Random bf16 weights of the same shapes, a cache prefilled with `context` random tokens per row, then
decode steps timed with CUDA synchronisation: eager, and optionally `torch.compile(mode="reduce-overhead")`
(CUDA graphs). A static cache is used where this transformers version accepts one (the row says which).
Needs torch and transformers on a CUDA machine; polar-jax itself never imports torch.

    PYTHONPATH=. python -m polar_jax.bench.hf_baseline --shape llama2-7b --batches 1 16 --context 2048 --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

from polar_jax.bench.shapes import SHAPES
from polar_jax.config import ModelConfig


def hf_config(cfg: ModelConfig):
    import transformers

    if cfg.family == "opt":
        return transformers.OPTConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                      ffn_dim=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                                      num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_position_embeddings,
                                      word_embed_proj_dim=cfg.hidden_size, do_layer_norm_before=True)
    return transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                    intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                                    num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                                    max_position_embeddings=max(cfg.max_position_embeddings, 16384),
                                    rope_theta=cfg.rope.theta)


def time_decode(model, hf_cfg, batch: int, context: int, steps: int, compiled: bool) -> dict:
    import torch
    import transformers

    dev = "cuda"
    cache_kind = "static"
    try:
        cache = transformers.StaticCache(config=hf_cfg, max_cache_len=context + steps + 8)
    except Exception:  # noqa: BLE001 - older/newer signatures
        cache, cache_kind = transformers.DynamicCache(), "dynamic"
    ids = torch.randint(0, hf_cfg.vocab_size, (batch, context), device=dev)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        fwd = model.forward
        if compiled:
            fwd = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        t_compile = time.perf_counter()
        pos = context
        for _ in range(3):  # warm-up (and compilation)
            out = fwd(input_ids=tok, past_key_values=cache, use_cache=True,
                      cache_position=torch.tensor([pos], device=dev))
            tok = out.logits[:, -1:].argmax(-1)
            pos += 1
        torch.cuda.synchronize()
        warm_s = time.perf_counter() - t_compile
        t = time.perf_counter()
        for _ in range(steps):
            out = fwd(input_ids=tok, past_key_values=cache, use_cache=True,
                      cache_position=torch.tensor([pos], device=dev))
            tok = out.logits[:, -1:].argmax(-1)
            pos += 1
        torch.cuda.synchronize()
    step = (time.perf_counter() - t) / steps
    return {"step_s": step, "tokens_per_s": batch / step, "cache": cache_kind, "warmup_s": warm_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hf_baseline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="also torch.compile(mode='reduce-overhead')")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    import torch
    import transformers

    cfg = SHAPES[args.shape]
    hf_cfg = hf_config(cfg)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=torch.bfloat16)
    model.eval()
    rows = []
    for batch in args.batches:
        for compiled in ([False, True] if args.compile else [False]):
            try:
                r = time_decode(model, hf_cfg, batch, args.context, args.steps, compiled)
            except Exception as e:  # noqa: BLE001 - a failing configuration is a finding
                r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            r.update(shape=args.shape, batch=batch, context=args.context, mode="torch.compile" if compiled else "eager")
            rows.append(r)
            print(json.dumps(r), flush=True)
            torch.cuda.empty_cache()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
           "date": datetime.date.today().isoformat(),
           "command": "python -m polar_jax.bench.hf_baseline " + " ".join(argv if argv is not None else sys.argv[1:]),
           "rows": rows}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"hf_baseline_{args.shape}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
