"""report.tex and report_tables.tex: one booktabs table per schedule with report.md's columns, values and marks,
escaped for LaTeX; checked by a small parser here, and by pdflatex itself where it is installed (slow)."""
from __future__ import annotations

import json
import re
import shutil
import string
import subprocess

import numpy as np
import pytest
from test_report import fake_run

from deeplab_dropout.report import main
from deeplab_dropout.report.latex import latex_escape
from deeplab_dropout.results import write_per_image

# LaTeX escapes and symbols back to the report's text, written out independently of latex.py.
UNLATEX = {r"\textbackslash{}": "\\", r"\textasciitilde{}": "~", r"\textasciicircum{}": "^", r"\textless{}": "<",
           r"\textgreater{}": ">", r"\textbar{}": "|", r"\&": "&", r"\%": "%", r"\$": "$", r"\#": "#", r"\_": "_",
           r"\{": "{", r"\}": "}", r"$\pm$": "±", "--": "–", r"$-$": "-", r"$+$": "+", r"$\Delta$": "Δ",
           r"$\blacktriangle$": "▲", r"$\blacktriangledown$": "▼", r"\dag{}": "†", r"\ddag{}": "‡"}
_TOKEN = re.compile("|".join(re.escape(t) for t in sorted(UNLATEX, key=len, reverse=True)))
SPECIAL_CELL = "my_cell&co 50%#1"  # a cell of one's own: characters LaTeX treats specially in a row label


def unlatex(text: str) -> str:
    """A table cell's LaTeX as report.md writes it: escapes undone, \\textbf as **, \\textit dropped."""
    text = re.sub(r"\\textbf\{(.*)\}", r"**\1**", text.strip())
    text = re.sub(r"\\textit\{(.*?)\}", r"\1", text)
    return _TOKEN.sub(lambda m: UNLATEX[m.group(0)], text)


def write_counts(root, folder: str, iou: float) -> None:
    """per_image.npz of 20 images whose two classes have IoU ``iou``: Δ vs none is exact, its CI a point."""
    counts = np.zeros((20, 2, 2), dtype=np.int64)
    counts[..., 0], counts[..., 1] = round(100 * iou), 100
    write_per_image(root / folder / "per_image.npz", [f"img{i}" for i in range(20)], counts, 3)


@pytest.fixture(scope="module")
def tex_report(tmp_path_factory):
    """A report with both schedules: `none`, a cell whose ramp beats the constant schedule, is worse than `none`
    (▼) and stopped short of its p (‡), and a cell named with LaTeX's special characters."""
    root = tmp_path_factory.mktemp("tex")
    write_counts(root, fake_run(root, [], 0, 0.40), 1.0)
    write_counts(root, fake_run(root, ["cell=all-chandrop", "schedule=constant"], 0, 0.50), 0.5)
    write_counts(root, fake_run(root, ["cell=all-chandrop", "schedule=linear"], 0, 0.55,
                                extra={"final_drop_p": 0.052}), 0.5)
    fake_run(root, [], 0, 0.30, cell=SPECIAL_CELL, folder="custom")
    assert main([str(root), "--no-figures", "--n-boot", "50", "--reference", "none"]) == 0
    return root


def unescaped(text: str, char: str) -> list[int]:
    """Positions of ``char`` in ``text`` not escaped by a backslash (outside comments)."""
    found, i = [], 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == "%":  # a comment runs to the end of the line
            i = text.find("\n", i) if "\n" in text[i:] else len(text)
            continue
        if text[i] == char:
            found.append(i)
        i += 1
    return found


def check_balanced(text: str) -> None:
    """Braces balance (never below zero) and \\begin/\\end pairs nest."""
    depth = 0
    for i in sorted(unescaped(text, "{") + unescaped(text, "}")):
        depth += 1 if text[i] == "{" else -1
        assert depth >= 0, text[max(0, i - 60):i + 1]
    assert depth == 0
    stack = []
    for kind, env in re.findall(r"\\(begin|end)\{(\w+)\}", text):
        if kind == "begin":
            stack.append(env)
        else:
            assert stack and stack.pop() == env, env
    assert not stack


def tex_rows(table: str) -> list[list[str]]:
    """The body rows of one ``table`` environment, split into cells at unescaped &."""
    body = table.split("\\midrule\n")[1].split("\\bottomrule")[0]
    lines = body.strip().splitlines()
    assert all(line.endswith(r" \\") for line in lines)
    return [re.split(r"(?<!\\)&", line.removesuffix(r" \\")) for line in lines]


