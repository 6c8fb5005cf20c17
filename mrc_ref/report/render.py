"""The report as a document: blocks of headings, paragraphs, tables and
figures (:func:`document`), rendered as Markdown and as one self-contained
HTML file, and written to the output folder (:func:`write_report`)."""

import base64
import html
import os
import re

from .. import formats
from ..errors import MrcError
from .grid import CURVE_METHODS, METHODS, PROG, SENSITIVITY_METHODS

__all__ = ["OUTPUT_FILES", "document", "render_markdown", "render_html", "check_output_dir", "write_report"]

def _opts(row):
    return f"`{row['flags'] or '(defaults)'}`"


def _pct(x):
    return "" if x is None else f"{100 * x:.2f} %"


def _sci(x):
    return "" if x is None else f"{x:.2e}"


def document(data, figs, timings):
    """The report as blocks: ``("h", level, text)``, ``("p", text)``,
    ``("table", header, rows)``, ``("img", key)``, ``("ul", items)``, ``("pre", text)``."""
    d, inp, s = [], data["inputs"], data["settings"]
    orig = data["original"]
    d.append(("h", 1, f"Audit report: {inp['weights']}"))
    d.append(("p", f"Activation-aware mixed-rank compression (Azizi, Nazemi, Pedram, arXiv 2402.06004) run by "
                   f"mrc_ref on `{inp['weights']}` ({inp['params']:,} stored parameters, {inp['depth']} blocks) "
                   f"with the statistics `{inp['acts']}`, evaluated on {inp['image_count']} images of "
                   f"`{inp['images']}`. The original model scores **{_pct(orig['top1'])}** top-1 on them. "
                   "Every number below comes from `python -m mrc_ref.compress` with the options given in the "
                   "tables' last column, read back and evaluated as `python -m mrc_ref.evaluate` does "
                   "(top-1 against the folder's labels; agreement and output NMSE against the original model's "
                   "logits). Figures and claims of the paper are marked **reported**; everything else is "
                   "measured here."))
    modes = sorted({r["compensation"] for r in data["grid"] if "infeasible" not in r} - {"none"})
    d.append(("p", "Reduction is the fraction of all stored parameters removed (embeddings, norms, biases and "
                   "head included). Rows without compensation store no residual; rows with compensation "
                   f"({' and '.join(modes) or 'none ran'} Stage 3: `--compensation auto` resolves to sequential when "
                   "the statistics hold proxy tokens) use residual rank 8, counted in the budget, so they spend "
                   "fewer parameters on the principal factors. Stage 1 is computed once per layer and statistic "
                   "and shared by every run."))
    d.append(("h", 2, "Claims and verdicts"))
    d.append(("table", ["claim", "paper (reported)", "measured here", "verdict", "what a full check needs"],
              [[v["claim"], v["paper"], v["measured"], f"**{v['verdict']}**", v["needs"]]
               for v in data["verdicts"]]))

    d.append(("h", 2, "Main grid"))
    d.append(("p", f"Top-1, top-1 agreement with the original and output NMSE `‖z − z₀‖² / ‖z₀‖²` of the logits "
                   f"on the {inp['image_count']} images. Original: top-1 {_pct(orig['top1'])}."))
    rows = []
    for r in data["grid"]:
        if r["method"] not in METHODS and r["method"] not in SENSITIVITY_METHODS:
            continue
        if "infeasible" in r:
            rows.append([str(r["reduction"]), r["method"], "infeasible", "", "", "", "", _opts(r)])
        else:
            rows.append([str(r["reduction"]), r["method"], _pct(r["top1"]), _pct(r["top1_agreement"]),
                         _sci(r["output_nmse"]), f"{r['params']:,}", f"{r['max_residual_norm']:.3g}",
                         _opts(r)])
    d.append(("table", ["reduction", "method", "top-1", "agreement", "output NMSE", "stored params",
                        "max ‖PQ‖/‖W‖", "compress options"], rows))
    d.append(("p", "**Reported** (paper, DeiT-B on ImageNet, not reproduced here): −60 % parameters with less "
                   "than 1 % top-1 drop (81.8 → 81.1 %); large models compressed to the next smaller size beat "
                   "that model by up to 1.8 % top-1."))
    extra = [r for r in data["grid"] if r["method"] in CURVE_METHODS]
    if extra:
        d.append(("p", "Compensation under the other rules (the solid curves of the accuracy–size figure):"))
        d.append(("table", ["reduction", "method", "top-1", "agreement", "output NMSE", "stored params",
                            "compress options"],
                  [[str(r["reduction"]), r["method"], "infeasible", "", "", "", _opts(r)]
                   if "infeasible" in r else
                   [str(r["reduction"]), r["method"], _pct(r["top1"]), _pct(r["top1_agreement"]),
                    _sci(r["output_nmse"]), f"{r['params']:,}", _opts(r)] for r in extra]))

    d.append(("h", 2, "int8 post-training quantization"))
    d.append(("p", "Symmetric per-output-channel int8 with min–max scales of every linear layer's matrices "
                   "(`A`, `B`, `P`, `Q` and dense weights; `compress --quantize int8`), dequantized on load. "
                   "Before: the float model; after: the same model in int8. Agreement is with the original float "
                   "model; *int8 vs float* with the same model before quantization."))
    q = orig["int8"]
    qrows = [["", "original", _pct(orig["top1"]), _pct(q["top1"]), "100.00 %", _pct(q["top1_agreement"]),
              _pct(q["agreement_with_float"]), _sci(q["nmse_vs_float"]), f"{q['bytes_float']:,} → {q['bytes']:,}"]]
    for r in data["grid"]:
        if "infeasible" in r:
            continue
        i8 = r["int8"]
        qrows.append([str(r["reduction"]), r["method"], _pct(r["top1"]), _pct(i8["top1"]),
                      _pct(r["top1_agreement"]), _pct(i8["top1_agreement"]), _pct(i8["agreement_with_float"]),
                      _sci(i8["nmse_vs_float"]), f"{i8['bytes_float']:,} → {i8['bytes']:,}"])
    d.append(("table", ["reduction", "method", "top-1 before", "top-1 int8", "agreement before", "agreement int8",
                        "int8 vs float: agreement", "int8 vs float: output NMSE", "data bytes"], qrows))

    d.append(("h", 2, "Figures"))
    for key in ("fig1_energy", "fig2_layer_types", "fig3_proj_error", "fig4_allocation", "fig5_accuracy_size",
                "fig6_sensitivity"):
        if key in figs:
            d.append(("img", key))
            if key == "fig2_layer_types":
                d.append(("table", ["layer type", *[f"rank {p['rank']} (−{100 * p['rank_reduction']:.1f} %)"
                                                    for p in next(iter(data["layer_types"].values()))]],
                          [[leaf, *[_pct(p["top1"]) for p in points]] for leaf, points in data["layer_types"].items()]))
            if key == "fig3_proj_error":
                pe = data["proj_error"]
                d.append(("table", ["block", *pe], [[str(i), *[_sci(v[i]) for v in pe.values()]]
                                                    for i in range(len(next(iter(pe.values()))))]))

    d.append(("h", 2, "Certificates"))
    d.append(("p", f"**Stage 1**, per layer, on the stored factors of the optimal allocation at reduction "
                   f"{s['at']} without compensation (`mrc_ref.testing.certify_stage1`, an independent "
                   "check): the achieved NMSE of `A B` under the layer's Gram against the optimum "
                   "`Σ_{i>r} σ_i² / Σ σ_i²` at the same rank, their ratio (1 = optimal, to the precision of the "
                   "stored factors and statistics: float32 gives about 1e-6), and the largest principal angle to "
                   "the optimal subspace."))
    d.append(("table", ["layer", "rank", "NMSE achieved", "NMSE optimal", "ratio", "max angle (rad)"],
              [[c["name"], "dense"] + [""] * 4 if c["rank"] is None else
               [c["name"], str(c["rank"]), _sci(c["nmse"]), _sci(c["nmse_optimal"]), f"{c['excess']:.6f}",
                "" if c["max_angle"] is None else f"{c['max_angle']:.1e}"] for c in data["certificates"]]))
    d.append(("p", "**Stage 2**, per rule and reduction: the objective of the allocation (`Σ NMSE_l(r_l)`, or "
                   "`Σ w_l NMSE_l(r_l)` for the calibrated rows), the exact optimum of that objective (dynamic "
                   "programming) or a proven lower bound, and the relative gap. Compensated rows spend residual "
                   "rank 8 of the budget, so their objective is that of smaller principal ranks."))
    arows = []
    for r in data["grid"]:
        if "infeasible" in r or r["method"] in CURVE_METHODS or r["method"] == "weight SVD":
            continue
        a = r["allocation"]
        arows.append([str(r["reduction"]), r["method"], "Σ w·NMSE" if a.get("weights") == "sensitivity" else "Σ NMSE",
                      f"{a['objective']:.6g}", "" if a["lower_bound"] is None else f"{a['lower_bound']:.6g}",
                      a["bound"] or "", "" if a["relative_gap"] is None else f"{100 * a['relative_gap']:.2f} %"])
    d.append(("table", ["reduction", "method", "objective", "value", "bound", "bound is", "gap"], arows))

    d.append(("h", 2, "How this report was made"))
    d.append(("ul", [f"Command: `{data.get('command', PROG)}`.",
                     f"Grid: reductions {', '.join(str(x) for x in s['reductions'])}; allocation map, Fig. 3 and "
                     f"certificates at {s['at']}; Fig. 1 on blocks.{s['block']}.",
                     f"Forward passes in {s['dtype']} on {s['device']}, images in batches of {s['batch_size']} "
                     "(the defaults of evaluate).",
                     "Data of every table and figure: `report.json`."]))
    d.append(("pre", "\n".join(f"{k:<45} {v:8.1f} s" for k, v in timings.items())))
    return d


