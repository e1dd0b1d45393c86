"""report.tex and report_tables.tex: the report's tables as LaTeX for a paper, one booktabs ``table`` per schedule
with the columns report.md shows and its marks.

report.tex is a whole document (``pdflatex report.tex``, landscape A4-sized article). report_tables.tex holds
the same ``table`` environments alone, for ``\\input{report_tables}`` in a paper whose preamble has
``\\usepackage{booktabs,amssymb,graphicx}``. As in report.md: bold = better than the constant schedule (the
paper's Table 4 bold), ▲/▼ = the CI of ΔmIoU vs none excludes 0, † the same run(s) in every table, ‡ a ramp that
ended below its p; and, as the paper's tables, italic = the best value of a column among `none` and the
regularised rows.
"""
from __future__ import annotations

import re
from pathlib import Path

from deeplab_dropout.report.tables import (
    COLUMN_SETS,
    COLUMNS,
    DELTA,
    HIGHER_IS_BETTER,
    LOSS_TEXT,
    STATISTICS_TEXT,
    cell_text,
    delta_text,
    marked_label,
    table_notes,
)
from deeplab_dropout.results import atomic_write
from deeplab_dropout.study import BASELINE, UNREGULARISED

DOCUMENT, TABLES = "report.tex", "report_tables.tex"
PACKAGES = ("booktabs", "amssymb", "graphicx")  # what the tables need in a paper's preamble
_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
            "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
            ">": r"\textgreater{}", "|": r"\textbar{}"}
_SYMBOLS = {"±": r"$\pm$", "–": "--", "—": "---", "−": "$-$", "▲": r"$\blacktriangle$", "▼": r"$\blacktriangledown$",
            "Δ": r"$\Delta$", "†": r"\dag{}", "‡": r"\ddag{}", "×": r"$\times$", "·": r"$\cdot$",
            "≤": r"$\leq$", "≥": r"$\geq$"}
_SIGN = re.compile(r"(?<![\w.=])([-+])(?=\d)")  # a number's sign (not a hyphen in a name)


def latex_escape(text: str) -> str:
    """``text`` as LaTeX text: its special characters escaped, the report's symbols (± – Δ ▲ ▼ † ‡ ×) as
    LaTeX, any other non-ASCII character as ``?`` (pdflatex has no glyph for it)."""
    return "".join(_SPECIAL.get(ch) or _SYMBOLS.get(ch) or (ch if ord(ch) < 128 else "?") for ch in text)


def number_text(text: str) -> str:
    """A table value as LaTeX: escaped, its signs in math (a minus, not a hyphen)."""
    return _SIGN.sub(r"$\1$", latex_escape(text))


def column_best(rows: list[dict], shown: tuple[str, ...]) -> dict[str, float]:
    """The best value (4 decimals, as shown) of each ``shown`` column that has a better direction, among `none`
    and the regularised rows (pretrained-base is another model), where at least two rows have one."""
    best = {}
    for column in shown:
        values = [round(row["columns"][column][0], 4) for row in rows
                  if (row["cell"] == BASELINE or row["cell"] not in UNREGULARISED)
                  and row["columns"][column][0] is not None]
        if column in HIGHER_IS_BETTER and len(values) > 1:
            best[column] = max(values) if HIGHER_IS_BETTER[column] else min(values)
    return best


def latex_row(row: dict, shown: tuple[str, ...], best: dict[str, float]) -> str:
    """One tabular line: label, runs, the ``shown`` columns (bold where the ramp beat the constant schedule,
    italic where best) and ΔmIoU vs none."""
    cells = [latex_escape(marked_label(row)), str(row["n"])]
    for column in shown:
        mean, ci = row["columns"][column]
        text = number_text(cell_text(column, mean, ci))
        if column in best and mean is not None and round(mean, 4) == best[column]:
            text = f"\\textit{{{text}}}"
        if column in row["ramp_better"]:
            text = f"\\textbf{{{text}}}"
        cells.append(text)
    cells.append(number_text(delta_text(row["vs_none"])))
    return " & ".join(cells) + r" \\"


