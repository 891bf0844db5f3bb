"""Synthetic multi-step state tracking over three digit registers, with exact answers.

A problem sets registers a, b, c to digits, applies `steps` updates (all mod 10) and asks for
one register:

  a=3,b=7,c=1;a+=b;c*=3;b-=4;a=c;a?   → answer "3"

Updates are `x+=d`, `x-=d`, `x+=y`, `x-=y`, `x*=u` (u a unit mod 10: 3, 7, 9) and `x=y`,
so every step keeps registers uniform on 0–9 except copies. The query is the register the last
step wrote, so every answer depends on at least one update. Difficulty is the number of steps.
The evaluator generates greedily from the prompt up to EOS and scores with `exact_match`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

REGISTERS = "abc"
_UNITS = np.array([3, 7, 9])  # units mod 10 other than 1 (a no-op)
_OPS = ("+=", "-=", "*=", "=")


def generate(num: int, steps: int, seed: int = 0) -> list[tuple[str, str]]:
  """`num` (prompt, answer) pairs, a pure function of (num, steps, seed)."""
  rng = np.random.default_rng([seed, steps])
  r = len(REGISTERS)
  vals_NxR = rng.integers(0, 10, (num, r))
  init = vals_NxR.copy()
  dst_NxS = rng.integers(0, r, (num, steps))
  op_NxS = rng.integers(0, len(_OPS), (num, steps))
  # The source register always differs from the destination (x+=x and x=x are degenerate).
  src_NxS = (dst_NxS + rng.integers(1, r, (num, steps))) % r
  use_reg_NxS = (rng.random((num, steps)) < 0.5) | (op_NxS == 3)  # copies need a register
  use_reg_NxS &= op_NxS != 2  # multiplication always by a unit constant
  digit_NxS = np.where(
    op_NxS == 2,
    _UNITS[rng.integers(0, len(_UNITS), (num, steps))],
    rng.integers(0, 10, (num, steps)),
  )
  query_N = dst_NxS[:, -1]

  rows = np.arange(num)
  for s in range(steps):
    dst, op = dst_NxS[:, s], op_NxS[:, s]
    cur = vals_NxR[rows, dst]
    arg = np.where(use_reg_NxS[:, s], vals_NxR[rows, src_NxS[:, s]], digit_NxS[:, s])
    new = np.select([op == 0, op == 1, op == 2], [cur + arg, cur - arg, cur * arg], arg) % 10
    vals_NxR[rows, dst] = new
  answers = vals_NxR[rows, query_N]

  problems = []
  for i in range(num):
    parts = [",".join(f"{REGISTERS[j]}={init[i, j]}" for j in range(r))]
    for s in range(steps):
      arg = REGISTERS[src_NxS[i, s]] if use_reg_NxS[i, s] else str(digit_NxS[i, s])
      parts.append(f"{REGISTERS[dst_NxS[i, s]]}{_OPS[op_NxS[i, s]]}{arg}")
    parts.append(f"{REGISTERS[query_N[i]]}?")
    problems.append((";".join(parts), str(answers[i])))
  return problems


def solve(prompt: str) -> str:
  """Reference interpreter of a prompt (an independent check on `generate`)."""
  init, *updates, query = prompt.split(";")
  regs = {k: int(v) for k, v in (kv.split("=") for kv in init.split(","))}
  for u in updates:
    for op in _OPS:  # "+=", "-=", "*=" are tried before the bare "="
      if op in u:
        dst, arg = u.split(op)
        val = regs[arg] if arg in regs else int(arg)
        cur = regs[dst]
        regs[dst] = {"+=": cur + val, "-=": cur - val, "*=": cur * val, "=": val}[op] % 10
        break
  return str(regs[query.rstrip("?")])


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
  """Fraction of predictions equal to their answer after stripping surrounding whitespace."""
  if len(predictions) != len(answers):
    raise ValueError(f"exact_match got {len(predictions)} predictions for {len(answers)} answers")
  if not answers:
    raise ValueError("exact_match needs at least one answer")
  hits = sum(p.strip() == a.strip() for p, a in zip(predictions, answers, strict=True))
  return hits / len(answers)
