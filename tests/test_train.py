"""End-to-end runs of `ncf.py` on the tiny synthetic dataset, asserting the figures it logs."""
import itertools
import re

import pytest
import torch
from helpers import epochs_of, event_of, make_synthetic_cache, train

import ncf
from dataloading import EpochSampler, load_cache
from devices import choose_precision, cpu_has_native_bf16
from neumf import NeuMF

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(synthetic_cache, tmp_path_factory):
    """A 6-epoch fp32 run shared by the tests below."""
    result, log, ck = train(synthetic_cache, tmp_path_factory.mktemp("trained"), "-e", "6", "--opt_level", "O0")
    return result, log, ck


def test_training_learns_beyond_item_popularity(trained):
    _, log, _ = trained
    popularity = event_of(log, "config")["popularity_hr"]
    best = event_of(log, "summary")["best_hr"]
    print(f"popularity HR@10 {popularity:.4f}, NeuMF best HR@10 {best:.4f}")
    assert 0.1 < popularity < 0.4
    assert best >= popularity + 0.10


def test_every_epoch_logs_the_recipe_figures(trained):
    result, log, _ = trained
    epochs = epochs_of(log)
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5, 6]
    for r in epochs:
        assert r["train_throughput"] == pytest.approx(22_000 * 5 / r["train_time_s"], rel=0.1)
        assert r["eval_throughput"] == pytest.approx(799 * 101 / r["eval_time_s"], rel=1e-6)
        assert 0 < r["ndcg"] < r["hr"] < 1
    losses = [r["loss"] for r in epochs]
    assert losses[-1] < losses[0] < 0.7
    summary = event_of(log, "summary")
    best = max(epochs, key=lambda r: r["hr"])
    assert (summary["best_hr"], summary["best_epoch"]) == (best["hr"], best["epoch"])
    assert summary["best_train_throughput"] == max(r["train_throughput"] for r in epochs)
    assert summary["time_to_target_s"] is None  # default --threshold 1.0 is never reached
    # The console shows the same figures, once each.
    out = result.stdout
    assert out.count("| HR@10 ") == 6 and "best HR@10" in out
    assert f"HR@10 {best['hr']:.4f}" in out
    for words in ("device cpu", "world size 1", "precision fp32", "Adam(fused=True)", "799 users", "steps per epoch"):
        assert words in out


def test_mode_test_reproduces_the_best_epoch_exactly(trained, synthetic_cache, run_cli, tmp_path):
    _, log, ck = trained
    summary = event_of(log, "summary")
    test_log = tmp_path / "test.json"
    result = run_cli(["ncf.py", "--data", synthetic_cache, "--mode", "test", "--load_checkpoint_path", ck / "model.pth",
                      "--opt_level", "O0", "--log_path", test_log])
    assert result.returncode == 0, result.stderr
    record = event_of(test_log, "test")
    assert (record["hr"], record["ndcg"]) == (summary["best_hr"], summary["best_ndcg"])
    ckpt = torch.load(ck / "model.pth", weights_only=True)
    assert ckpt["epoch"] == summary["best_epoch"]
    assert ckpt["config"] == {"nb_users": 799, "nb_items": 400, "mf_dim": 16, "mlp_layer_sizes": [64, 32, 16],
                              "dropout": 0.5}


def test_checkpoint_of_another_dataset_is_refused(trained, tmp_path, run_cli, assert_user_error):
    _, _, ck = trained
    other = make_synthetic_cache(tmp_path, users=300, items=200, per_user=25)
    result = run_cli(["ncf.py", "--data", other, "--mode", "test", "--load_checkpoint_path", ck / "model.pth"])
    assert_user_error(result, "799 users", "300 users", "model.pth")


def test_threshold_stops_training_and_reports_time_to_target(synthetic_cache, tmp_path):
    result, log, _ = train(synthetic_cache, tmp_path, "-e", "10", "--opt_level", "O0", "-t", "0.3")
    epochs = epochs_of(log)
    assert epochs[-1]["hr"] >= 0.3 > max(r["hr"] for r in epochs[:-1])
    assert event_of(log, "summary")["time_to_target_s"] > 0
    assert "reached --threshold 0.3" in result.stdout