def caption(schedule: str, statistics: str, loss_epoch: str) -> str:
    """A table's caption: its schedule, what the columns are and what the marks mean."""
    return latex_escape(
        f"Schedule {schedule}. Each run's best epoch; mean ± 95% t-interval over the seeds of an experiment. "
        f"{STATISTICS_TEXT[statistics]}; {LOSS_TEXT[loss_epoch]}. ΔmIoU vs none: dataset mIoU minus that of "
        "none, [95% paired bootstrap CI]; ▲/▼: the CI excludes 0. Bold: better than the same experiment with the "
        "constant schedule; italic: the best in its column.")


def latex_table(schedule: str, rows: list[dict], columns: str = "paper", statistics: str = "image",
                loss_epoch: str = "best") -> str:
    """One ``table`` environment: the rows of one schedule, the column set ``columns``, the notes under it."""
    shown = COLUMN_SETS[columns]
    best = column_best(rows, shown)
    header = ["Experiment", "runs", *(COLUMNS[c] for c in shown), DELTA]
    label = re.sub(r"[^A-Za-z0-9-]", "-", schedule)
    lines = [r"\begin{table}[htbp]", r"\centering", f"\\caption{{{caption(schedule, statistics, loss_epoch)}}}",
             f"\\label{{tab:report-{label}}}",
             # shrunk to the line width when wider, never enlarged
             r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
             f"\\begin{{tabular}}{{lr{'r' * len(shown)}l}}", r"\toprule",
             " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule",
             *(latex_row(row, shown, best) for row in rows), r"\bottomrule", r"\end{tabular}}"]
    notes = table_notes(rows)
    if notes:
        lines += [r"\par\smallskip", r"{\footnotesize\raggedright", *(latex_escape(n) + r"\par" for n in notes), "}"]
    return "\n".join([*lines, r"\end{table}", ""])


def latex_tables(table: dict[str, list[dict]], columns: str = "paper", statistics: str = "image",
                 loss_epoch: str = "best") -> str:
    """report_tables.tex's text: one ``table`` per schedule."""
    head = (f"% deeplab-dropout report tables: \\input{{{Path(TABLES).stem}}} with "
            f"\\usepackage{{{','.join(PACKAGES)}}} in the preamble\n")
    return head + "\n".join(latex_table(schedule, rows, columns, statistics, loss_epoch)
                            for schedule, rows in table.items())


def latex_document(root: Path, tables: str, n_not_counted: int = 0) -> str:
    """report.tex's text: a landscape article around ``tables`` (``latex_tables``' text)."""
    lines = [f"% deeplab-dropout report of {root}: pdflatex {DOCUMENT}", r"\documentclass{article}",
             r"\usepackage[a4paper,landscape,margin=2cm]{geometry}", f"\\usepackage{{{','.join(PACKAGES)}}}",
             r"\begin{document}", f"\\section*{{deeplab-dropout report: \\texttt{{{latex_escape(str(root))}}}}}"]
    if n_not_counted:
        lines.append(f"{n_not_counted} run(s) are in no table (failed, running or unreadable): see report.md.")
    return "\n".join([*lines, "", tables, r"\end{document}", ""])


def write_latex(root: Path, table: dict[str, list[dict]], columns: str = "paper", statistics: str = "image",
                loss_epoch: str = "best", n_not_counted: int = 0) -> list[Path]:
    """Write report_tables.tex and report.tex into ``root`` (see the module's docstring); returns both paths."""
    tables = latex_tables(table, columns, statistics, loss_epoch)
    paths = [Path(root) / TABLES, Path(root) / DOCUMENT]
    for path, text in zip(paths, (tables, latex_document(root, tables, n_not_counted)), strict=True):
        atomic_write(path, lambda f, text=text: f.write(text.encode()))
    return paths
