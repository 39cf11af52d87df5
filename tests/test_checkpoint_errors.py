"""Errors of a Hugging Face checkpoint that does not load, each naming what to fix: the damaged or
truncated shard (and what the index says it holds), the HF keys and expert indices of a missing
expert tensor, a config that declares MTP without MTP weights (load with ``n_mtp_layers=0``), and
tensors holding NaN or inf (name, count, file)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import hf_model, interop_args, our_model, tiny_hf_config  # noqa: E402

from hai_llm.interop import (CheckpointMismatchError, DamagedCheckpointError, args_from_hf_config,  # noqa: E402
                             load_hf_checkpoint, save_hf_checkpoint)
from hai_llm.model.transformer import build_model  # noqa: E402


@pytest.fixture
def sharded(tmp_path):
    """A per-expert checkpoint in several shards, and a model to load it into."""
    args = interop_args(n_mtp_layers=0)
    paths = save_hf_checkpoint(our_model(args), tmp_path, max_shard_bytes=200_000, expert_layout="per_expert")
    assert len(paths) > 2
    return tmp_path, paths, build_model(args, device="cpu")


def test_truncated_and_damaged_shards_are_named(sharded):
    path, paths, model = sharded
    bad = paths[1]
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    first_held = sorted(k for k, f in index.items() if f == bad.name)[0]
    data = bad.read_bytes()
    bad.write_bytes(data[:-1000])  # an interrupted download
    with pytest.raises(DamagedCheckpointError) as e:
        load_hf_checkpoint(model, path)
    msg = str(e.value)
    assert str(bad) in msg and "not fully covered" in msg and first_held in msg
    assert f"the file has {len(data) - 1000} bytes, its header describes {len(data)}" in msg
    assert isinstance(e.value, CheckpointMismatchError)  # callers catching mismatches see it too

    bad.write_bytes(data[:5])
    with pytest.raises(DamagedCheckpointError, match=rf"{bad.name} cannot be read .*not even the 8-byte header"):
        load_hf_checkpoint(model, path)
    damaged = bytearray(data)
    damaged[12:24] = b"\x00" * 12  # inside the JSON header
    bad.write_bytes(bytes(damaged))
    with pytest.raises(DamagedCheckpointError, match=rf"{bad.name} cannot be read .*download it again"):
        load_hf_checkpoint(model, path)


def test_missing_expert_names_hf_keys_and_index(sharded):
    path, paths, model = sharded
    key = "model.layers.1.mlp.experts.5.down_proj.weight"
    for f in paths:
        sd = load_file(str(f))
        if key in sd:
            del sd[key]
            save_file(sd, str(f))
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"][key]
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointMismatchError, match=r"not in the checkpoint: layers\.1\.ffn\.experts\.w2 experts 5 "
                                                      r"\(HF 'model\.layers\.1\.mlp\.experts\.5\.down_proj\.weight'\)"):
        load_hf_checkpoint(model, path)
    assert load_hf_checkpoint(model, path, strict=False).missing == ["layers.1.ffn.experts.w2"]


def test_missing_fused_expert_names_both_layouts(tmp_path):
    args = interop_args(n_mtp_layers=0)
    save_hf_checkpoint(our_model(args), tmp_path)  # fused layout, one file
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    del sd["model.layers.2.mlp.experts.down_proj"]
    save_file(sd, str(f))
    with pytest.raises(CheckpointMismatchError, match=r"layers\.2\.ffn\.experts\.w2 \(HF 'model\.layers\.2\.mlp"
                                                      r"\.experts\.down_proj' or 'model\.layers\.2\.mlp\.experts\.\{0\.\.7\}"
                                                      r"\.down_proj\.weight'\)"):
        load_hf_checkpoint(build_model(args, device="cpu"), tmp_path)


def test_config_with_mtp_but_no_mtp_weights_offers_n_mtp_layers_0(tmp_path):
    hf = hf_model(tiny_hf_config(n_mtp=1))
    hf.save_pretrained(tmp_path)  # config.json says num_nextn_predict_layers=1, the files hold no layer 3
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with pytest.raises(CheckpointMismatchError, match=r"n_mtp_layers=1 but the checkpoint holds no MTP weights .*"
                                                      r"args_from_hf_config\(path, n_mtp_layers=0\)") as e:
        load_hf_checkpoint(build_model(args_from_hf_config(tmp_path), device="cpu"), tmp_path)
    assert "randomly initialized" in str(e.value)
    ours = build_model(args_from_hf_config(tmp_path, n_mtp_layers=0), device="cpu").eval()
    report = load_hf_checkpoint(ours, tmp_path)
    assert not report.missing and not report.unexpected
    tokens = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max() < 1e-4


def test_nonfinite_values_are_reported(tmp_path):
    args = interop_args(n_mtp_layers=0)
    save_hf_checkpoint(our_model(args), tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    w = sd["model.layers.2.self_attn.o_proj.weight"]
    w[0, :3] = float("nan")
    w[1, 0] = float("inf")
    save_file(sd, str(f))
    model = build_model(args, device="cpu")
    with pytest.raises(CheckpointMismatchError, match=r"1 checkpoint tensors hold non-finite values: "
                                                      r"'model\.layers\.2\.self_attn\.o_proj\.weight': 3 NaN, 1 inf of "
                                                      rf"{w.numel()} in {f}"):
        load_hf_checkpoint(model, tmp_path)
    report = load_hf_checkpoint(model, tmp_path, strict=False)
    assert list(report.nonfinite) == ["model.layers.2.self_attn.o_proj.weight"]
