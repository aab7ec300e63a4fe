"""Knobs of the synthetic canvas generator (kept apart so the generator and the Hydra schema share it)."""

from dataclasses import dataclass


@dataclass
class SyntheticConfig:
    """Size, seed and realism knobs of the synthetic streaming service."""

    seed: int = 0
    """Seed of every random draw; the same seed gives byte-identical files."""
    n_users: int = 4000
    """Number of users (members)."""
    n_items: int = 2000
    """Number of items (videos) in the catalogue."""
    requests_per_task: int = 20000
    """Logged requests per canvas; each impression canvas logs a slate of slate_min..slate_max rows."""
    relatedness: float = 1.0
    """How much the canvases share: 1.0 one latent taste for every canvas, 0.0 unrelated tasks."""
    dirt_rate: float = 0.01
    """Fraction of extra dirty rows per canvas (duplicates, nulls, unknown ids, bad timestamps, wrong types)."""
    slate_min: int = 10
    """Smallest logged slate."""
    slate_max: int = 20
    """Largest logged slate."""
    start_time: int = 1_700_000_000
    """Epoch seconds of the first event."""
    days: int = 28
    """Length of the logged period in days."""
    chunk_requests: int = 50_000
    """Requests generated and written per parquet part; bounds the generator's memory."""
