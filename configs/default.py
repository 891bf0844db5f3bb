"""Keel LM, small and CPU-friendly, on the embedded pycode corpus (byte-level).

  python -m keel_jax.main --config=configs/default.py --workdir=/tmp/keel_default

Every other config starts from this one and overrides fields.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 0  # 0 → the tokenizer's vocabulary, rounded up to a multiple of 64
  m.d_model = 128
  m.num_heads = 4
  m.num_kv_heads = 2  # GQA
  m.head_dim = 0  # 0 → d_model // num_heads
  m.d_ff = 0  # 0 → 3·d_model
  m.ffn = "swiglu"  # swiglu | gelu
  m.num_blocks = 8  # sub-layers = 2·num_blocks
  m.residual = "keel"  # keel | pre_ln | post_ln | deepnorm | sandwich | mix_ln | hybridnorm
  m.keel_alpha = 0.0  # 0 → α = L = 2·num_blocks
  m.mix_ln_fraction = 0.25
  m.norm = "rmsnorm"  # rmsnorm | layernorm
  m.norm_eps = 1e-5
  m.rope_theta = 10_000.0
  m.init_std = 0.02
  m.tie_embeddings = False
  m.dtype = "float32"  # float32 | bfloat16 (matmuls); norms, softmax and logits stay fp32
  m.param_dtype = "float32"
  m.scan_layers = True
  m.remat_policy = "full"  # none | full | branch | dots | dots_no_batch | names
  m.remat_save_names = ()
  m.nested_remat = False  # √L nested remat for 1000+ sub-layers
  m.attention_impl = "auto"  # auto | reference | blocked | sdpa | splash (auto: per backend)

  c.data = d = ml_collections.ConfigDict()
  d.name = "pycode"  # pycode | kjv | arith | any TFDS text dataset, e.g. lm1b, tiny_shakespeare
  d.tokenizer = "byte"  # byte | sentencepiece
  d.seq_len = 128
  d.data_dir = ""  # TFDS data_dir ('' → TFDS default); may be gs://
  d.cache_dir = ""  # where embedded corpora and tokenizers are prepared ('' → ~/.cache/keel_jax)
  d.text_feature = "text"  # TFDS: the feature holding each document's text
  d.train_split = "train"  # TFDS: training split (slices like 'train[:10%]' work)
  d.eval_split = ""  # TFDS: eval split ('' → validation if the dataset has one, else test)
  d.val_fraction = 0.05  # pycode | kjv | arith: documents held out, chosen by a hash of their key
  # auto: TFDS datasets stream through Grain (read by index, tokenized on the fly), embedded
  # corpora are tokenized once into cache_dir | stream | cache (TFDS too: fine for small sets)
  d.pipeline = "auto"
  d.num_threads = 4  # stream: Grain threads computing batches ahead of the trainer
  d.max_train_tokens = 0  # cache: 0 → all; cap on prepared train tokens
  d.max_eval_tokens = 2_000_000  # cap on prepared validation tokens (stream: read at start-up)
  d.spm_vocab_size = 8192  # sentencepiece: pieces, trained on a sample of the train split
  d.spm_train_chars = 5_000_000  # sentencepiece: characters sampled for training
  d.spm_model = ""  # sentencepiece: a trained .model to load ('' → train one into cache_dir)
  d.arith_steps = 4  # arith: register updates per problem (the difficulty)
  d.arith_num_problems = 100_000  # arith: problems generated (train + validation)

  c.train = t = ml_collections.ConfigDict()
  t.seed = 0
  t.num_steps = 300
  t.batch_size = 16  # global, in sequences
  t.grad_accum_steps = 1  # micro-batches per step
  t.learning_rate = 3e-3  # peak
  t.schedule = "cosine"  # cosine | wsd | linear | rsqrt | constant
  t.warmup_steps = 30
  t.min_learning_rate = 1e-7  # floor of the decay
  t.decay_fraction = 0.2  # wsd: fraction of steps spent decaying
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.weight_decay = 0.01  # not applied to norms or biases
  t.grad_clip = 1.0  # global norm; 0 disables
  t.mu_dtype = ""  # Adam's first moment: '' (the params' dtype) | float32 | bfloat16
  t.nu_dtype = ""  # Adam's second moment: '' | float32 | bfloat16
  # remat_policy="auto": the step must fit this many GB (0 → the device's memory: HBM on
  # TPU/GPU, available RAM on CPU).
  t.memory_budget_gb = 0.0
  t.z_loss = 0.0  # coefficient of log(Z)^2
  t.nonfinite = "stop"  # stop | skip: what a NaN/Inf loss or gradient does
  t.log_every = 10
  t.eval_every = 100
  t.eval_batches = 8
  t.diag_every = 100  # per-sub-layer grad/param RMS
  t.checkpoint_every = 100
  t.keep_checkpoints = 3
  t.task_eval_every = 0  # downstream tasks every N steps and at the end (0 = off)
  t.tasks = "arith"  # keel_jax.tasks names, comma-separated, for task_eval_every
  t.task_limit = 200  # examples scored per task (0 = all)
  t.sample_prompt = ""  # if set, print a sample continuing it after training

  c.mesh = ms = ml_collections.ConfigDict()
  ms.shape = (-1, 1, 1)  # -1 → the remaining devices
  ms.axes = ("data", "fsdp", "tensor")
  # Logical axis → mesh axis. The model names axes; only these rules place them.
  ms.rules = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("table_embed", None),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("layer_groups", None),  # the outer scan of nested remat
  )
  return c
