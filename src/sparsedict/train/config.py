"""TrainConfig: everything about how dictionaries are trained (not what they are, nor the data)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    batch_size: int = 4096
    """Tokens per optimiser step (global, summed over data-parallel ranks)."""
    epochs: float = 1.0
    """Passes over the cached training tokens (fractions allowed)."""
    max_steps: int = 0
    """Stop after this many steps (0: determined by epochs)."""
    optimizer: str = "auto"
    """'adam', 'signum_sf' (sign-SGD with momentum under a schedule-free wrapper) or 'auto': Adam with the
    architecture's tuned preset (``Dictionary.auto_train``; TopK: betas (0.8, 0.99), run-length LR rule,
    decoder LR x2, warmup <= 10 % of the run, the benchmark winner in benchmarks/RESULTS_training.md; BatchTopK and
    Matryoshka use it too; ReLU, JumpReLU and Gated two thirds of its run-length LR; MP-SAE the run-length LR with
    warmup <= 10 %); plain Adam with the width rule for architectures without a preset."""
    lr: float = 0.0
    """Learning rate; 0 uses the architecture's rule: under 'auto' with a 'budget' preset
    0.0148 (B/4096)^(1/4) / (steps^(1/3) sqrt(n/2^14)) (B: batch_size, at most 4096) for runs of at most
    2000 steps (the measured range), the width rule beyond; otherwise the width rule adam 2e-4/sqrt(n/2^14),
    signum_sf 5e-3/sqrt(n/2^14)."""
    betas: tuple[float, float] | None = None
    """Adam betas (None: the 'auto' preset's, else (0.9, 0.999))."""
    lr_dec_scale: float = 0.0
    """Multiplier of the LR for W_dec (0: the 'auto' preset's, else 1)."""
    eps: float = 6.25e-10
    """Adam epsilon."""
    momentum: float = 0.95
    """Schedule-free momentum for 'signum_sf'."""
    warmup_steps: int = -1
    """Linear LR warmup steps (Adam); -1: 100, which an 'auto' preset may cap to a fraction of the run. A value
    >= 0 is used as given."""
    decay_fraction: float = 0.2
    """Linear LR decay to 0 over this final fraction of steps (Adam; 0 disables)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0: off)."""
    normalise_inputs: str = "auto"
    """'none', 'sqrt_d' (E‖x‖ = √d, SAELens/Anthropic), 'unit_msn' (E‖x‖² = 1, Gemma Scope) or 'auto' (each
    architecture's ``input_normalisation``, the one its default coefficients assume: none for the k-sparse
    architectures, sqrt_d for ReLU and Gated, unit_msn for JumpReLU). Folded on export."""
    shuffle_ram_gib: float = 0.0
    """Host RAM per rank for the shuffle windows of the training data sources together, in GiB (each cached
    source gets an equal share; its window is the largest that fits). 0: half of the host's available memory
    divided among the local ranks, each window at most 262,144 rows and at least 16 batches (the chosen
    window is printed when training starts)."""
    init_rows: int = 32768
    """Rows sampled from the store to initialise b_dec and normalisation constants."""
    dead_tokens: int = 10_000_000
    """A latent is dead when it has not fired for this many training tokens (AuxK target, dead %)."""
    autocast: str = "none"
    """Compute dtype for the encoder/decoder GEMMs: 'none' (fp32) or 'bf16' (fp32 master weights)."""
    seed: int = 0
    """Seed for initialisation and data order."""
    device: str = "cpu"
    """'cpu', 'cuda' or 'cuda:N' (under torchrun the local rank picks the GPU)."""
    threads: int = 0
    """CPU threads for torch (0: all cores of this machine)."""
    log_every: int = 10
    """Steps between log records (JSONL, wandb, progress bar)."""
    checkpoint_every: int = 0
    """Steps between resumable training checkpoints (0: only at the end and on SIGTERM)."""
    out_dir: str = "runs/train"
    """Where checkpoints, logs and the final dictionaries go."""
    wandb_project: str = ""
    """Log to this wandb project from rank 0 (empty: no wandb)."""
    shard_latents: bool = False
    """Split each dictionary's latents across ranks (latent/tensor parallel) instead of replicating it."""
    dist_timeout_min: float = 10.0
    """Collective timeout in minutes: a dead rank ends the job with an error instead of a hang."""
    source: str = "cache"
    """Where the training activations come from: 'cache' (the recipe's cache section is written to disk, or
    resumed, and read back) or 'live' (the model runs during training, on cache.device, with the cache
    section's model, text, hookpoints and exclusion rules; no shards are written; one forward computes every
    hookpoint the dictionaries read, and the model runs again every epoch)."""
    calibration_rows: int = -1
    """Training rows held out of every epoch, on which the end-of-run calibrations are set (the inference θ of
    BatchTopK and Matryoshka; the final L0 of ReLU, Gated and JumpReLU steered to l0_target): rows a run has
    trained on fire fewer latents than new rows, so a threshold set on them overshoots k on new data once a
    run repeats its rows (benchmarks/RESULTS_defaults.md). -1: 8192 rows (at most a tenth of the rows) when the
    run passes over its rows more than once and a dictionary calibrates, else none (a single pass sets them
    on rows as yet untrained); 0: none. Automatic only from a cache read in the global shuffle (the window
    order stays a live source's batches) and in-memory rows; a live source cannot hold rows out."""
    shuffle: str = "auto"
    """Order of the training rows: 'global' (blocks of 256 rows from the whole cache permuted, then windows of
    262,144 rows permuted; a cache only), 'window' (the text in order, windows of 262,144 rows permuted: the
    order a live source serves; a float32 cache read this way gives live training's batches) or 'auto'
    (global from a cache, window live)."""

    def __post_init__(self) -> None:
        if self.optimizer not in ("auto", "adam", "signum_sf"):
            raise ValueError(f"optimizer must be 'adam' or 'signum_sf' (or 'auto'), not {self.optimizer!r}")
        if self.normalise_inputs not in ("none", "sqrt_d", "unit_msn", "auto"):
            raise ValueError(
                f"normalise_inputs must be 'none', 'sqrt_d', 'unit_msn' or 'auto', not {self.normalise_inputs!r}"
            )
        if self.autocast not in ("none", "bf16"):
            raise ValueError(f"autocast must be 'none' or 'bf16', not {self.autocast!r}")
        if self.shuffle_ram_gib < 0:
            raise ValueError(f"shuffle_ram_gib must be >= 0 (0: automatic), got {self.shuffle_ram_gib}")
        if self.warmup_steps < -1:
            raise ValueError(f"warmup_steps must be >= 0 (or -1 for the default), got {self.warmup_steps}")
        if self.source not in ("cache", "live"):
            raise ValueError(f"source must be 'cache' or 'live', not {self.source!r}")
        if self.shuffle not in ("auto", "global", "window"):
            raise ValueError(f"shuffle must be 'global', 'window' or 'auto', not {self.shuffle!r}")
        if self.source == "live" and self.shuffle == "global":
            raise ValueError(
                "shuffle: global needs a cache on disk; a live source serves the text in order, shuffled within "
                "windows: use shuffle: window (or auto)"
            )
        if self.calibration_rows < -1:
            raise ValueError(f"calibration_rows must be >= 0 (or -1: automatic), got {self.calibration_rows}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.betas is not None:
            self.betas = tuple(self.betas)