_INLINE = [(re.compile(r"`([^`]+)`"), r"<code>\1</code>"), (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
           (re.compile(r"\*([^*]+)\*"), r"<em>\1</em>")]


def _inline(text):
    text = html.escape(text, quote=False)
    for pattern, repl in _INLINE:
        text = pattern.sub(repl, text)
    return text


def _md_cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks, figs):
    """``report.md``: figures as PNG files beside it."""
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "table":
            out.append("| " + " | ".join(_md_cell(c) for c in b[1]) + " |")
            out.append("|" + "---|" * len(b[1]))
            out.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b[2])
        elif b[0] == "img":
            f = figs[b[1]]
            out.append(f"### {f['title']}\n\n![{f['title']}]({f['file']})\n\n{f['caption']}")
        elif b[0] == "ul":
            out.extend(f"- {item}" for item in b[1])
        elif b[0] == "pre":
            out.append("```\n" + b[1] + "\n```")
        out.append("")
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;font-size:.86em}th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}code{background:#f6f6f6;padding:0 .2em;font-size:.92em}img{max-width:100%}
figure{margin:1.5em 0}figcaption{font-size:.9em;color:#444}pre{background:#f6f6f6;padding:.7em;overflow-x:auto}"""


def render_html(blocks, figs):
    """``report.html``: one self-contained file, figures embedded (base64 PNG)."""
    title = next((b[2] for b in blocks if b[0] == "h"), "report")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    for b in blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{_inline(b[1])}</p>")
        elif b[0] == "table":
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(str(c))}</th>" for c in b[1]) + "</tr></thead><tbody>")
            out.extend("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in row) + "</tr>" for row in b[2])
            out.append("</tbody></table>")
        elif b[0] == "img":
            f = figs[b[1]]
            data = base64.b64encode(f["png"]).decode("ascii")
            out.append(f'<figure><h3>{_inline(f["title"])}</h3><img alt="{html.escape(f["title"])}" '
                       f'src="data:image/png;base64,{data}"><figcaption>{_inline(f["caption"])}</figcaption></figure>')
        elif b[0] == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
        elif b[0] == "pre":
            out.append(f"<pre>{html.escape(b[1])}</pre>")
    out.append("</body></html>")
    return "\n".join(out)


OUTPUT_FILES = ("report.md", "report.html", "report.json")


def check_output_dir(directory, inputs, images):
    """Refuse, before any work, an output folder that is a file, that cannot
    be created (missing parent, no permission: probed without a trace), or
    that is (or is inside) the image folder; refuse output files that are
    inputs or images, by any path (:func:`mrc_ref.images.check_image_outputs`)."""
    from ..images import check_image_outputs

    check_image_outputs((), inputs, images, directory=(directory, OUTPUT_FILES))


def write_report(directory, data, figs, blocks, inputs):
    """Write the figures, ``report.json``, ``report.md`` and ``report.html``,
    each atomically; create ``directory`` if missing."""
    if not os.path.isdir(directory):
        try:
            os.mkdir(directory)
        except OSError as exc:
            raise MrcError(f"cannot create the output directory: {exc.strerror or exc}", file=directory) from None
    payload = dict(data, figures={k: {kk: vv for kk, vv in f.items() if kk != "png"} for k, f in figs.items()})
    text = formats.json_text(payload)
    files = {f["file"]: f["png"] for f in figs.values()}
    files.update({"report.json": text.encode("utf-8"), "report.md": render_markdown(blocks, figs).encode("utf-8"),
                  "report.html": render_html(blocks, figs).encode("utf-8")})
    for name, blob in files.items():
        with formats.atomic_path(os.path.join(directory, name), inputs) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(blob)
    return sorted(files)