def test_same_seed_same_figures_other_seed_other_figures(synthetic_cache, tmp_path):
    def figures(seed, name):
        _, log, _ = train(synthetic_cache, tmp_path, "-e", "2", "--opt_level", "O0", "--seed", seed, name=name)
        return [(r["loss"], r["hr"], r["ndcg"]) for r in epochs_of(log)]

    first = figures(7, "a")
    assert figures(7, "b") == first
    other = figures(8, "c")
    assert all(x != y for x, y in zip(first, other, strict=True))


def first_epoch(cache, workdir, batch, *flags):
    """The first epoch's record, and the setup line's step figures, of a run without dropout."""
    result, log, _ = train(cache, workdir, "-e", "1", "-b", batch, "--dropout", "0", "--opt_level", "O0", *flags,
                           name="-".join(map(str, (batch, *flags))))
    setup = re.search(r"global batch ([\d,]+) \| per rank [\d,]+ \| micro-batch ([\d,]+) \| steps per epoch ([\d,]+)",
                      result.stdout)
    return epochs_of(log)[0], tuple(int(group.replace(",", "")) for group in setup.groups())


def test_grads_accumulated_split_gives_the_same_losses(synthetic_cache, tmp_path):
    """--accumulate split: 4 micro-batches per step reproduce 1 (dropout 0, same seed), up to float summation
    order: -b stays the step's batch."""
    one, one_steps = first_epoch(synthetic_cache, tmp_path, 8192, "--grads_accumulated", 1)
    four, four_steps = first_epoch(synthetic_cache, tmp_path, 8192, "--grads_accumulated", 4, "--accumulate", "split")
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert four["hr"] == pytest.approx(one["hr"], abs=0.005)
    assert (one_steps[:2], four_steps[:2]) == ((8192, 8192), (8192, 2048)) and four_steps[2] == one_steps[2]


def test_grads_accumulated_takes_the_recipes_meaning(synthetic_cache, tmp_path):
    """The recipe's --grads_accumulated (the default): a step accumulates G batches of -b, so -b 2048 with G 4
    is the step of -b 8192 split in four, the same figures exactly, with a quarter of the steps of -b 2048."""
    recipe, recipe_steps = first_epoch(synthetic_cache, tmp_path, 2048, "--grads_accumulated", 4)
    split, split_steps = first_epoch(synthetic_cache, tmp_path, 8192, "--grads_accumulated", 4, "--accumulate", "split")
    figures = ("loss", "hr", "ndcg", "eval_loss")
    assert [recipe[name] for name in figures] == [split[name] for name in figures]
    assert recipe_steps == split_steps == (8192, 2048, split_steps[2])


def step_losses(cache, grads_accumulated, steps=6):
    """Losses of the first optimizer steps, computed with ncf.train_epoch's own code path."""
    torch.manual_seed(0)
    model = NeuMF(cache.num_users, cache.num_items, mf_dim=16, mlp_layer_sizes=(64, 32, 16), dropout=0.0)
    optimizer, _ = ncf.make_optimizer(model, 0.01, (0.25, 0.5), 1e-8)
    ctx = ncf.DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    precision = choose_precision("O0", "auto", ctx.device)
    scaler = precision.grad_scaler()
    sampler = EpochSampler(cache.train, cache.num_items, 4, "cpu", seed=1)
    losses = []
    for micro_batches, size in itertools.islice(sampler.epoch(1, 2048, 0, 1, grads_accumulated), steps):
        losses.append(float(ncf.train_step(model, optimizer, scaler, precision, micro_batches, size, ctx)))
    return losses


def test_grads_accumulated_step_by_step(synthetic_cache):
    cache = load_cache(synthetic_cache)
    one, four = step_losses(cache, 1), step_losses(cache, 4)
    assert four == pytest.approx(one, rel=1e-4)
    assert len(set(one)) == len(one)


def host_reads(prof):
    """aten::_local_scalar_dense calls (what .item(), float(), .tolist() become), except the fused
    Adam kernel's reads of its step counters: on a CPU they live in host memory by design (on CUDA
    they are device tensors and the kernel reads none)."""

    def in_optimizer(event):
        while event is not None:
            if event.name.startswith("aten::_fused_adam"):
                return True
            event = event.cpu_parent
        return False

    return sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense" and not in_optimizer(e))


