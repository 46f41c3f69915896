"""Independent, loop-by-loop implementations of the contract (float64, Python loops), used to
check the references. Slow on purpose: nothing here shares code with bus_kernels."""
from __future__ import annotations

import math

import torch


def ranking(row: list[float]) -> list[int]:
    """Columns by descending score, lower index first among equals."""
    return sorted(range(len(row)), key=lambda j: (-row[j], j))


def fused(tokens, row, top, fuse):
    """The fused token of one sample: score-weighted sum (or mean) of the tokens not in ``top``."""
    acc = torch.zeros(tokens.shape[1], dtype=torch.float64)
    wsum = 0.0
    for j in range(len(row)):
        if j not in top:
            acc += row[j] * tokens[j]
            wsum += row[j]
    if fuse == "mean":
        return acc / wsum if wsum != 0 else torch.zeros_like(acc)
    return acc


def select(x, scores, k, num_prefix, fuse, order):
    B, N, D = x.shape
    P = num_prefix
    xs, ss = x.double(), scores.double()
    toks, idxs = [], []
    for b in range(B):
        row = ss[b].tolist()
        top = ranking(row)[:k]
        kept = sorted(top) if order == "index" else top
        rows = [xs[b, i] for i in range(P)] + [xs[b, P + j] for j in kept]
        if fuse is not None:
            rows.append(fused(xs[b, P:], row, top, fuse))
        toks.append(torch.stack(rows))
        idxs.append([P + j for j in kept])
    return torch.stack(toks), torch.tensor(idxs, dtype=torch.int64).reshape(B, k)


def mass_keep(scores, mass, min_keep):
    out = []
    for row in scores.double().tolist():
        order = ranking(row)
        total = sum(row)
        run, m = 0.0, len(row)
        for i, j in enumerate(order):
            run += row[j]
            if run / total >= mass:
                m = i + 1
                break
        out.append(max(m, min_keep))
    return torch.tensor(out, dtype=torch.int64)


def select_varlen(x, scores, keep, num_prefix, fuse):
    B, N, D = x.shape
    P = num_prefix
    xs, ss = x.double(), scores.double()
    seqs, idxs = [], []
    for b in range(B):
        row = ss[b].tolist()
        top = sorted(ranking(row)[: int(keep[b])])
        rows = [xs[b, i] for i in range(P)] + [xs[b, P + j] for j in top]
        if fuse is not None:
            rows.append(fused(xs[b, P:], row, top, fuse))
        seqs.append(torch.stack(rows) if rows else torch.zeros(0, D, dtype=torch.float64))
        idxs += [P + j for j in top]
    lengths = [s.shape[0] for s in seqs]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.cat(seqs), torch.tensor(cu, dtype=torch.int32), torch.tensor(idxs, dtype=torch.int64)


def relevance(q, k, scale, q_mask):
    B, H, T, d = q.shape
    N = k.shape[2]
    out = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        tokens = [t for t in range(T) if q_mask is None or bool(q_mask[b, t])]
        for h in range(H):
            for t in tokens:
                logits = [scale * float(q[b, h, t].double() @ k[b, h, n].double()) for n in range(N)]
                m = max(logits)
                e = [math.exp(v - m) for v in logits]
                z = sum(e)
                for n in range(N):
                    out[b, n] += e[n] / z / (H * len(tokens))
    return out


def attention(q, k, v, cu_seqlens, scale, causal, key_bias):
    """Per sequence, per head, per query: a plain softmax over its allowed keys."""
    total, H, d = q.shape
    out = torch.zeros(total, H, d, dtype=torch.float64)
    cu = cu_seqlens.tolist()
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        for h in range(H):
            for i in range(s, e):
                keys = range(s, i + 1) if causal else range(s, e)
                logits = []
                for j in keys:
                    bias = 0.0
                    if key_bias is not None:
                        bias = float(key_bias[j, h] if key_bias.dim() == 2 else key_bias[j])
                    logits.append(scale * float(q[i, h].double() @ k[j, h].double()) + bias)
                m = max(logits)
                if m == float("-inf"):
                    continue
                w = [math.exp(l - m) for l in logits]
                z = sum(w)
                for wj, j in zip(w, keys):
                    out[i, h] += wj / z * v[j, h].double()
    return out
