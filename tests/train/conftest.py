"""Fixtures for trainer tests: a synthetic token directory (learnable, full blocks) and a small config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from moeforge.tokens.shards import IndexedShardWriter

SEQ = 32
VOCAB = 96


def write_token_dir(root: Path, *, n_train: int = 64, n_valid: int = 12, seed: int = 0) -> Path:
    """Two domains of full blocks: 'count' (arithmetic sequences mod 64) and 'echo' (a short motif
    repeated), so a model can learn them and per-domain losses differ."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    splits: dict[str, Any] = {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_valid)):
        w = IndexedShardWriter(root / split, np.uint16, domains=True)
        for i in range(n):
            dom = i % 2
            if dom == 0:
                start, step = int(rng.integers(0, 64)), int(rng.integers(1, 4))
                toks = (start + step * np.arange(SEQ + 1)) % 64 + 2
            else:
                motif = rng.integers(66, VOCAB, size=int(rng.integers(2, 5)))
                toks = np.resize(motif, SEQ + 1)
            w.add_sample(toks.astype(np.uint16), [SEQ + 1], None, dom)
        info = w.close()
        splits[split] = {"prefix": split, "samples": n, "tokens": info["tokens"], "files": info["files"]}
    manifest = {
        "format": "moeforge.tokens/1",
        "fingerprint": "0" * 64,
        "seq_len": SEQ,
        "mode": "pretrain",
        "tokenizer": {"vocab_size": VOCAB, "pad_id": 1, "eos_id": 0, "sha256": "0" * 64},
        "domains": ["count", "echo"],
        "splits": splits,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def small_config(tokens: Path, out: Path, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": "t",
        "out_dir": str(out),
        "seed": 3,
        "model": "tiny",
        "model_overrides": {
            "d_model": 32,
            "n_heads": 4,
            "n_kv_heads": 2,
            "n_layers": 2,
            "ffn_hidden": 64,
            "max_seq_len": SEQ,
            "moe": {
                "num_experts": 4,
                "top_k": 1,
                "expert_hidden": 32,
                "router_noise_std": 0.3,
                "noise_anneal_steps": 20,
                "aux_free_bias_rate": 0.001,
            },
        },
        "data": {"tokens": str(tokens), "seq_len": SEQ},
        "steps": 12,
        "micro_batch": 4,
        "grad_accum": 2,
        "log_every": 1,
        "checkpoint_every": 4,
        "keep_last": 2,
        "eval": {"every": 4, "max_batches": 2},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "tensorboard": False,
        "peak_flops": 1e11,
    }
    for k, v in extra.items():
        cfg[k] = v
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def token_dir(tmp_path: Path) -> Path:
    return write_token_dir(tmp_path / "tokens")


class ConfigFactory:
    """``factory(out_dir, **top_level_overrides) -> dict`` and ``factory.write(path, cfg) -> path``."""

    def __init__(self, tokens: Path) -> None:
        self.tokens = tokens

    def __call__(self, out: Path, **extra: Any) -> dict[str, Any]:
        return small_config(self.tokens, out, **extra)

    @staticmethod
    def write(path: Path, cfg: dict[str, Any]) -> Path:
        return write_config(path, cfg)


@pytest.fixture
def make_config(token_dir: Path) -> ConfigFactory:
    return ConfigFactory(token_dir)
