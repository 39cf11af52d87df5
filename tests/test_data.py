"""Tests of the data pipeline: tokenizers, corpus preparation, and the data-parallel sampler.

They pin the properties training relies on: prepared files decode back to exactly the
source documents joined by EOS, preparation is deterministic and reused when nothing
changed, the sampler's order is a pure function of (corpus, seq_len, seed), data-parallel
ranks partition each global batch, and resuming from ``state_dict`` continues the very
same sample stream. Every error path is checked to fail early with a message naming the
thing to change. All corpora are tiny temp files or a small slice of the stdlib (< 20 s).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hai_llm.data import (
    ByteTokenizer,
    HFTokenizer,
    SequenceSampler,
    TokenDataset,
    build_tokenizer,
    default_corpus_sources,
    ensure_prepared,
    list_source_files,
    load_meta,
    prepare_corpus,
    split_batch,
    token_dtype,
    window_order,
)
from hai_llm.launch.prepare import main as prepare_main

EOS_TEXT = "<|eos|>"


# -- helpers ------------------------------------------------------------------------------
def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _hf_tokenizer_file(tmp_path: Path) -> Path:
    """A tiny byte-level BPE tokenizer.json, trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path


@pytest.fixture
def corpus_dir(tmp_path: Path) -> tuple[Path, list[str]]:
    """A folder of mixed sources and the documents it holds, in corpus order."""
    root = tmp_path / "src"
    _write(root / "a.txt", "first document\nwith two lines\n")
    _write(root / "b" / "c.py", "print('héllo, wörld 🙂')\n")
    recs = [{"text": "json one"}, {"text": "json two", "id": 2}]
    _write(root / "b" / "d.jsonl", "\n".join(json.dumps(r) for r in recs) + "\n\n")
    _write(root / "ignored.bin", "not matched by the default patterns")
    _write(root / ".hidden" / "e.txt", "hidden folders are skipped")
    docs = ["first document\nwith two lines\n", "print('héllo, wörld 🙂')\n",
            "json one", "json two"]
    return root, docs


@pytest.fixture
def small_ds(tmp_path: Path) -> TokenDataset:
    """~3 KB byte-tokenized corpus: enough windows for several epochs of tiny batches."""
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(100))
    src = _write(tmp_path / "small.txt", text)
    return TokenDataset(prepare_corpus([str(src)], tmp_path / "prep", "byte"))


