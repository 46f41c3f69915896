"""Exact FLOPs (and CPU/GPU time) of a train step of the paper's stack, baseline vs BUS, and
where they go.

    python benchmarks/flops.py [--batch 4] [--time-rounds 2] [--tiny]

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and
attention; SDPA is forced onto its math backend, which the counter sees; elementwise work,
normalisation, softmax, the optimizer and the ``bus_kernels`` custom ops are not counted: the
selection ops do no multiply-adds, and ``relevance_scores`` with one text query is O(B H N d), well
under 0.1% of a step). Counts are deterministic, immune to this machine's noise, and per image
linear in the batch (bar the ITC similarity matrices). They are taken on the ``meta`` device
(shapes only: seconds, no memory), which gives the same counts as real tensors
(``tests/test_paper_model.py::test_flop_count_on_meta_equals_cpu``); ``transformers``' mask helpers
read mask values to skip all-ones masks, which meta tensors cannot, so they are told to always
build the mask (the same matmul FLOPs). Rows:

- the train step (forward + backward of every loss) of baseline@256, BUS text-guided (the paper;
  ``text_guided_from`` 0 and, as the cheaper option, only the last TSPS layer), BUS image-guided,
  and BUS at 384 px;
- the ViT alone (the text-free pass, forward + backward);
- per part (ViT, PAD, text encoder, fusion, decoder, momentum encoders, heads): forward FLOPs,
  attributed by module (exact; the counter's attribution of the backward to modules is not
  reliable for modules called several times per step), with forward time per part;
- ``--time-rounds N``: train step time (forward, backward, SGD step), baseline and BUS alternating
  in one process, N rounds after a warm-up.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bus.model import BUSConfig, BUSModel

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
TEXT_LEN = 32

PART_OF = {  # (object path, method) -> part; the counter's running total is read around each call
    ("vision", "stem"): "ViT", ("vision", "rest"): "ViT", ("vision.pad", "forward"): "PAD",
    ("text", "forward"): "text encoder (3 passes)", ("fusion", "forward"): "fusion", ("decoder", "forward"): "decoder",
    ("vision_m", "stem"): "momentum encoders", ("vision_m", "rest"): "momentum encoders",
    ("text_m", "forward"): "momentum encoders",
}
PARTS = ["ViT", "PAD", "text encoder (3 passes)", "fusion", "decoder", "momentum encoders", "heads, ITC, rest"]


def paper_batch(cfg: BUSConfig, B: int, seed: int = 0) -> dict:
    """B images at cfg.img_size, captions of TEXT_LEN tokens ([CLS] w.. [SEP], the second half
    randomly padded), patch labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(cfg.num_special_tokens, cfg.vocab_size, (B, TEXT_LEN), generator=g)
    lengths = torch.randint(TEXT_LEN // 2, TEXT_LEN + 1, (B,), generator=g)
    am = (torch.arange(TEXT_LEN)[None, :] < lengths[:, None]).long()
    ids[:, 0] = cfg.cls_token_id
    ids[torch.arange(B), lengths - 1] = cfg.sep_token_id
    ids = ids.masked_fill(am == 0, cfg.pad_token_id)
    P = (cfg.img_size // 16) ** 2
    return {"images": torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g).to(DEVICE),
            "input_ids": ids.to(DEVICE), "attention_mask": am.to(DEVICE),
            "patch_labels": (torch.rand(B, P, generator=g) < 0.3).float().to(DEVICE)}


def build(cfg: BUSConfig, bus: bool, seed: int = 0, device=DEVICE) -> BUSModel:
    torch.manual_seed(seed)
    with torch.device(device):
        return BUSModel(cfg, bus=bus).train()


@contextlib.contextmanager
def shapes_only():
    """Lets ``transformers``' mask creation run on meta tensors (never skip a mask by its values)."""
    import transformers.masking_utils as mu

    saved = mu.is_tracing
    mu.is_tracing = lambda *a, **k: True
    try:
        yield
    finally:
        mu.is_tracing = saved


def count(cfg: BUSConfig, bus: bool, B: int) -> tuple[int, int, dict]:
    """(train-step FLOPs, ViT-alone FLOPs, forward FLOPs per part) on the meta device."""
    with shapes_only():
        m = build(cfg, bus, device="meta")
        batch = {k: v.to("meta") for k, v in paper_batch(cfg, B).items()}
        return step_flops(m, batch), vit_flops(m, batch["images"]), {p: v[0] for p, v in forward_parts(m, batch).items()}


def step_flops(model, batch: dict) -> int:
    """FLOPs of one train step: forward of every loss + backward (exact, see the module doc)."""
    torch.manual_seed(0)  # the same hard negatives, masks and splits for every model
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(batch)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def vit_flops(model, images) -> int:
    """FLOPs of the text-free ViT pass (+ nothing else), forward + backward."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        tokens, _ = model.vision(images)
        tokens.float().mean().backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def forward_parts(model, batch: dict, count: bool = True) -> dict:
    """{part: [forward FLOPs, forward seconds]} of one training forward: each part's calls are
    wrapped, and the counter's running total and the clock are read around them (a part's
    FLOPs are exact whether or not the work sits inside a module, e.g. attention on pruned tokens).
    ``count=False``: times only, without the counter (whose per-op Python hook slows small ops)."""
    acc = {p: [0, 0.0] for p in PARTS}
    fc = FlopCounterMode(display=False) if count else _NoCount()
    wrapped = []
    for (path, meth), part in PART_OF.items():
        if not _has(model, path):
            continue
        obj = model.get_submodule(path)
        orig = getattr(obj, meth)

        def wrapper(*a, _orig=orig, _part=part, **k):
            f0, t0 = fc.get_total_flops(), _now()
            out = _orig(*a, **k)
            acc[_part][0] += fc.get_total_flops() - f0
            acc[_part][1] += _now() - t0
            return out

        setattr(obj, meth, wrapper)  # an instance attribute shadows the method / Module.forward
        wrapped.append((obj, meth))
    torch.manual_seed(0)
    try:
        t0 = _now()
        # Counting needs SDPA's math backend (the counter sees its matmuls); timing runs the
        # backends a real step uses (math with a float mask is several times slower on CPU).
        with (sdpa_kernel(SDPBackend.MATH) if count else contextlib.nullcontext()), fc:
            model(batch)
        t_all = _now() - t0
    finally:
        for obj, meth in wrapped:
            delattr(obj, meth)
    total = fc.get_total_flops()
    acc["heads, ITC, rest"] = [total - sum(v[0] for v in acc.values()), max(0.0, t_all - sum(v[1] for v in acc.values()))]
    acc["total"] = [total, t_all]
    return acc


class _NoCount:
    def get_total_flops(self) -> int:
        return 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _now() -> float:
    if ON_GPU:
        torch.cuda.synchronize()
    return time.perf_counter()


def _has(model, key: str) -> bool:
    try:
        return model.get_submodule(key) is not None
    except AttributeError:
        return False


def time_interleaved(models: dict, batches: dict, rounds: int) -> dict:
    """{name: [step seconds per round]}: forward, backward, SGD step, models alternating (order
    swapped each round); one warm-up step each first."""
    opts = {n: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-6) for n, m in models.items()}

    def step(n):
        t0 = time.perf_counter()
        models[n](batches[n])["loss"].backward()
        opts[n].step()
        opts[n].zero_grad(set_to_none=True)
        if ON_GPU:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for n in models:
        step(n)
    times = {n: [] for n in models}
    order = list(models)
    for r in range(rounds):
        for n in order if r % 2 == 0 else order[::-1]:
            times[n].append(step(n))
    return times


def configs(tiny: bool = False) -> dict:
    """name -> (config, bus) of the FLOP rows; the first row is the reference."""
    make = BUSConfig.paper_tiny if tiny else BUSConfig.paper
    base = make()  # BUS as the preset: the caption guides the last TSPS layer, ITC on the stem, reused negatives
    hi = 128 if tiny else 384
    lo = base.img_size
    every = dict(text_guided_from=0, itc_on="rest", itm_negatives="guided")
    return {
        f"baseline@{lo}": (base, False),
        f"bus@{lo}": (base, True),
        f"bus-text-every-layer@{lo}": (dataclasses.replace(base, **every), True),
        f"bus-text-last-own-pass@{lo}": (dataclasses.replace(base, itc_on="rest", itm_negatives="guided"), True),
        f"bus-text-last-pair-guided@{lo}": (dataclasses.replace(base, itm_negatives="guided"), True),
        f"bus-image@{lo}": (dataclasses.replace(base, guidance="image"), True),
        f"bus@{hi}": (dataclasses.replace(base, img_size=hi), True),
        f"bus-image@{hi}": (dataclasses.replace(base, img_size=hi, guidance="image"), True),
        f"bus-keep0.5@{hi}": (dataclasses.replace(base, img_size=hi, keep=0.5), True),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="paper_tiny instead of the paper preset")
    ap.add_argument("--time-rounds", type=int, default=0, help="interleaved step timing rounds (0: none)")
    ap.add_argument("--time-parts", action="store_true", help="also time each part's forward (real tensors)")
    ap.add_argument("--no-count", action="store_true", help="skip the FLOP rows (timing only)")
    ap.add_argument("--rows", default="", help="comma-separated subset of the rows")
    args = ap.parse_args()
    rows = configs(args.tiny)
    if args.rows:
        rows = {k: v for k, v in rows.items() if k in args.rows.split(",")}
    B = args.batch
    where = torch.cuda.get_device_name() if ON_GPU else "CPU"
    print(f"paper{'_tiny' if args.tiny else ''} preset, batch {B}, captions of {TEXT_LEN} tokens, fp32, {where}\n")
    results, parts = {}, {}
    for name, (cfg, bus) in rows.items():
        parts[name] = {p: [0, 0.0] for p in PARTS + ["total"]}
        if not args.no_count:
            step, vit, fwd = count(cfg, bus, B)
            results[name] = (step, vit)
            for p, f in fwd.items():
                parts[name][p][0] = f
            print(f"{name}: step {step / B / 1e9:.1f} GFLOP/image, ViT alone {vit / B / 1e9:.1f}", flush=True)
        if args.time_parts:
            m = build(cfg, bus)
            batch = paper_batch(cfg, B)
            forward_parts(m, batch, count=False)  # warm-up
            for p, (_, sec) in forward_parts(m, batch, count=False).items():
                parts[name][p][1] = sec
            del m
    if results:
        ref = next(iter(results))
        print(f"\n| model | train step GFLOP / image | {ref} / model | ViT alone (fwd+bwd) GFLOP / image | ViT ratio |")
        print("|---|---:|---:|---:|---:|")
        for name, (s, v) in results.items():
            print(f"| {name} | {s / B / 1e9:.1f} | {results[ref][0] / s:.2f}x | {v / B / 1e9:.1f} | {results[ref][1] / v:.2f}x |")
        print("\n| part (forward) | " + " | ".join(f"{n} GFLOP/img" for n in parts) + " |")
        print("|---|" + "---:|" * len(parts))
        for p in PARTS + ["total"]:
            print(f"| {p} | " + " | ".join(f"{parts[n][p][0] / B / 1e9:.2f}" for n in parts) + " |")
    if args.time_parts:
        print(f"\n| part (forward time, {where}) | " + " | ".join(f"{n} ms" for n in parts) + " |")
        print("|---|" + "---:|" * len(parts))
        for p in PARTS + ["total"]:
            print(f"| {p} | " + " | ".join(f"{parts[n][p][1] * 1e3:.0f}" for n in parts) + " |")
    if args.time_rounds:
        pair = {n: rows[n] for n in list(rows)[:2]}
        models = {n: build(c, b) for n, (c, b) in pair.items()}
        batches = {n: paper_batch(c, B) for n, (c, _) in pair.items()}
        times = time_interleaved(models, batches, args.time_rounds)
        a, b = list(times)
        med = {n: statistics.median(t) for n, t in times.items()}
        print(f"\ninterleaved train step ({where}, fwd+bwd+SGD, {args.time_rounds} rounds after a warm-up): "
              + ", ".join(f"{n} " + "/".join(f"{x:.2f}" for x in t) + " s" for n, t in times.items())
              + f"; {a} / {b} = {med[a] / med[b]:.2f}x (ratio of medians; per round "
              + ", ".join(f"{x / y:.2f}x" for x, y in zip(times[a], times[b])) + ")")


if __name__ == "__main__":
    main()
