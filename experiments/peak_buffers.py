"""What XLA keeps live at the train step's memory peak, per residual scheme.

  python -m experiments.peak_buffers --residual keel pre_ln

Compiles the train step at the benchmark's `cpu` step shape (d=512, 8 blocks, B=8, T=512;
flags change it) with XLA's dumps on, replays the buffer live ranges of the temporaries, and
prints per scheme the peak, the instruction it occurs at, and the live buffers there grouped by
the JAX operation that made them (larger than --min_mb). It explains a step-bytes gap such as
the benchmark's Keel / Pre-LN ratio. The replayed peak is a lower bound on
`memory_analysis().temp_size_in_bytes`, which also counts the allocator's fragmentation.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import tempfile

DUMP = tempfile.mkdtemp(prefix="keel_peak_buffers_")
# Must be set before the backend starts.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP} --xla_dump_hlo_module_re=jit_step"
)

from experiments.benchmark import compile_step, make_setup  # noqa: E402

# Path pieces that only say how JAX got there (scan, remat, call wrappers): dropped from names.
NOISE = re.compile(
  r"jit\(step\)/|/closed_call|/checkpoint|stack\.shared_forward_fn/|jvp\(stack\.run\)/"
  r"|/while/body|/stack/main|/cond/branch_\d+_fun"
)


def temporaries(assignment: str) -> dict[str, tuple[int, int, str]]:
  """HLO value name → (bytes, offset, shape) for the values in the preallocated temp buffer."""
  out, in_temp = {}, False
  for line in assignment.splitlines():
    if line.startswith("allocation"):
      in_temp = "preallocated-temp" in line
    m = re.match(
      r"\s*value: <\d+ (\S+)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (\S+)", line
    )
    if m and in_temp:  # named as in the live ranges: an index into a tuple, {} for none
      name = m.group(1) if "{" in m.group(1) else m.group(1) + "{}"
      out[name] = (int(m.group(2)), int(m.group(3)), m.group(4).split("{")[0])
  return out


def peak(dump_prefix: str) -> dict:
  """The replayed peak of the temporaries and what is live there, from one module's dumps."""
  read = lambda suffix: open(f"{dump_prefix}.cpu_after_optimizations{suffix}").read()
  temp = temporaries(read("-buffer-assignment.txt"))
  schedule, ranges = read("-live-range.txt").split("BufferLiveRange")
  names = dict(re.findall(r"^\s+(\d+):(\S+)$", schedule, re.M))
  # Per time step, the live values by their slice of the buffer (aliases share one slice).
  live = collections.defaultdict(dict)
  for value, start, end in re.findall(r"^\s+(\S+\{[^}]*\}):(\d+)-(\d+)$", ranges, re.M):
    if value in temp:
      size, offset, _ = temp[value]
      for t in range(int(start), int(end) + 1):
        live[t].setdefault((offset, size), value)
  usage = {t: sum(size for _, size in slices) for t, slices in live.items()}
  t = max(usage, key=usage.__getitem__)
  made_by = dict(re.findall(r"%(\S+) = .*?op_name=\"([^\"]*)\"", read(".txt")))
  groups = collections.Counter()
  for (_, size), value in live[t].items():
    op = made_by.get(value.split("{")[0], "?")
    groups[NOISE.sub("", op), temp[value][2]] += size
  return dict(bytes=usage[t], at=names.get(str(t), "?"), groups=groups)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--residual", nargs="+", default=["keel", "pre_ln"])
  p.add_argument("--d_model", type=int, default=512)
  p.add_argument("--num_heads", type=int, default=8)
  p.add_argument("--num_kv_heads", type=int, default=4)
  p.add_argument("--num_blocks", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=512)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--remat_policy", default="full")
  p.add_argument("--min_mb", type=float, default=1.0, help="hide groups smaller than this")
  args = p.parse_args(argv)
  model = {k: getattr(args, k) for k in ("d_model", "num_heads", "num_kv_heads", "num_blocks")}
  model["remat_policy"] = args.remat_policy
  seen = set()
  for scheme in args.residual:
    setup = make_setup({**model, "residual": scheme}, args.seq_len, args.batch_size)
    compiled, _ = compile_step(setup)
    (module,) = {f.split(".cpu_after")[0] for f in os.listdir(DUMP) if "-live-range" in f} - seen
    seen.add(module)
    found = peak(os.path.join(DUMP, module))
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 1e6
    print(f"\n## {scheme}: temporaries {temp_mb:.4g} MB (memory_analysis); replayed peak "
          f"{found['bytes'] / 1e6:.4g} MB at {found['at']}\n")  # fmt: skip
    print("| MB | shape | made by |\n|---|---|---|")
    for (op, shape), size in sorted(found["groups"].items(), key=lambda kv: -kv[1]):
      if size >= args.min_mb * 1e6:
        print(f"| {size / 1e6:.4g} | `{shape}` | `{op}` |")


if __name__ == "__main__":
  main()
