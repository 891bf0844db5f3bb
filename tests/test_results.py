"""Committed results agree with their CSVs: every table.md-style file renders its CSV, every
table in a results README is one of those files verbatim (no hand-edited numbers), and the top
README quotes its verdicts from what the experiments wrote."""

from __future__ import annotations

import csv
import glob
import os
import re

import pytest

from experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")


def _is_table(path: str) -> bool:
  """A .md that write_table wrote: nothing but one table (reports such as benchmark's are not)."""
  with open(path) as f:
    return f.read(1) == "|"


# <stem>.csv beside a <stem>.md table
PAIRS = sorted(
  p[: -len(".csv")]
  for p in glob.glob(os.path.join(RESULTS, "*", "*.csv"))
  if os.path.exists(p[: -len(".csv")] + ".md") and _is_table(p[: -len(".csv")] + ".md")
)


def render(stem: str, digits: int) -> str:
  """The Markdown common.write_table writes for the CSV's rows (numbers re-read from text)."""
  with open(stem + ".csv", newline="") as f:
    rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []

  def value(v: str):
    """Numbers back from the text csv wrote (repr); anything else (hashes, '2.1 ± 0.1') stays."""
    for kind in (int, float):
      try:
        if repr(kind(v)) == v:
          return kind(v)
      except ValueError:
        pass
    return v

  parsed = [{k: value(v) for k, v in r.items()} for r in rows]
  return common.markdown_table(columns, parsed, digits)


def tables_in(markdown: str) -> list[str]:
  """Each Markdown table (consecutive lines starting with '|') as one string."""
  out, cur = [], []
  for line in markdown.splitlines() + [""]:
    if line.startswith("|"):
      cur.append(line)
    elif cur:
      out.append("\n".join(cur) + "\n")
      cur = []
  return out


@pytest.mark.parametrize("stem", PAIRS, ids=lambda s: os.path.relpath(s, RESULTS))
def test_markdown_table_renders_its_csv(stem):
  with open(stem + ".md") as f:
    md = f.read()
  # Experiments round to 3 or 4 significant digits; a hand-edited number matches neither.
  renders = {render(stem, digits) for digits in (3, 4)}
  assert md in renders, f"{stem}.md differs from what {stem}.csv renders to"


@pytest.mark.parametrize(
  "readme", sorted(glob.glob(os.path.join(RESULTS, "*", "README.md"))), ids=os.path.dirname
)
def test_readme_tables_are_committed_tables(readme):
  d = os.path.dirname(readme)
  known = set()
  for md in glob.glob(os.path.join(d, "*.md")):
    if not md.endswith("README.md"):
      with open(md) as f:
        known.update(tables_in(f.read()))
  with open(readme) as f:
    for table in tables_in(f.read()):
      assert table in known, f"{readme} has a table that no CSV-backed .md holds:\n{table}"


def _reproducing_section() -> str:
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  start = text.index("## Reproducing the paper")
  return text[start : text.index("\n## ", start + 1)]


def test_readme_verdicts_are_quoted_from_results():
  """Each quote (a '> ' paragraph) in README's "Reproducing the paper" is part of a verdict line
  an experiment wrote, and each mean ± std there is in a committed table."""
  section = _reproducing_section()
  written = ""
  for path in glob.glob(os.path.join(RESULTS, "*", "*.md")):
    with open(path) as f:
      written += f.read()
  quotes, cur = [], []
  for line in section.splitlines() + [""]:
    if line.startswith("> "):
      cur.append(line[2:].strip())
    elif cur:
      quotes.append(" ".join(cur))
      cur = []
  assert len(quotes) >= 5, "the section quotes no computed verdicts"
  for q in quotes:
    assert q in written, f"README quotes a verdict no experiment wrote: {q}"
  spreads = re.findall(r"\d+\.\d+ ± \d+\.\d+", section)
  assert spreads, "the section shows no seed spread"
  for s in spreads:
    assert s in written, f"README shows {s}, which no committed table holds"
