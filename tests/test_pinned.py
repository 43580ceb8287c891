"""Behaviour pinned across refactors (torchtune-style): a tiny seeded run's per-epoch figures.

The figures were first measured before the restructuring of issue 11 (commit 3460a33) on an AVX2 CPU,
and re-pinned for the two changes that moved them: NeuMF's biases left at PyTorch's default as the recipe
leaves them (issue 23.7; they were zeroed), measured on an AMD EPYC with AVX-512; then the dropout masks' random
bits drawn 64 to a draw where they were drawn 32 (issue 26: other masks of the same distribution, so the runs with
dropout moved), measured on an Intel Xeon with AMX ("no_dropout" unchanged within 1e-7). Float kernels differ
between CPUs, not only between AVX2 and AVX-512: an Intel Xeon with the same capability ("AVX512", plus AMX)
moved the per-sample run's third loss by 1.9e-5 relative (the BLAS picks its kernels by vendor too). So the
loss holds to rel 1e-4 and HR@10 / NDCG@10 to two users' worth on every CPU; exact comparisons are kept for
two paths run on the same machine (tests/test_cpu_kernels.py, tests/test_model.py).
"""
import pytest
from helpers import epochs_of

import ncf

# (mean loss, HR@10, NDCG@10) of epochs 1-3: 300 users x 200 items, factors 8, layers 32 16 8, fp32.
PINNED = {
    # Batch 4096 outnumbers the 500 table rows: the factored first layer and CPU dropout kernels.
    "fast": (["-b", "4096"], [
        (0.6147487380287864, 0.2833333333333333, 0.13173399281989417),
        (0.5502281622453169, 0.31, 0.15063277522776072),
        (0.5174069404602051, 0.31666666666666665, 0.15482360209258214)]),
    # Batch 256 < 500 rows: the per-sample forward.
    "plain": (["-b", "256"], [
        (0.5194987919978323, 0.31666666666666665, 0.15517530941126534),
        (0.4869970861886967, 0.3, 0.14840156773360946),
        (0.48092748388389633, 0.3, 0.15136926528264505)]),
    # No dropout: no masks drawn at all.
    "no_dropout": (["-b", "4096", "--dropout", "0"], [
        (0.6112889376553622, 0.31333333333333335, 0.15674344982614039),
        (0.530528111891313, 0.2833333333333333, 0.14159581325834267),
        (0.4892996441234242, 0.29, 0.14848741946486987)]),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_tiny_run_reproduces_the_pinned_figures(tiny_cache, tmp_path, name):
    flags, expected = PINNED[name]
    log = tmp_path / "log.json"
    ncf.main(["--data", str(tiny_cache), "-e", "3", "--checkpoint_dir", str(tmp_path / "ck"), "--log_path",
              str(log), "--factors", "8", "--layers", "32", "16", "8", "--opt_level", "O0", "--no_progress", *flags])
    got = [(r["loss"], r["hr"], r["ndcg"]) for r in epochs_of(log)]
    users = 300
    for (loss, hr, ndcg), (want_loss, want_hr, want_ndcg) in zip(got, expected, strict=True):
        assert loss == pytest.approx(want_loss, rel=1e-4)
        assert hr == pytest.approx(want_hr, abs=2 / users)
        assert ndcg == pytest.approx(want_ndcg, abs=2 / users)
