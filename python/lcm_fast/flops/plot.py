"""Figure 13 of the paper with lcm_fast's fast-engine curves added (``lcm-fast flops --plot``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from ..archs import get_arch
from .model import LLAMA, crossover_sentence_length, lcm_pipeline_flops, llm_flops

CONTEXTS = (250, 500, 1000, 2000, 4000, 8000, 16000)
SENTENCE_LENGTHS = (5, 10, 20, 40)
LCMS = {"1.6B": "two_tower_diffusion_lcm_1_6B", "7B": "two_tower_diffusion_lcm_7B"}


def figure13_data(lcm: str = "1.6B", llm: str = "llama2-7b", steps: int = 40, cfg: bool = True,
                  contexts: Sequence[int] = CONTEXTS, sentence_lengths: Sequence[int] = SENTENCE_LENGTHS) -> dict:
    """The numbers behind the figure: total inference FLOPs per context size for the LLM and for the
    LCM pipeline (official and fast algorithms) at each sentence length, and the crossover sentence
    length per context size."""
    config, model = get_arch(LCMS[lcm]), LLAMA[llm]
    data: dict = {"lcm": lcm, "llm": llm, "steps": steps, "cfg": cfg, "contexts": list(contexts),
                  "llm_flops": [llm_flops(model, c) for c in contexts], "lcm_flops": {}, "crossover": {}}
    for algorithm in ("official", "fast"):
        data["lcm_flops"][algorithm] = {
            str(length): [lcm_pipeline_flops(config, c, length, steps=steps, cfg=cfg, algorithm=algorithm).total
                          for c in contexts] for length in sentence_lengths}
        data["crossover"][algorithm] = [crossover_sentence_length(config, model, c, steps=steps, cfg=cfg,
                                                                  algorithm=algorithm) for c in contexts]
    return data


def plot_figure13(data: dict, path: str | Path, json_path: Optional[str | Path] = None) -> Path:
    """Left: FLOPs vs context size (LLM; LCM official solid, fast dashed, one colour per sentence length).
    Right: LCM / LLM FLOP ratio vs context size (below 1: the LCM is cheaper)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the FLOP plot needs matplotlib: pip install lcm-fast[plot]") from e
    contexts = data["contexts"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    left.plot(contexts, data["llm_flops"], "k-o", label=data["llm"])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, length in zip(colours, data["lcm_flops"]["official"]):
        for algorithm, style in (("official", "-"), ("fast", "--")):
            values = data["lcm_flops"][algorithm][length]
            label = f"LCM {data['lcm']} {algorithm}, {length} tok/sent"
            left.plot(contexts, values, style, color=colour, label=label)
            right.plot(contexts, [v / b for v, b in zip(values, data["llm_flops"])], style, color=colour, label=label)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("context size (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    left.set_ylabel("inference FLOPs")
    left.set_title(f"SONAR + Two-Tower ({data['steps']} steps{', CFG' if data['cfg'] else ''}) vs LLM")
    right.axhline(1.0, color="k", lw=0.8)
    right.set_ylabel(f"LCM / {data['llm']} FLOPs")
    right.set_title("LCM / LLM (< 1: LCM cheaper); solid official, dashed fast engine", fontsize=10)
    left.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(data, indent=1) + "\n")
    return path
