"""Benchmark presets for experiments/benchmark.py: ci (tests, ~1 min), cpu (README numbers), tpu.

  python -m experiments.benchmark --config=configs/benchmark.py:cpu --workdir=workdirs/bench_cpu

Expect (cpu): ~15 min on 2 quiet CPU cores; prints the results table and PASS/FAIL per target
(numbered as in the performance issue: 1 Keel costs Pre-LN's time/memory/matmuls under full remat,
2 memory near its floor, 3 remat auto, 4 KV-cache decode, 5 the plain Pre-LN peer).
Depths count sub-layers (2 per block). Targets are stated for the cpu preset; ci runs them at
tiny shapes only to keep the code path alive.
"""

import ml_collections

PRESETS = ("ci", "cpu", "tpu")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  preset = preset or "ci"
  if preset not in PRESETS:
    raise ValueError(f"unknown benchmark preset {preset!r}; choose one of {PRESETS}")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.repeats = 3  # timed steps per measurement (best is reported), after one warm-up
  c.matmul_sizes = (1024, 2048)  # measured matmul peak: best over these n×n fp32 matmuls
  c.attention_impls = ("reference", "blocked", "sdpa")  # timed alone, at the step's shape

  # Compile time of the real train step vs depth (sub-layers), scanned and unrolled.
  c.compile = ml_collections.ConfigDict()
  c.compile.model = dict(d_model=64, num_heads=2, num_kv_heads=1)
  c.compile.seq_len, c.compile.batch_size = 64, 2
  c.compile.scan_depths = (16, 64, 256, 1024)
  c.compile.unrolled_depths = (16, 32)  # unrolled compile time grows with depth: small only
  c.compile.repeats = 1  # scanned depths: best of this many compiles, round-robin

  # Step time, tokens/s and MFU, per attention implementation; Keel vs Pre-LN at the same shape.
  c.step = ml_collections.ConfigDict()
  # 8 blocks: Keel's distinct first block is then one of eight, as in any deep model.
  c.step.model = dict(d_model=512, num_heads=8, num_kv_heads=4, num_blocks=8)
  c.step.seq_len, c.step.batch_size = 512, 8
  # Each impl is one more d=512 step per round; the attention section times them all alone.
  c.step.attention_impls = ("blocked",)
  c.step.residuals = ("keel", "pre_ln")  # compared with the default attention implementation
  # Both residuals with the default attention and these remat policies too (the model config's
  # is "full", which recomputes the forward: FLOPs MFU does not count; "branch" keeps each
  # sub-layer's output, which Keel's LN_out backward needs, instead of recomputing it).
  c.step.extra_remat_policies = ("branch",)
  c.step.repeats = 5  # rounds of the step section: more than c.repeats, as its ratios are paired
  c.step.peer = True  # the plain Pre-LN PeerLM (experiments/benchmark.py) at the same size

  # Peak memory vs depth per remat policy ("nested" = full remat + √L nested remat).
  c.memory = ml_collections.ConfigDict()
  c.memory.method = (
    "rss"  # rss: peak RSS of a fresh process per point | analysis: memory_analysis()
  )
  c.memory.model = dict(d_model=64, num_heads=2, num_kv_heads=1)
  # Enough tokens that saved activations, not the optimizer state, dominate at depth (remat
  # none at L=1024 then peaks near 7 GB).
  c.memory.seq_len, c.memory.batch_size = 256, 4
  c.memory.depths = (64, 1024)
  c.memory.policies = ("none", "branch", "full", "nested")
  c.memory.parallel = 1  # points measured at once (rss): RSS is per process, so this is safe

  # The deep-model target: train 1024 sub-layers at d=256 near the memory floor, with Adam's
  # moments in float32 ("") and in bfloat16.
  c.deep = ml_collections.ConfigDict()
  c.deep.model = dict(d_model=256, num_heads=4, num_kv_heads=2, num_blocks=512, nested_remat=True)
  c.deep.seq_len, c.deep.batch_size = 128, 1
  c.deep.moment_dtypes = ("", "bfloat16")

  # remat_policy="auto" at the memory section's deepest shape, per budget (0: available RAM).
  c.auto = ml_collections.ConfigDict()
  # 0.6 GB sits between `full` (~0.56 GB at this shape) and `branch` (~0.69 GB).
  c.auto.budgets_gb = (0.0, 0.6)

  # Generation: KV-cache decode vs re-running the growing sequence, per depth (sub-layers).
  c.decode = ml_collections.ConfigDict()
  c.decode.model = dict(d_model=128, num_heads=4, num_kv_heads=2)
  c.decode.depths = (16, 1024)
  c.decode.batch_size, c.decode.prompt_len, c.decode.new_tokens = 4, 64, 256
  c.decode.bucket = 64  # the re-forward pads lengths to a multiple of this (one compile each)

  c.targets = dict(
    compile_ratio=1.2,
    mfu=0.5,
    keel_overhead=1.03,  # Keel / Pre-LN step time
    keel_memory=1.02,  # Keel / Pre-LN step bytes under the config's remat
    deep_over_floor=1.2,  # peak / floor of the deep model
    decode_speedup=10.0,  # KV-cache decode / re-forward tokens/s
    peer_speedup=1.3,  # ours / the plain Pre-LN peer, tokens/s
  )

  if preset == "ci":
    c.repeats = 2
    c.matmul_sizes = (512,)
    c.compile.model = dict(d_model=32, num_heads=2, num_kv_heads=1)
    c.compile.scan_depths = (16, 1024)
    c.compile.unrolled_depths = (16,)
    c.compile.seq_len = 32
    c.compile.repeats = 1
    c.step.repeats = 2
    c.step.model = dict(d_model=64, num_heads=4, num_kv_heads=2, num_blocks=1)
    c.step.seq_len, c.step.batch_size = 256, 2
    c.step.attention_impls = ("reference", "blocked")
    c.attention_impls = ("reference", "blocked")
    c.step.extra_remat_policies = ()
    c.memory.model = dict(d_model=32, num_heads=2, num_kv_heads=1)
    c.memory.seq_len, c.memory.batch_size = 32, 2
    c.memory.depths = (16, 64)
    c.memory.policies = ("none", "nested")
    c.memory.parallel = 2
    c.deep.model = dict(d_model=32, num_heads=2, num_kv_heads=1, num_blocks=512, nested_remat=True)
    c.deep.seq_len = 32
    c.auto.budgets_gb = (0.0, 0.012)
    c.decode.model = dict(d_model=32, num_heads=2, num_kv_heads=1)
    c.decode.depths = (16, 64)
    c.decode.batch_size, c.decode.prompt_len, c.decode.new_tokens = 2, 8, 16
    c.decode.bucket = 8
  elif preset == "tpu":
    c.matmul_sizes = (4096, 8192)
    c.compile.scan_depths = (16, 64, 256, 1024)
    c.compile.unrolled_depths = (16, 32, 64, 128)
    c.step.model = dict(d_model=1024, num_heads=16, num_kv_heads=8, num_blocks=8, dtype="bfloat16")
    c.step.seq_len, c.step.batch_size = 2048, 16
    c.step.attention_impls = ("reference", "blocked", "splash")
    c.attention_impls = ("reference", "blocked", "splash")
    c.memory.method = "analysis"  # one process per point would restart the TPU runtime each time
    c.deep.moment_dtypes = ("bfloat16",)
    c.auto.budgets_gb = (0.0, 4.0)
  return c
