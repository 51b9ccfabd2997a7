"""The examples: the demo end to end (tiny sizes, seconds), unit tests of its model and data, and
the README's commands for the demo and the distributed example."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alsals_fused.config import DEFAULT_VARIANT
from alsals_fused.examples import data, demo
from alsals_fused.examples.models import ByteGPT, GPTConfig, lm_loss

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def _run_module(args, timeout):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_readme_quick_start_module_runs():
    """``python -m alsals_fused.demo`` (the README's quick start) reaches the demo's parser."""
    done = _run_module(["-m", "alsals_fused.demo", "--help"], timeout=120)
    assert done.returncode == 0, done.stderr
    assert "python -m alsals_fused.demo" in done.stdout and "--tiny" in done.stdout


@pytest.mark.slow   # two gloo processes started by torchrun
def test_distributed_example_resumes_bit_identically(tmp_path):
    """The README's ``torchrun ... -m alsals_fused.examples.distributed`` command, DDP on CPU."""
    done = _run_module(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "alsals_fused.examples.distributed", "--mode", "ddp", "--steps", "2",
                        "--checkpoint", str(tmp_path / "ckpt")], timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "params bit-identical: True" in done.stdout, done.stdout
    # step() returns the closure's loss with its spent graph: the example reads it with .item()
    assert "requires_grad=True to a scalar" not in done.stderr, done.stderr


# -- the demo ------------------------------------------------------------------------------------
@pytest.mark.slow   # a whole demo run
def test_demo_end_to_end_tiny(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rows = demo.main(["--tiny", "--out", str(tmp_path)])
    out = capsys.readouterr().out

    assert list(rows) == [DEFAULT_VARIANT, "adam@0.001", "adam@0.003", "adam@0.01", "prodigy"]
    assert rows[DEFAULT_VARIANT]["optimizer"].startswith("ALSALS() default")
    for name, row in rows.items():
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["heldout_loss"]), name
        assert row["forwards_per_step"] >= 1, name
        assert row["wall_s"] >= 0 and row["final_step_size"] > 0, name
        assert row["optimizer"] in out, name            # the printed table has the row
    assert rows["adam@0.001"]["forwards_per_step"] == 1 and rows["prodigy"]["forwards_per_step"] == 1
    # alsals searches at every step: each step runs the gradient forward and >= 1 trial.
    assert rows["alsals"]["forwards_per_step"] >= 2
    # One forward per step: the loss at Adam's forward budget is the final loss.
    assert rows["prodigy"]["train_loss_equal_forwards"] == pytest.approx(rows["prodigy"]["train_loss"])
    assert "best Adam grid point:" in out and "x Prodigy" in out

    png = (tmp_path / demo.PNG_NAME).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    report = json.loads((tmp_path / demo.JSON_NAME).read_text())
    steps = report["config"]["steps"]
    assert set(report["table"]) == set(rows)
    for name, recs in report["records"].items():
        assert [r["step"] for r in recs] == list(range(1, steps + 1)), name
        assert all(math.isfinite(r["loss"]) and r["forwards"] >= 1 for r in recs), name
    # Same init, same first batch, same dropout masks: the first loss is the same for all three.
    first = {name: recs[0]["loss"] for name, recs in report["records"].items()}
    assert len(set(first.values())) == 1, first
    # The table's forwards per step agrees with the per-step records.
    for name, recs in report["records"].items():
        assert rows[name]["forwards_per_step"] == pytest.approx(sum(r["forwards"] for r in recs) / steps)


def test_demo_is_deterministic_given_the_seed(tmp_path):
    args = ["--tiny", "--steps", "3", "--optimizers", "adaptive,alsals,alsals_plateau,adam,adam_sls",
            "--adam-lrs", "1e-3",
            "--no-plot", "--quiet", "--threads", "1"]
    runs = []
    for i in range(2):
        demo.main(args + ["--out", str(tmp_path / str(i))])
        report = json.loads((tmp_path / str(i) / demo.JSON_NAME).read_text())
        runs.append({n: [(r["loss"], r["step_size"], r["forwards"]) for r in recs]
                     for n, recs in report["records"].items()})
    assert runs[0] == runs[1]
    # alsals_plateau searches every 4th step: trial forwards on step 1 only
    forwards = [f for *_, f in runs[0]["alsals_plateau"]]
    assert forwards[0] > 1 and forwards[1:] == [1, 1] and all(f > 1 for *_, f in runs[0]["alsals"])


def test_demo_loss_at_an_equal_number_of_forwards():
    recs = [dict(loss=float(i), forwards=f) for i, f in enumerate([3, 1, 2, 2, 1, 1])]
    # 6 forwards are spent after the third step (3 + 1 + 2): its last 2 losses are 1 and 2.
    assert demo.loss_at_forwards(recs, 6, 2) == pytest.approx(1.5)
    assert demo.loss_at_forwards(recs, 100, 3) == pytest.approx((3 + 4 + 5) / 3)
    assert math.isnan(demo.loss_at_forwards(recs, 2, 3))     # not even the first step fits
    rows = {n: dict(train_loss=v) for n, v in [("alsals", 1.0), ("adam@0.001", 2.0), ("adam@0.01", 1.5)]}
    assert demo.compare(rows) == {"adam@0.001": "adam@0.001", "best_adam": "adam@0.01", "prodigy": None}


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        demo.parse_args(["--optimizers", "sgd"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--steps", "0"])
    for bad in ("1e-3,x", "0", "-1e-3", "nan"):
        with pytest.raises(SystemExit):
            demo.parse_args(["--adam-lrs", bad])


def test_build_model_same_seed_same_init():
    cfg = GPTConfig(context=8, n_layer=1, n_head=2, d_model=16)
    a, b = demo.build_model(cfg, seed=3), demo.build_model(cfg, seed=3)
    c = demo.build_model(cfg, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


# -- models.py -----------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_model_is_causal(tie):
    torch.manual_seed(0)
    cfg = GPTConfig(context=16, n_layer=2, n_head=2, d_model=32, dropout=0.1, tie_weights=tie)
    model = ByteGPT(cfg).eval()                       # eval: no dropout, outputs comparable
    idx = torch.randint(0, 256, (2, 16))
    i = 6
    changed = idx.clone()
    changed[:, i + 1:] = torch.randint(0, 256, (2, 16 - i - 1))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert a.shape == (2, 16, 256)
    torch.testing.assert_close(a[:, :i + 1], b[:, :i + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, i + 1:], b[:, i + 1:])   # the change is visible after i


def test_model_tied_and_untied_embeddings():
    tied = ByteGPT(GPTConfig(context=8, n_layer=1, n_head=2, d_model=16, tie_weights=True))
    untied = ByteGPT(GPTConfig(context=8, n_layer=1, n_head=2, d_model=16, tie_weights=False))
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.head.weight is not untied.tok_emb.weight
    assert untied.num_parameters() - tied.num_parameters() == 256 * 16


def test_model_dropout_replays_under_the_same_rng_state():
    # What the line search relies on: restoring the generator reproduces the training forward.
    torch.manual_seed(0)
    model = ByteGPT(GPTConfig(context=16, n_layer=1, n_head=2, d_model=32, dropout=0.2)).train()
    idx = torch.randint(0, 256, (2, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    state = torch.get_rng_state()
    with torch.no_grad():
        first = lm_loss(model(x), y)
        torch.set_rng_state(state)
        replay = lm_loss(model(x), y)
        other = lm_loss(model(x), y)                  # fresh masks
    assert torch.equal(first, replay)
    assert not torch.equal(first, other)


def test_model_rejects_sequences_longer_than_its_context():
    model = ByteGPT(GPTConfig(context=8, n_layer=1, n_head=2, d_model=16))
    with pytest.raises(ValueError):
        model(torch.zeros(1, 9, dtype=torch.long))


# -- data.py -------------------------------------------------------------------------------------
def test_stdlib_corpus_is_deterministic_and_split_by_file():
    a = data.load_corpus(train_bytes=60_000, heldout_bytes=10_000)
    b = data.load_corpus(train_bytes=60_000, heldout_bytes=10_000)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)
    assert a.train_files == b.train_files and a.heldout_files == b.heldout_files
    assert a.train.dtype == torch.uint8 and a.heldout.dtype == torch.uint8
    for t in (a.train, a.heldout):
        assert 0 <= int(t.min()) and int(t.max()) <= 255
    assert len(a.train) == 60_000 and len(a.heldout) == 10_000        # the fixed budgets
    assert a.train_files and a.heldout_files
    assert not set(a.train_files) & set(a.heldout_files)
    assert all(f.endswith(".py") and "site-packages" not in f for f in a.train_files + a.heldout_files)
    assert all(not data.is_heldout_file(f) for f in a.train_files)
    assert all(data.is_heldout_file(f) for f in a.heldout_files)
    printable = ((a.train >= 32) & (a.train < 127)) | (a.train == 10)
    assert printable.float().mean() > 0.9                               # it is source text


def test_corpus_from_a_directory_excludes_third_party_and_splits_by_file(tmp_path):
    # Each file holds a unique marker, repeated to make the corpus big enough.
    names = [f"pkg{i // 10}/mod{i}.py" for i in range(60)]
    for rel in names + ["site-packages/thirdparty.py", "__pycache__/cached.py", "notes.txt"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes((f"# <{rel}>\n" + "x = 1\n" * 40).encode())
    assert data.list_source_files(str(tmp_path)) == sorted(names)
    corpus = data.load_corpus(train_bytes=10**6, heldout_bytes=10**6, heldout_percent=30,
                              root=str(tmp_path))
    assert sorted(corpus.train_files + corpus.heldout_files) == sorted(names)   # budget not hit
    train, heldout = bytes(corpus.train.tolist()), bytes(corpus.heldout.tolist())
    for rel in corpus.train_files:
        assert f"<{rel}>".encode() in train and f"<{rel}>".encode() not in heldout
    for rel in corpus.heldout_files:
        assert f"<{rel}>".encode() in heldout and f"<{rel}>".encode() not in train
    assert b"thirdparty" not in train + heldout and b"cached" not in train + heldout


def test_batches_are_next_byte_pairs_and_reproducible():
    text = torch.arange(200, dtype=torch.uint8)
    starts = data.random_starts(len(text), context=8, batch_size=4, n_batches=3, seed=1)
    assert torch.equal(starts, data.random_starts(len(text), 8, 4, 3, seed=1))
    x, y = data.get_batch(text, starts[0], 8)
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, x + 1)
    fixed = data.fixed_starts(len(text), 8, 5)
    assert int(fixed.min()) >= 0 and int(fixed.max()) + 9 <= len(text)
