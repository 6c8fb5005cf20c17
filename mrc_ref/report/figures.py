"""The report's figures (matplotlib, the report extra): the only module of
mrc_ref that imports matplotlib, and only when :func:`figures` is called."""

import io

import numpy as np

from ..vit import BLOCK_LINEARS
from .grid import RULES, SENSITIVITY_METHODS, find_row

__all__ = ["figures"]


def _style(plt):
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "font.size": 9, "axes.grid": True,
                         "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False})


def _save(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def _curves(fig):
    """Data artists drawn: lines with at least two points, and bar groups."""
    lines = sum(1 for ax in fig.axes for line in ax.get_lines() if len(line.get_xdata()) > 1
                and not line.get_label().startswith("_"))
    bars = sum(len(ax.containers) for ax in fig.axes)
    return lines + bars


def figures(data):
    """Draw every figure; ``{key: {"file", "title", "caption", "png", "series"}}``
    with ``series`` the number of data curves (lines or bar groups) drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _style(plt)
    out = {}

    def done(key, fig, title, caption):
        out[key] = {"file": f"{key}.png", "title": title, "caption": caption, "series": _curves(fig),
                    "png": _save(fig)}
        plt.close(fig)

    # Fig. 1
    energy = data["energy"]
    fig, axes = plt.subplots(1, len(energy), figsize=(3.1 * len(energy), 3.0), squeeze=False)
    for ax, (name, e) in zip(axes[0], energy.items()):
        k = np.arange(len(e["activation_aware"]))
        ax.plot(k, e["activation_aware"], label="activation-aware SVD (output energy)", color="C0")
        ax.plot(k, e["weight_svd_on_outputs"], label="weight SVD, output energy", color="C1")
        ax.plot(k, e["weight_svd"], label="weight SVD, weight energy", color="C1", linestyle="--")
        ax.set_title(f"{name} ({e['shape'][0]}×{e['shape'][1]})")
        ax.set_xlabel("rank r")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("energy kept")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8,
               bbox_to_anchor=(0.5, -0.1), frameon=False)
    done("fig1_energy", fig, "Fig. 1 — energy kept against rank",
         f"The four matrices of blocks.{data['settings']['block']}. Solid blue: activation-aware SVD, "
         "1 − NMSE(r) of the output X Wᵀ on the calibration statistics. Solid orange: plain weight SVD truncated "
         "at r, measured on the same outputs. Dashed orange: plain weight SVD in its own measure, "
         "1 − ‖W − W_r‖²/‖W‖². One decomposition per layer and statistic (the ones compress uses).")

    # Fig. 2
    orig = data["original"]["top1"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 3.4))
    for leaf, points in data["layer_types"].items():
        x = [p["rank_reduction"] for p in points]
        ax1.plot([0.0] + x, [100 * orig] + [100 * p["top1"] for p in points], marker="o", label=leaf)
        ax2.plot(x, [p["output_nmse"] for p in points], marker="o", label=leaf)
    ax1.axhline(100 * orig, color="grey", linestyle=":", linewidth=1, label="_original")
    for ax in (ax1, ax2):
        ax.set_xlabel("rank reduction 1 − r / min(m, n)")
    ax1.set_ylabel("top-1 (%)")
    ax2.set_ylabel("output NMSE of the logits")
    ax2.set_yscale("log")
    ax1.legend(title="compressed alone", fontsize=8)
    done("fig2_layer_types", fig, "Fig. 2 — top-1 against rank reduction, each layer type compressed alone",
         "Every layer of one type (all blocks) at the same rank, activation-aware SVD, no compensation "
         "(compress --layers 'blocks.*.TYPE' --rank R --compensation none); the other layers dense. Left: top-1 "
         "(dotted: the original model); right: output NMSE of the logits against the original's, which still "
         "separates the types where top-1 saturates.")

    # Fig. 3
    pe = data.get("proj_error")
    if pe:
        fig, ax = plt.subplots(figsize=(5.6, 3.4))
        blocks = np.arange(len(next(iter(pe.values()))))
        width = 0.8 / len(pe)
        labels = {"optimal": "no compensation", "optimal + exact": "exact compensation",
                  "optimal + Adam": "Adam compensation"}
        for j, (label, values) in enumerate(pe.items()):
            ax.bar(blocks + (j - (len(pe) - 1) / 2) * width, values, width, label=labels.get(label, label))
        ax.set_yscale("log")
        ax.set_xticks(blocks, [f"block {i}" for i in blocks])
        ax.set_ylabel("‖X Wᵀ − X̃ W̃ᵀ‖² / ‖X Wᵀ‖²")
        ax.legend(fontsize=8)
        done("fig3_proj_error", fig, "Fig. 3 — normalized output error at attn.proj of each block",
             f"Optimal allocation at reduction {data['settings']['at']}: without compensation (residual rank 0), "
             "with exact and with Adam compensation (residual rank 8, counted in the budget). Measured on the "
             "evaluation images in the compressed model, upstream error included.")

    # allocation map
    at = data["settings"]["at"]
    rows = [(rule, find_row(data, at, rule)) for rule in (*RULES, "optimal, calibrated")]
    rows = [(rule, r) for rule, r in rows if r is not None and "infeasible" not in r]
    if rows:
        names = list(rows[0][1]["ranks"])
        full = {e: min(data["layer_shapes"][e]) for e in names} if "layer_shapes" in data else None
        grid = np.array([[np.nan if r["ranks"][n] is None else r["ranks"][n] for n in names] for _, r in rows],
                        dtype=float)
        fig, ax = plt.subplots(figsize=(max(5.0, 0.42 * len(names) + 1.5), 0.5 * len(rows) + 1.6))
        shown = grid / np.array([full[n] for n in names])[None, :] if full else grid
        image = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap="viridis", vmin=0)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                text = "D" if np.isnan(grid[i, j]) else str(int(grid[i, j]))
                level = shown[i, j] / np.nanmax(shown)
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="black" if np.isnan(grid[i, j]) or level > 0.6 else "white")
        ax.set_yticks(range(len(rows)), [rule for rule, _ in rows])
        ax.set_xticks(range(len(names)), [n.replace("blocks.", "b").replace("attn.", "").replace("mlp.", "")
                                          for n in names], rotation=90, fontsize=7)
        ax.grid(False)
        fig.colorbar(image, ax=ax, label="rank / min(m, n)" if full else "rank", fraction=0.03)
        out_rows = len(rows)
        done("fig4_allocation", fig, f"Allocation map — rank of every layer at reduction {at}",
             f"Rank chosen by each rule without compensation (D: left dense; colour: rank / min(m, n)); "
             f"{out_rows} rules × {len(names)} layers.")
        out["fig4_allocation"]["series"] = out_rows

    # accuracy–size curve
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 3.6))
    styles = {rule: f"C{i}" for i, rule in enumerate(RULES)}
    styles["optimal, calibrated"] = "C4"
    for method in [*RULES, *(f"{r} + exact" for r in RULES), "weight SVD", *SENSITIVITY_METHODS]:
        pts = [r for r in data["grid"] if r["method"] == method and "infeasible" not in r]
        if not pts:
            continue
        rule = method.split(" + ")[0]
        kw = {"color": styles.get(rule, "grey"), "marker": "o" if "+" in method else "s",
              "linestyle": "-" if "+" in method else "--", "label": method}
        ax1.plot([p["params"] for p in pts], [100 * p["top1"] for p in pts], **kw)
        ax2.plot([p["params"] for p in pts], [p["output_nmse"] for p in pts], **kw)
    from matplotlib.ticker import FuncFormatter

    for ax in (ax1, ax2):
        ax.axvline(data["inputs"]["params"], color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("stored parameters")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k"))
    ax1.axhline(100 * orig, color="grey", linestyle=":", linewidth=1)
    ax1.set_ylabel("top-1 (%)")
    ax2.set_ylabel("output NMSE of the logits")
    ax2.set_yscale("log")
    ax1.legend(fontsize=7, ncol=2, loc="lower right")
    done("fig5_accuracy_size", fig, "Accuracy–size curve",
         "Top-1 (left) and output NMSE against the original's logits (right) against stored parameters, per rule: "
         "dashed squares without compensation (residual rank 0), solid circles with exact compensation (residual "
         "rank 8, counted in the budget); grey dashed: plain weight SVD; purple: the calibrated objective "
         "Σ w_l NMSE_l (with --sensitivity). Dotted: the original model.")

    if data.get("sensitivity"):
        weights = data["sensitivity"]["weights"]
        fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(weights) + 1.5), 3.2))
        leaves = [next((leaf for leaf in BLOCK_LINEARS if n.endswith(leaf)), None) for n in weights]
        colors = {leaf: f"C{i}" for i, leaf in enumerate(BLOCK_LINEARS)}
        ax.bar(range(len(weights)), list(weights.values()), color=[colors.get(leaf, "grey") for leaf in leaves])
        from matplotlib.patches import Patch

        ax.set_xticks(range(len(weights)), [n.replace("blocks.", "b").replace("attn.", "").replace("mlp.", "")
                                            for n in weights], rotation=90, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("w_l (end-to-end error per unit NMSE)")
        ax.legend(handles=[Patch(color=c, label=leaf) for leaf, c in colors.items() if leaf in leaves], fontsize=7,
                  ncol=4)
        done("fig6_sensitivity", fig, "Sensitivity weights per layer",
             f"The weights w_l of --sensitivity `{data['inputs']['sensitivity']}` ({data['sensitivity']['metric']}); "
             "the calibrated rows minimise Σ w_l NMSE_l instead of the paper's Σ NMSE_l.")
    return out


