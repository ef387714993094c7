"""Where the step time of `quant:bits=2` goes on the GPT-2-style char LM of `randprop bench
transformer` (4 layers, hidden 256, 4 heads, 8 x 128 characters, vocabulary 84): forward and
backward of each variant, adding one part at a time, timed in alternation (one step of every
variant per round, the first round untimed), one CPU thread.

    PYTHONPATH=src python benchmarks/transformer_time_parts.py benchmarks/results/transformer/time-parts.md
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import randprop as rp
from randprop.experiments import report
from randprop.experiments.transformer_lm import LM_SIZE, transformers_lm
from randprop.methods.attention import use_compact_attention
from randprop.methods.loss import linear_cross_entropy

VOCAB, ROUNDS = 84, 8


def main(out: Path) -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = transformers_lm("gpt2", LM_SIZE, VOCAB)
    x, y = (torch.randint(0, VOCAB, (8, LM_SIZE["context"]), generator=gen) for _ in range(2))

    def fused(m):
        h = m.base_model(input_ids=x).last_hidden_state
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), m.lm_head.weight, y.reshape(-1))

    def plain(m):
        return F.cross_entropy(m(input_ids=x).logits.reshape(-1, VOCAB), y.reshape(-1))

    def variant(convert=None, masks=True, attention=False):
        m = copy.deepcopy(base)
        if convert:
            rp.convert(m, convert, activation_masks=masks)
        if attention:
            use_compact_attention(m)
        return m

    variants = {
        "exact (the model's logits)": (variant(), plain),
        "exact + fused loss": (variant(), fused),
        "exact + compact attention + fused loss": (variant(attention=True), fused),
        "`quant:bits=2` weight layers only": (variant("quant:bits=2", masks=False), plain),
        "`quant:bits=2` every op (weights, activations, norms, dropout)":
            (variant("quant:bits=2"), plain),
        "the suite's `quant:bits=2` (every op + compact attention + fused loss)":
            (variant("quant:bits=2", attention=True), fused),
    }  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.random.fork_rng(devices=[]):
        for r in range(ROUNDS + 1):
            for label, (model, loss) in variants.items():
                t0 = time.perf_counter()
                model.zero_grad(set_to_none=True)
                loss(model).backward()
                if r:
                    times[label].append(time.perf_counter() - t0)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    exact = next(iter(median.values()))
    rows = [[k, f"{v:.3f}", f"{v / exact:.2f}x"] for k, v in median.items()]
    lines = [
        "# Where the step time goes: GPT-2-style char LM, `quant:bits=2`",
        "",
        f"Command: `PYTHONPATH=src python benchmarks/transformer_time_parts.py {out}`  ",
        f"Machine: {report.machine()}; {report.date()}; load {report.load()}.",
        "",
        __doc__.split("\n\n")[0].replace("\n", " "),
        "",
        *report.markdown_table(["variant", "forward + backward (s, median)", "vs exact"], rows),
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/transformer/time-parts.md"))
