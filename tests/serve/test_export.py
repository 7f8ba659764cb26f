"""`moeforge export hf|hub`: transformers loads the export offline and its greedy tokens equal ours; shards,
the model card, refusals and the upload's dry run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeforge.export import ExportError, export_checkpoint, upload_to_hub
from moeforge.io import write_checksums
from moeforge.model.config import load_model_config
from moeforge.model.transformer import MoETransformer
from moeforge.serve.engine import Engine
from moeforge.serve.sampling import SamplingParams
from moeforge.tokens.tokenizer import load_tokenizer
from moeforge.train.checkpoint import save_checkpoint

transformers = pytest.importorskip("transformers")


def _run_with_checkpoint(root: Path, tokenizer_dir: Path, preset: str = "tiny", **overrides: object) -> Path:
    vocab = load_tokenizer(tokenizer_dir).get_vocab_size()
    sets = [f"vocab_size={vocab}", *(f"{k}={v}" for k, v in overrides.items())]
    cfg = load_model_config(preset, sets)
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    with torch.no_grad():  # a random model with confident, varied predictions makes the comparison strict
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    run = root / "run"
    shutil.copytree(tokenizer_dir, run / "tokenizer")
    opt = torch.optim.AdamW(model.parameters())
    state = {"model_config": cfg.model_dump(mode="json"), "config": {"name": "export-test"}}
    save_checkpoint(run, step=1, model=model, optimizer=opt, state=state, keep_last=1)
    return run


def _hf_greedy(path: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    out = []
    for ids in prompts:
        t = torch.tensor([ids])
        gen = model.generate(t, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(gen[0, len(ids) :].tolist())
    return out


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_transformers_loads_the_export_and_greedy_matches_ours(token_tokenizer: Path, tmp_path: Path) -> None:
    run = _run_with_checkpoint(tmp_path, token_tokenizer)
    out = export_checkpoint(run, tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert {"generation_config.json", "README.md"} <= names

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "Anna has 3 apples. How many?"}]
    text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    engine = Engine.from_checkpoint(run)
    assert text == engine.chat_prompt(msgs)
    prompts = [hf_tok(text).input_ids, engine.encode("The river ran past the mill"), engine.encode("x = 1")]
    assert prompts[0] == engine.encode(text)
    ours = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    theirs = _hf_greedy(out, prompts, 12)
    assert [c.token_ids for c in ours] == theirs
    assert len({tuple(t) for t in theirs}) > 1 and any(len(set(t)) > 1 for t in theirs)  # not degenerate

    gen = json.loads((out / "generation_config.json").read_text())
    assert hf_tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    card = (out / "README.md").read_text()
    assert "active per token" in card and "## Limitations" in card and "## Intended use" in card
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 4


def test_weights_above_the_shard_size_are_sharded_with_an_index(
    token_tokenizer: Path, tmp_path: Path
) -> None:
    run = _run_with_checkpoint(tmp_path, token_tokenizer)
    out = export_checkpoint(run, tmp_path / "hf", max_shard_bytes=1_500_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and not (out / "model.safetensors").exists()
    assert all((out / s).is_file() for s in shards)
    engine = Engine.from_checkpoint(run)
    prompt = [engine.encode("Anna has")]
    ours = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert [c.token_ids for c in ours] == _hf_greedy(out, prompt, 8)


def test_half_awake_ghost_experts_are_refused_with_a_reason(token_tokenizer: Path, tmp_path: Path) -> None:
    run = _run_with_checkpoint(tmp_path, token_tokenizer, preset="ghost-32d")
    from safetensors.torch import load_file, save_file

    ckpt = next((run / "checkpoints").iterdir())
    w = load_file(str(ckpt / "model.safetensors"))
    for k in w:
        if k.endswith("ghost_alpha"):
            w[k] = torch.tensor([0.5, 0.0])
    save_file(w, str(ckpt / "model.safetensors"))
    write_checksums(ckpt)  # a checkpoint written this way, not a corrupted one
    with pytest.raises(ExportError, match="half-awake"):
        export_checkpoint(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    r = subprocess.run(
        [sys.executable, "-m", "moeforge", "export", "hf", str(run), "--out", str(tmp_path / "hf2")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2 and "half-awake" in r.stderr and "Traceback" not in r.stderr


def test_hub_dry_run_lists_files_and_a_missing_token_is_a_clear_error(
    token_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = export_checkpoint(_run_with_checkpoint(tmp_path, token_tokenizer), tmp_path / "hf")
    files = dict(upload_to_hub(out, "me/tiny-moe", dry_run=True))
    assert "model.safetensors" in files and files["README.md"] > 0
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(ExportError, match="no Hugging Face token"):
        upload_to_hub(out, "me/tiny-moe")
    with pytest.raises(ExportError, match="OWNER/NAME"):
        upload_to_hub(out, "tiny-moe", dry_run=True)
    with pytest.raises(ExportError, match="not an export"):
        upload_to_hub(tmp_path, "me/x", dry_run=True)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_TOKEN", None)
    r = subprocess.run(
        [sys.executable, "-m", "moeforge", "export", "hub", str(out), "--repo", "me/x", "--dry-run"],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "160"},
        check=False,
    )
    assert r.returncode == 0 and "would upload" in r.stdout and "model.safetensors" in r.stdout