def test_no_host_sync_per_batch(synthetic_cache):
    """Host reads of device values during an epoch do not grow with its number of batches."""
    cache = load_cache(synthetic_cache)
    ctx = ncf.DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    precision = choose_precision("O0", "auto", ctx.device)

    def reads(batch_size):
        model = NeuMF(cache.num_users, cache.num_items, mf_dim=8, mlp_layer_sizes=(16, 8), dropout=0.5)
        optimizer, _ = ncf.make_optimizer(model, 0.01, (0.25, 0.5), 1e-8)
        sampler = EpochSampler(cache.train, cache.num_items, 4, "cpu", seed=1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ncf.train_epoch(model, optimizer, precision.grad_scaler(), precision, sampler, 1, batch_size, 1, ctx)
        return sampler.steps_per_epoch(batch_size, 1), host_reads(prof)

    few_steps, few_reads = reads(16384)
    many_steps, many_reads = reads(1024)
    assert many_steps > 10 * few_steps
    assert many_reads == few_reads == 1  # the epoch's mean loss, read once at the end


def test_host_read_counter_sees_a_read_in_the_loop():
    """The counter above is not blind: one .item() per step shows up once per step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            torch.ones(3).sum().item()
    assert host_reads(prof) == 5


def test_amp_bf16_matches_fp32(synthetic_cache, tmp_path):
    _, fp32_log, _ = train(synthetic_cache, tmp_path, "-e", "5", "--opt_level", "O0", "--dropout", "0", name="fp32")
    result, bf16_log, _ = train(synthetic_cache, tmp_path, "-e", "5", "--amp", "--amp_dtype", "bfloat16", "--dropout",
                                "0", name="bf16")
    assert "precision bf16 autocast (O2)" in result.stdout
    fp32, bf16 = event_of(fp32_log, "summary")["best_hr"], event_of(bf16_log, "summary")["best_hr"]
    print(f"best HR@10 fp32 {fp32:.4f} bf16 {bf16:.4f}")
    assert bf16 == pytest.approx(fp32, abs=0.02)


def test_o2_without_native_bf16_falls_back_with_a_warning(synthetic_cache, tmp_path):
    if cpu_has_native_bf16():
        pytest.skip("this CPU has native bf16, so O2 really runs bf16")
    result, _, _ = train(synthetic_cache, tmp_path, "-e", "1", "--opt_level", "O2")
    assert "no native bf16" in result.stderr
    assert "precision fp32 (O2)" in result.stdout


RECIPE_FLAGS = {
    "--data": None, "-e/--epochs": "30", "-b/--batch_size": "1048576", "--valid_batch_size": "1048576",
    "-f/--factors": "64", "--layers": "[256, 256, 128, 64]", "-n/--negative_samples": "4",
    "-l/--learning_rate": "0.0045", "-k/--topk": "10", "-t/--threshold": "1.0", "--beta1": "0.25",
    "--beta2": "0.5", "--eps": "1e-08", "--dropout": "0.5", "--checkpoint_dir": None, "--mode": "train",
    "--grads_accumulated": "1", "--accumulate": "recipe", "--opt_level": "O2", "-s/--seed": "1", "--local_rank": None,
    "--amp": None,
    "--device": "auto", "--log_path": None, "--load_checkpoint_path": None, "--resume": None,
    "--full_ranking": None, "--no_progress": None,
}


def test_help_lists_every_flag_with_its_default(run_cli):
    result = run_cli(["ncf.py", "--help"])
    assert result.returncode == 0
    options = result.stdout[result.stdout.index("options:"):]
    # One entry per option: its flag line(s) and help text, whitespace collapsed.
    entries = {}
    for raw in re.split(r"\n(?=  -)", options)[1:]:
        names = {word.strip(",") for word in raw.split("  ")[1].split() if word.startswith("-")}
        entries[frozenset(names)] = " ".join(raw.split())
    for flags, default in RECIPE_FLAGS.items():
        (entry,) = [text for names, text in entries.items() if set(flags.split("/")) <= names]
        if default is not None:
            assert f"(default: {default})" in entry, entry
    assert "--checkpoint-path" in options and "--local-rank" in options
    args = ncf.parse_args([])
    assert (args.epochs, args.batch_size, args.factors, args.layers) == (30, 1048576, 64, [256, 256, 128, 64])
    assert (args.learning_rate, args.beta1, args.beta2, args.seed, args.opt_level) == (0.0045, 0.25, 0.5, 1, "O2")