# -- tokenizers ---------------------------------------------------------------------------
def test_byte_tokenizer_round_trip():
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert tok.vocab_size == 259 and (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    text = "héllo\tWörld 🙂 <|eos|> \x00 end"
    ids = tok.encode(text)
    assert max(ids) < 256  # literal special-token text never becomes a special id
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == "<|bos|>" + text + EOS_TEXT
    assert tok.decode(ids + [tok.eos_id], skip_special_tokens=True) == text
    with pytest.raises(ValueError, match="outside"):
        tok.decode([259])


def test_hf_tokenizer_json(tmp_path):
    path = _hf_tokenizer_file(tmp_path)
    tok = build_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == 0 and tok.bos_id == 0  # "<|endoftext|>" plays both roles
    from tokenizers import Tokenizer

    assert tok.vocab_size == Tokenizer.from_file(str(path)).get_vocab_size() > 256
    assert build_tokenizer(path.parent).fingerprint == tok.fingerprint  # folder form
    text = "the lazy fox, héllo 🙂 <|endoftext|>"
    ids = tok.encode(text)
    assert tok.eos_id not in ids  # special text inside a document stays text
    assert tok.decode(ids) == text

    # A sibling tokenizer_config.json (DeepSeek's layout) names the special tokens.
    (path.parent / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|endoftext|>"}, "bos_token": None}))
    assert build_tokenizer(str(path)).eos_id == 0


def test_build_tokenizer_errors(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=r"nope.*tokenizer\.json.*'byte'"):
        build_tokenizer(str(missing))
    with pytest.raises(ValueError, match="'byte'"):
        build_tokenizer("gpt2")
    bad = _write(tmp_path / "bad.json", "{not json")
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        build_tokenizer(str(bad))


def test_token_dtype():
    assert token_dtype(259) == np.uint16
    assert token_dtype(65536) == np.uint16  # max id 65535 still fits
    assert token_dtype(65537) == np.uint32
    assert token_dtype(129280) == np.uint32  # DeepSeek-V3


# -- preparation --------------------------------------------------------------------------
def test_prepare_folder_round_trip(tmp_path, corpus_dir):
    root, docs = corpus_dir
    out = prepare_corpus(str(root), tmp_path / "out", "byte")
    ds = TokenDataset(out)
    tok = ByteTokenizer()
    assert ds.dtype == np.uint16 and ds.vocab_size == 259 and ds.eos_id == tok.eos_id
    assert tok.decode(ds.tokens) == EOS_TEXT.join(docs) + EOS_TEXT
    assert ds.n_documents == len(docs)
    for i, doc in enumerate(docs):
        assert tok.decode(ds.document(i)) == doc + EOS_TEXT
    meta = load_meta(out)
    assert meta["n_files"] == 3 and meta["n_tokens"] == len(ds)
    assert meta["max_token_id"] == tok.eos_id
    assert not list(out.glob(".*.tmp"))  # no temp files left behind
    # Deterministic: a second preparation writes identical bytes.
    again = prepare_corpus(str(root), tmp_path / "out2", "byte")
    assert load_meta(again)["content_sha256"] == meta["content_sha256"]


def test_prepare_files_and_text_field(tmp_path):
    a = _write(tmp_path / "a.txt", "alpha")
    j = _write(tmp_path / "r.jsonl", json.dumps({"body": "beta"}) + "\n"
               + json.dumps({"body": "gamma"}) + "\n")
    out = prepare_corpus([str(j), str(a), str(j)], tmp_path / "out", "byte", text_field="body")
    ds = TokenDataset(out / "meta.json")
    assert ByteTokenizer().decode(ds.tokens) == EOS_TEXT.join(["beta", "gamma", "alpha"]) \
        + EOS_TEXT  # order as given, the repeated file read once
    with pytest.raises(ValueError, match=r"r\.jsonl:1 has no field 'text'.*--text-field"):
        prepare_corpus([str(j)], tmp_path / "bad", "byte")


def test_prepare_with_hf_tokenizer(tmp_path, corpus_dir):
    root, docs = corpus_dir
    tok = build_tokenizer(str(_hf_tokenizer_file(tmp_path)))
    out = prepare_corpus(root, tmp_path / "out", tok, pattern="*.txt,*.jsonl")
    ds = TokenDataset(out)
    kept = [docs[0], docs[2], docs[3]]
    eos = "<|endoftext|>"
    assert tok.decode(ds.tokens.tolist()) == eos.join(kept) + eos
    assert ds.vocab_size == tok.vocab_size and ds.meta["tokenizer"] == tok.name


def test_max_bytes_gives_prefix(tmp_path, corpus_dir):
    root, docs = corpus_dir
    full = "".join(docs).encode()
    cap = len(docs[0]) + 5
    out = prepare_corpus(root, tmp_path / "out", "byte", max_bytes=cap)
    meta = load_meta(out)
    assert meta["truncated_at_max_bytes"] and meta["n_text_bytes"] == cap
    text = ByteTokenizer().decode(TokenDataset(out).tokens, skip_special_tokens=True)
    assert text.encode() == full[:cap]


def test_ensure_prepared_reuses_and_detects_changes(tmp_path, corpus_dir):
    root, _ = corpus_dir
    out = ensure_prepared(root, tmp_path / "out")
    stamp = os.stat(out / "tokens.bin").st_mtime_ns, os.stat(out / "tokens.bin").st_ino
    ensure_prepared(root, tmp_path / "out")
    assert (os.stat(out / "tokens.bin").st_mtime_ns, os.stat(out / "tokens.bin").st_ino) == stamp

    n_before = load_meta(out)["n_tokens"]
    _write(root / "a.txt", "a longer replacement first document\n")
    ensure_prepared(root, tmp_path / "out")
    assert load_meta(out)["n_tokens"] != n_before  # edited source -> re-tokenized
    ensure_prepared(root, tmp_path / "out", max_bytes=10)
    assert load_meta(out)["n_text_bytes"] == 10  # different cap -> re-tokenized


def test_stdlib_default_corpus(tmp_path):
    (stdlib,) = default_corpus_sources()
    out = ensure_prepared(None, tmp_path / "std", max_bytes=100_000)
    meta = load_meta(out)
    assert meta["n_text_bytes"] == 100_000 and meta["truncated_at_max_bytes"]
    assert meta["config"]["patterns"] == ["*.py"] and "standard library" in \
        meta["source_description"]
    files = list_source_files([stdlib], ("*.py",))
    rels = [f.relative_to(stdlib).as_posix() for f in files]
    assert rels == sorted(rels) and not any("site-packages/" in r for r in rels)
    first = next(f for f in files if f.stat().st_size)  # empty files are skipped
    expected = first.read_bytes().decode("utf-8", errors="replace")
    doc0 = ByteTokenizer().decode(TokenDataset(out).document(0))
    assert doc0.endswith(EOS_TEXT) and expected.startswith(doc0[: -len(EOS_TEXT)])
    assert len(doc0) > len(EOS_TEXT)


# -- sampler ------------------------------------------------------------------------------
def test_sampler_windows_and_determinism(small_ds):
    s1 = SequenceSampler(small_ds, seq_len=16, global_batch=8, seed=3)
    s2 = SequenceSampler(small_ds, seq_len=16, global_batch=8, seed=3)
    b1, b2 = [s1.next_batch() for _ in range(5)], [s2.next_batch() for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(b1, b2, strict=True))
    assert b1[0].dtype == torch.long and b1[0].shape == (8, 17)
    other = SequenceSampler(small_ds, seq_len=16, global_batch=8, seed=4)
    assert not torch.equal(other.next_batch(), b1[0])
    # Each row is a real window of the corpus starting at a multiple of seq_len.
    starts = s1.sample_starts(0, 8)
    toks = torch.from_numpy(small_ds.tokens.astype(np.int64))
    for row, st in zip(b1[0], starts, strict=True):
        assert st % 16 == 0 and torch.equal(row, toks[st:st + 17])
    # One epoch visits every window exactly once; the next epoch is a new shuffle.
    n = s1.n_windows
    assert sorted(s1.sample_starts(0, n) // 16) == list(range(n))
    assert not np.array_equal(window_order(n, 3, 0), window_order(n, 3, 1))


def test_sampler_dp_ranks_partition_global_batch(small_ds):
    ref = SequenceSampler(small_ds, seq_len=8, global_batch=12, seed=0, extra_tokens=3)
    ranks = [SequenceSampler(small_ds, seq_len=8, global_batch=12, dp_rank=r, dp_world=4,
                             seed=0, extra_tokens=3) for r in range(4)]
    for step in range(3):
        glob = ref.next_batch()
        assert torch.equal(glob, ref.global_batch_at(step))
        local = [s.next_batch() for s in ranks]
        assert all(x.shape == (3, 11) for x in local)
        assert torch.equal(torch.cat(local), glob)  # union (in rank order) == global batch
        starts = [set(s.sample_starts(step * 12 + s.dp_rank * 3, 3)) for s in ranks]
        assert sum(len(x) for x in starts) == len(set().union(*starts)) == 12  # disjoint
        assert all(torch.equal(s.local_batch_at(step), x) for s, x in zip(ranks, local, strict=True))
    inputs, mtp2 = split_batch(glob, 8, depth=2)
    assert torch.equal(inputs, glob[:, :8]) and torch.equal(mtp2, glob[:, 3:11])


def test_sampler_resume_is_exact(small_ds):
    kw = dict(seq_len=16, global_batch=8, seed=7)
    run = SequenceSampler(small_ds, **kw)
    n_steps = 3 * run.n_windows // 8 + 2  # crosses several epoch boundaries
    k = n_steps // 2
    for _ in range(k):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint round trip
    expected = [run.next_batch() for _ in range(n_steps - k)]
    resumed = SequenceSampler(small_ds, **kw)
    resumed.load_state_dict(state)
    assert resumed.epoch == state["epoch"] and resumed.step == k
    assert all(torch.equal(resumed.next_batch(), e) for e in expected)

    # Resuming on 2 dp ranks continues the same global stream.
    halves = [SequenceSampler(small_ds, dp_rank=r, dp_world=2, **kw) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    assert torch.equal(torch.cat([h.next_batch() for h in halves]), expected[0])


# -- errors -------------------------------------------------------------------------------
def test_error_empty_corpus(tmp_path):
    _write(tmp_path / "src" / "x.bin", "data")
    with pytest.raises(ValueError, match=r"empty corpus.*--pattern"):
        prepare_corpus(tmp_path / "src", tmp_path / "out")
    _write(tmp_path / "src" / "empty.txt", "")
    with pytest.raises(ValueError, match="empty corpus"):
        prepare_corpus(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_error_missing_source_and_unprepared_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist.txt"):
        prepare_corpus([str(tmp_path / "does_not_exist.txt")], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="hai-llm-prepare"):
        TokenDataset(tmp_path / "never_prepared")


def test_error_id_outside_model_vocab(small_ds):
    small_ds.check_vocab(259)
    small_ds.check_vocab(129280)
    with pytest.raises(ValueError, match=r"tokenizer vocab \(259 ids.*model vocab_size 200"):
        small_ds.check_vocab(200)


def test_error_damaged_tokens_file(small_ds):
    with open(small_ds.path / "tokens.bin", "ab") as fh:
        fh.write(b"\x00\x00")
    with pytest.raises(ValueError, match="damaged"):
        TokenDataset(small_ds.path)


def test_error_corpus_too_small(tmp_path):
    out = prepare_corpus([str(_write(tmp_path / "t.txt", "tiny"))], tmp_path / "out")
    ds = TokenDataset(out)  # 5 tokens
    SequenceSampler(ds, seq_len=4, global_batch=1)
    with pytest.raises(ValueError, match=r"5 tokens.*seq_len \+ extra_tokens = 6"):
        SequenceSampler(ds, seq_len=4, global_batch=1, extra_tokens=2)


def test_error_global_batch_not_divisible(small_ds):
    with pytest.raises(ValueError, match="global_batch 6 is not divisible .* 4"):
        SequenceSampler(small_ds, seq_len=8, global_batch=6, dp_rank=0, dp_world=4)
    s = SequenceSampler(small_ds, seq_len=8, global_batch=4)
    with pytest.raises(ValueError, match="seq_len=16 but this sampler has seq_len=8"):
        s.load_state_dict(SequenceSampler(small_ds, seq_len=16, global_batch=4).state_dict())


# -- command line -------------------------------------------------------------------------
def test_cli(tmp_path, corpus_dir, capsys):
    root, docs = corpus_dir
    assert prepare_main(["--out", str(tmp_path / "o"), "--pattern", "*.txt", str(root)]) == 0
    out = capsys.readouterr().out
    n = len(docs[0].encode()) + 1
    assert f"n_tokens:  {n}" in out and "files:     1" in out and str(tmp_path / "o") in out
    assert prepare_main(["--out", str(tmp_path / "o"), "--pattern", "*.txt", "--json",
                         "--show", "5", str(root)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_tokens"] == n and summary["sample"] == docs[0][:5]
    with pytest.raises(SystemExit) as exc:
        prepare_main(["--out", str(tmp_path / "o"), str(tmp_path / "missing")])
    assert exc.value.code == 2 and "missing" in capsys.readouterr().err


# -- the scan of tokens.bin, cached beside it (hai_llm/data/token_scan.py) ----------------------
def test_max_id_scan_cached_beside_tokens_bin(small_ds, tmp_path):
    ds, d = small_ds, small_ds.path
    side = d / "tokens.bin.scan.json"
    cached = json.loads(side.read_text())
    assert cached["max_token_id"] == ds.max_token_id  # hai-llm-prepare recorded the id it wrote: no scan
    assert (cached["size"], cached["mtime_ns"]) == ((d / "tokens.bin").stat().st_size,
                                                    (d / "tokens.bin").stat().st_mtime_ns)
    # a current cache is read, not re-scanned: a planted value under the file's key comes back as is
    side.write_text(json.dumps({**cached, "max_token_id": 7}))
    assert ds.data_max_token_id() == 7
    # a write to tokens.bin (new mtime) makes it stale: the next check scans the data and re-caches
    with open(d / "tokens.bin", "r+b") as fh:
        fh.seek(5 * ds.dtype.itemsize)
        fh.write(np.array([300], dtype=ds.dtype).tobytes())
    assert ds.data_max_token_id() == 300 and json.loads(side.read_text())["max_token_id"] == 300
    with pytest.raises(ValueError, match=r"tokens\.bin holds token id 300 but model\.vocab_size is 260"):
        ds.check_vocab(260)
    # no cache at all (e.g. a corpus from elsewhere): the launcher's preflight, before any rank
    # starts, is the one process that scans and writes it
    from hai_llm.checkpoint.preflight import check_run_folder
    from helpers import fast_config

    side.unlink()
    check_run_folder(fast_config(tmp_path / "run", d, "model.vocab_size=320"))
    assert json.loads(side.read_text())["max_token_id"] == 300
