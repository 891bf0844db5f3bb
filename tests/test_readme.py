"""Every command in README.md runs here (or in CI), so the README cannot go stale.

Commands are read from the README's ```bash blocks and its inline `make`/`pip`/`python` spans.
Each must match one entry of COVERAGE, which runs it as written, with two changes: its workdir
moves to a temporary directory, and `--config.x=...` overrides are appended (the last value of a
flag wins) that shrink the model and step count to seconds. A README command that no entry
matches fails `test_every_readme_command_is_covered`: add a line here when you add one there.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
TIMEOUT = 600

# A model and a run small enough for seconds on one CPU core.
TINY = (
  "--config.model.d_model=32 --config.model.num_heads=2 --config.model.num_kv_heads=1 "
  "--config.model.d_ff=64 --config.data.seq_len=32 --config.train.batch_size=4 "
  "--config.train.num_steps=3 --config.train.warmup_steps=1 --config.train.eval_batches=1 "
  "--config.train.log_every=1"
)
# Per experiment: what makes its `cpu` preset a seconds-long run of the same code path.
EXPERIMENT_SHRINK = {
  "depth_scaling": "--config.sweep.residual=\"('keel',)\" --config.sweep.num_blocks='(1,)' "
  "--config.log10_lrs='(-2.5,)' --config.max_extend=0 --config.seeds='(0,)' "
  "--config.isolate=False",
  "lr_sweep": "--config.sweep.residual=\"('keel',)\" --config.sweep.num_blocks='(1,)' "
  "--config.window=3 --config.check_windows='(3,)' --config.train.num_steps=12 "
  "--config.seeds='(0,)'",
  "grad_flow": "--config.sweep.residual=\"('keel',)\" --config.model.num_blocks=2 "
  "--config.profile_batches=1 "
  "--config.wide.residual=\"('keel',)\" --config.wide.model.d_model=32 "
  "--config.wide.model.num_heads=2 --config.wide.model.num_kv_heads=1 "
  "--config.wide.model.d_ff=64 --config.wide.model.num_blocks=2 --config.wide.seq_len=32",
  "layer_redundancy": "--config.model.num_blocks=2 --config.source='' --config.eval_batches=1",
  "deep_run": "--config.model.num_blocks=4 --config.sweep.residual=\"('keel',)\"",
}
BENCHMARK_SHRINK = (
  "--config.repeats=1 --config.step.repeats=1 --config.matmul_sizes='(256,)' "
  "--config.compile.scan_depths='(4,8)' "
  "--config.compile.unrolled_depths='(4,)' --config.compile.repeats=1 "
  "--config.compile.model.d_model=32 --config.step.model.d_model=64 "
  "--config.step.model.num_blocks=1 --config.step.seq_len=128 --config.step.batch_size=2 "
  "--config.step.attention_impls=\"('reference','blocked')\" "
  "--config.attention_impls=\"('reference','blocked')\" "
  "--config.step.extra_remat_policies='()' "
  "--config.memory.model.d_model=32 --config.memory.seq_len=32 --config.memory.batch_size=2 "
  "--config.memory.depths='(4,)' --config.memory.policies=\"('full',)\" "
  "--config.deep.model.d_model=32 --config.deep.model.num_heads=2 "
  "--config.deep.model.num_kv_heads=1 --config.deep.model.num_blocks=4 --config.deep.seq_len=32 "
  "--config.deep.moment_dtypes=\"('bfloat16',)\" --config.decode.model.d_model=32 "
  "--config.decode.depths='(4,)' --config.decode.batch_size=1 --config.decode.prompt_len=4 "
  "--config.decode.new_tokens=4 --config.decode.bucket=4"
)


# ---------------------------------------------------------------- reading the README


def readme_commands() -> list[str]:
  """Commands in ```bash blocks (continuations joined, a for-loop kept whole, comments dropped)
  and in inline code spans that start with make, pip or python."""
  text = open(README).read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    lines = [re.sub(r"(^|\s+)#.*$", "", line).rstrip() for line in block.splitlines()]
    joined = re.sub(r"\\\n\s*", "", "\n".join(line for line in lines if line.strip()))
    loop = []
    for line in joined.splitlines():
      if loop or line.startswith("for "):
        loop.append(line)
        if line.startswith("done"):
          commands.append("\n".join(loop))
          loop = []
      else:
        commands.append(line.strip())
  prose = re.sub(r"```.*?```", "", text, flags=re.S)
  for span in re.findall(r"`((?:make|pip|python|\.venv/bin/python)\s[^`]*)`", prose):
    commands.append(" ".join(span.split()))
  # One run per command, whichever interpreter it names (both become this test's).
  commands = [re.sub(r"^\.venv/bin/python ", "python ", re.sub(r" {2,}", " ", c)) for c in commands]
  return list(dict.fromkeys(commands))


# ---------------------------------------------------------------- running one


def run(command: str, tmp_path, env: dict | None = None) -> subprocess.CompletedProcess:
  """`command` through bash from the repo root, with this test's Python as the interpreter."""
  command = re.sub(r"(^|\s)(\.venv/bin/python|python)(?=\s)", rf"\1{sys.executable}", command)
  full_env = {**os.environ, "JAX_PLATFORMS": "cpu", "HOME": str(tmp_path), **(env or {})}
  proc = subprocess.run(
    ["bash", "-c", command], cwd=ROOT, env=full_env, capture_output=True, text=True,
    timeout=TIMEOUT,
  )  # fmt: skip
  assert proc.returncode == 0, f"{command}\nexited {proc.returncode}:\n{proc.stderr[-4000:]}"
  return proc


def with_workdir(command: str, workdir) -> str:
  return re.sub(r"--workdir=\S+", f"--workdir={workdir}", command)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
  """`make demo`, shrunk: the Makefile's own recipe with DEMO_ARGS appended, install skipped."""
  tmp = tmp_path_factory.mktemp("demo")
  workdir = tmp / "demo"
  args = f"--workdir={workdir} {TINY} --config.train.num_steps=4 --config.train.eval_every=4"
  # -o: treat the install stamp as up to date (the venv running this test is the install).
  proc = run(f"make -o .venv/.installed demo PY={sys.executable} DEMO_ARGS='{args}'", tmp)
  assert "configs/demo.py" in proc.stdout  # make echoes the recipe it ran
  assert "eval loss" in proc.stdout + proc.stderr
  return workdir


def check_make_demo(command, tmp_path, demo_workdir):
  assert (demo_workdir / "loss.png").exists()


def check_make_test(command, tmp_path, demo_workdir):
  """Run by CI itself: .ci/run must call it and fail when it fails."""
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert re.search(r"^\s*make test\b", ci, re.M), ".ci/run must call `make test`"
  assert "set -e" in ci or "exec make test" in ci or "make test ||" in ci


def check_make_test_latest(command, tmp_path, demo_workdir):
  """Run by CI itself (a venv of the newest releases): .ci/run calls it, without constraints."""
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert re.search(r"^\s*make test-latest\b", ci, re.M), ".ci/run must call `make test-latest`"
  makefile = open(os.path.join(ROOT, "Makefile")).read()
  recipe = re.search(r"^\$\(STAMP_LATEST\):.*?\n\n", makefile, re.S | re.M).group(0)
  assert "constraints.txt" not in recipe.split(":", 1)[1] and " -c " not in recipe


def check_pip_extra(command, tmp_path, demo_workdir):
  """`pip install -e .[extra]`: make install (run by CI) installs every extra the README names."""
  extra = re.search(r"\[(\w+)\]", command).group(1)
  makefile = open(os.path.join(ROOT, "Makefile")).read()
  installed = re.search(r'pip install .*-e "\.\[([\w,]+)\]"', makefile).group(1).split(",")
  assert extra in installed, f"make install does not install the {extra!r} extra"
  setup = open(os.path.join(ROOT, "setup.cfg")).read()
  assert re.search(rf"^{extra} =", setup, re.M), f"setup.cfg has no {extra!r} extra"


def check_main(command, tmp_path, demo_workdir):
  workdir = tmp_path / "run"
  env = {}
  if "--distributed" in command:
    # jax.distributed.initialize() finds its peers from the cluster's environment: a one-task
    # SLURM job stands in for the TPU pod.
    env = dict(SLURM_JOB_ID=str(free_port()), SLURM_NTASKS="1", SLURM_PROCID="0",
               SLURM_LOCALID="0", SLURM_STEP_NODELIST="localhost")  # fmt: skip
  shrink = TINY
  if "keel_1024" in command:  # C4 and a SentencePiece model are not here: the embedded corpus
    shrink += (
      " --config.model.num_blocks=2 --config.model.dtype=float32 --config.train.grad_accum_steps=1"
    )
    shrink += " --config.data.name=pycode --config.data.tokenizer=byte"
  proc = run(f"{with_workdir(command, workdir)} {shrink}", tmp_path, env)
  assert "eval loss" in proc.stdout + proc.stderr
  assert (workdir / "loss.png").exists()


def check_on_demo(command, tmp_path, demo_workdir):
  proc = run(command.replace("workdirs/demo", str(demo_workdir)), tmp_path)
  assert proc.stdout.strip(), f"{command} printed nothing"


def check_experiment(command, tmp_path, demo_workdir):
  name = re.search(r"experiments\.(\w+)", command).group(1)
  workdir = tmp_path / name
  if name == "benchmark":
    run(f"{with_workdir(command, workdir)} {BENCHMARK_SHRINK}", tmp_path)
    assert (workdir / "results.md").exists()
    return
  shrink = f"{TINY} {EXPERIMENT_SHRINK[name]} --config.compilation_cache=''"
  run(f"{with_workdir(command, workdir)} {shrink}", tmp_path)
  assert (workdir / "README.md").exists() and (workdir / "table.md").exists()


def check_data_benchmark(command, tmp_path, demo_workdir):
  shrink = "--seconds 0.5 --c4_docs 300 --c4_seq_len 128 --c4_vocab 400"
  proc = run(f"{command} {shrink}", tmp_path)
  assert proc.stdout.count(" ratio ") == 2, proc.stdout


def check_peak_buffers(command, tmp_path, demo_workdir):
  tiny = "--d_model 32 --num_heads 2 --num_kv_heads 1 --num_blocks 2 --seq_len 32 --batch_size 2"
  out = run(f"{command} {tiny} --min_mb 0", tmp_path).stdout
  for scheme in re.search(r"--residual ([\w ]+)", command).group(1).split():
    head = re.search(rf"## {scheme}: temporaries ([\d.]+) MB .*replayed peak ([\d.]+) MB", out)
    assert head, out
    temp_mb, peak_mb = map(float, head.groups())
    # What is live at once fits in the buffer XLA allocated for it; every byte is listed.
    assert 0 < peak_mb <= temp_mb, (peak_mb, temp_mb)
    table = out.split(head.group(0))[1].split("##")[0]
    rows = [float(r.split("|")[1]) for r in table.splitlines() if re.match(r"\| [\d.e-]+ \|", r)]
    assert sum(rows) == pytest.approx(peak_mb, rel=2e-3), (sum(rows), peak_mb)


def check_aot(command, tmp_path, demo_workdir):
  # The config's real shapes, mesh rules and topology; 4 sub-layers instead of 1024.
  proc = run(f"{command} --config.model.num_blocks=2", tmp_path)
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["num_devices"] > 1 and summary["fits"] is True


def check_two_processes(command, tmp_path, demo_workdir):
  workdir = tmp_path / "two_proc"
  script = with_workdir(command, workdir).replace("12355", str(free_port()))
  script = script.replace("--config.model.num_kv_heads=2", "--config.model.num_kv_heads=2 "
                          "--config.train.num_steps=4 --config.train.eval_every=4")  # fmt: skip
  run(script, tmp_path)
  assert (workdir / "loss.png").exists()


COVERAGE = [
  (r"^make demo$", check_make_demo),
  (r"^make test$", check_make_test),
  (r"^make test-latest$", check_make_test_latest),
  (r'^pip install -e "?\.\[\w+\]"?$', check_pip_extra),
  (r"^(\S*python) -m keel_jax\.main ", check_main),
  (r"^(\S*python) -m keel_jax\.(sample|evaluate) --workdir=workdirs/demo", check_on_demo),
  (r"^(\S*python) -m experiments\.(?!data_benchmark|peak_buffers)\w+ ", check_experiment),
  (r"^(\S*python) -m experiments\.peak_buffers", check_peak_buffers),
  (r"^(\S*python) -m experiments\.data_benchmark", check_data_benchmark),
  (r"^(\S*python) -m keel_jax\.aot_compile ", check_aot),
  (r"^for i in 0 1; do\n.*--num_processes=2", check_two_processes),
]


def checker(command: str):
  matches = [fn for pattern, fn in COVERAGE if re.search(pattern, command, re.S)]
  return matches[0] if len(matches) == 1 else None


def test_every_readme_command_is_covered():
  commands = readme_commands()
  assert len(commands) >= 15, commands  # the parser found the README's commands
  uncovered = [c for c in commands if checker(c) is None]
  assert not uncovered, f"README commands no test runs: {uncovered}"


@pytest.mark.parametrize("command", readme_commands(), ids=lambda c: c.split("\n")[0][:70])
def test_readme_command_runs(command, tmp_path, demo_workdir):
  fn = checker(command)
  if fn is None:
    pytest.fail(f"no entry in COVERAGE runs {command!r}")
  fn(command, tmp_path, demo_workdir)
