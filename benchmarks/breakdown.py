"""Where a train step's time goes on the small stack (``BUSConfig()``): forward + backward of each
part of the baseline and the BUS model, timed separately on the end-to-end benchmark's data
(ViT-B/16 at 224, batch 8 on CPU). For the paper's stack (``BUSConfig.paper()``), FLOPs and time
per part come from ``benchmarks/flops.py``.

    python benchmarks/breakdown.py [--batch 8] [--img-size 224] [--keep 0.7] [--rounds 3]

Parts: the image side (ViT, plus PAD for BUS), the text encoder, the fusion encoder as ITM runs
it (3B rows: positives and two hard-negative sets) and as LM runs it (B rows, causal). The
fusion parts get random text states and an image memory of the size each model gives them (every
ViT token for the baseline, the PAD summary for BUS). Prints a Markdown table with the minimum
over ``--rounds`` after one warm-up, the two models alternating part by part. It explains the
end-to-end ratio (Amdahl); it does not replace it.
"""
from __future__ import annotations

import argparse
import time

import torch

from bus.model import BUSConfig, BUSModel


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


def _once(fn) -> float:
    t0 = time.perf_counter()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=ON_GPU):  # as the e2e benchmark
        fn()
    if ON_GPU:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def parts(model: BUSModel, batch: int, img_size: int, text_len: int) -> tuple[dict, int]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, img_size, img_size, generator=g).to(DEVICE)
    ids = torch.randint(5, model.config.vocab_size, (batch, text_len), generator=g).to(DEVICE)
    am = torch.ones(batch, text_len, dtype=torch.long, device=DEVICE)
    D = model.vision.embed_dim

    def image_side():
        tokens, pad = model.encode_image(images)
        mem, _ = model.image_memory(tokens, pad)
        (mem.float().mean() + tokens[:, 0].float().mean()).backward()

    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=ON_GPU):
        tokens, pad = model.encode_image(images)
        mem_len = model.image_memory(tokens, pad)[0].shape[1]
    text = torch.randn(batch, text_len, D, generator=g).to(DEVICE).requires_grad_()
    mem = torch.randn(batch, mem_len, D, generator=g).to(DEVICE).requires_grad_()
    no_pad = torch.zeros(batch, text_len, dtype=torch.bool, device=DEVICE)

    def itm():
        t3, m3 = torch.cat([text] * 3), torch.cat([mem] * 3)
        model.fusion(t3, torch.cat([no_pad] * 3), m3, None).float().mean().backward()

    def lm():
        model.fusion(text, no_pad, mem, None, causal=True).float().mean().backward()

    def text_side():
        model.encode_text(ids, am).float().mean().backward()

    return {"image side (ViT, + PAD for BUS)": image_side, "text encoder": text_side,
            "fusion as ITM runs it (3B rows)": itm, "fusion as LM runs it (B rows)": lm}, mem_len


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--keep", type=float, default=0.7)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = BUSConfig(vocab_size=1000, img_size=args.img_size, keep=args.keep)
    torch.manual_seed(0)
    fb, mem_base = parts(BUSModel(cfg, bus=False).to(DEVICE).train(), args.batch, args.img_size, args.text_len)
    torch.manual_seed(0)
    fv, mem_bus = parts(BUSModel(cfg, bus=True).to(DEVICE).train(), args.batch, args.img_size, args.text_len)
    base, bus = {}, {}
    for name in fb:  # the two models alternate, so a drift of the machine's speed hits both alike
        _once(fb[name]), _once(fv[name])  # warm-up
        tb, tv = [], []
        for _ in range(args.rounds):
            tb.append(_once(fb[name]))
            tv.append(_once(fv[name]))
        base[name], bus[name] = min(tb), min(tv)
    where = torch.cuda.get_device_name() if ON_GPU else "CPU"
    print(f"ViT-B/16 {args.img_size}px, batch {args.batch}, {'bf16 autocast' if ON_GPU else 'fp32'}, forward + "
          f"backward, min of {args.rounds} after a warm-up ({where}); BUS keep {args.keep} at blocks "
          f"{tuple(cfg.tsps_layers)} + PAD {cfg.pad_queries}; fusion memory {mem_base} (baseline) / {mem_bus} (BUS) tokens\n")
    print("| part | baseline ms | BUS ms | BUS / baseline |\n|---|---:|---:|---:|")
    for (k, b), v in zip(base.items(), bus.values()):
        print(f"| {k} | {b * 1e3:.0f} | {v * 1e3:.0f} | {v / b:.2f} |")
    tb, tv = sum(base.values()), sum(bus.values())
    print(f"| sum of parts | {tb * 1e3:.0f} | {tv * 1e3:.0f} | {tv / tb:.2f} (speed-up {tb / tv:.2f}x) |")


if __name__ == "__main__":
    main()