def md_rows(md: str, schedule: str) -> list[list[str]]:
    """report.md's rows of one schedule, split into cells, without the status column."""
    part = md.split(f"### schedule = {schedule}\n")[1].split("### ")[0]
    lines = [line for line in part.splitlines() if line.startswith("| ") and not line.startswith("| Experiment")]
    return [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-2]] for line in lines]


def test_report_tex_has_report_mds_tables_escaped_and_balanced(tex_report):
    document = (tex_report / "report.tex").read_text()
    tables = (tex_report / "report_tables.tex").read_text()
    md = (tex_report / "report.md").read_text()
    rows = json.loads((tex_report / "report.json").read_text())["tables"]
    assert document.splitlines()[1] == r"\documentclass{article}"
    assert r"\usepackage{booktabs,amssymb,graphicx}" in document and document.rstrip().endswith(r"\end{document}")
    assert tables in document  # the \input-able part is the document's tables, word for word
    for text in (document, tables):
        check_balanced(text)
    environments = re.findall(r"\\begin\{table\}.*?\\end\{table\}", tables, flags=re.S)
    assert len(environments) == len(rows) == 2
    for schedule, environment in zip(rows, environments, strict=True):
        assert f"Schedule {schedule}." in environment
        assert environment.count(r"\toprule") == environment.count(r"\bottomrule") == 1
        header = re.split(r"(?<!\\)&", environment.split("\\toprule\n")[1].split("\n")[0].removesuffix(r" \\"))
        body = tex_rows(environment)
        assert len(body) == len(rows[schedule]) and all(len(cells) == len(header) == 11 for cells in body)
        # Cell for cell what report.md shows (label with its marks, values, bold, ▲/▼), status aside.
        assert [[unlatex(c) for c in cells] for cells in body] == md_rows(md, schedule)
    linear = environments[1]
    assert r"all-chandrop \ddag{} & 1 & \textbf{" in linear  # short ramp; Mean mIoU beat the constant schedule
    assert r"$\blacktriangledown$ \\" in linear  # worse than none, the CI excludes 0
    assert r"\ddag{} ramp incomplete: p reached 0.052 of 0.2\par" in linear
    assert sum(line.startswith(r"my\_cell\&co 50\%\#1 & 1 & 0.3000 & ") for line in tables.splitlines()) == 1


def test_the_best_value_of_a_column_is_italic(tex_report):
    rows = json.loads((tex_report / "report.json").read_text())["tables"]["constant"]
    environment = (tex_report / "report_tables.tex").read_text().split(r"\end{table}")[0]
    italic = {(i, j) for i, cells in enumerate(tex_rows(environment)) for j, c in enumerate(cells)
              if r"\textit{" in c}
    columns = ["mean", "std", "min", "median", "max", "val_loss", "miou", "best_epoch"]
    higher = {"mean": True, "min": True, "median": True, "max": True, "miou": True, "val_loss": False}
    expected = set()
    for j, column in enumerate(columns, start=2):
        if column in higher:
            values = [round(row["columns"][column][0], 4) for row in rows]
            best = max(values) if higher[column] else min(values)
            expected |= {(i, j) for i, v in enumerate(values) if v == best}
    assert italic == expected and expected


def test_latex_escape_round_trips_every_printable_character():
    text = string.printable.strip() + " ± – Δ ▲ ▼ † ‡"
    escaped = latex_escape(text)
    assert unlatex(escaped) == text
    assert not set(_TOKEN.sub("", escaped)) & set("\\&%$#_{}~^")  # every special character is in an escape
    assert latex_escape("é") == "?"  # no glyph in pdflatex's default fonts: never a compile error


def pdflatex_ready() -> bool:
    return shutil.which("pdflatex") is not None and bool(
        subprocess.run(["kpsewhich", "booktabs.sty"], capture_output=True, text=True).stdout.strip())


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("pdflatex") or not shutil.which("kpsewhich"), reason="no pdflatex")
def test_pdflatex_compiles_the_report_and_a_paper_that_inputs_its_tables(tex_report, tmp_path):
    if not pdflatex_ready():
        pytest.skip("pdflatex without booktabs (texlive-latex-recommended)")
    for name in ("report.tex", "report_tables.tex"):
        shutil.copy(tex_report / name, tmp_path / name)
    (tmp_path / "paper.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs,amssymb,graphicx}\n"
                                        "\\begin{document}\n\\input{report_tables}\n\\end{document}\n")
    for name in ("report", "paper"):
        done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", f"{name}.tex"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:]
        assert "Output written on" in done.stdout and (tmp_path / f"{name}.pdf").read_bytes().startswith(b"%PDF")
