"""Per-block sparsity search: space, variant bank and its budgeted cache, the three algorithms, Ray, and bad input."""

from __future__ import annotations

import itertools
import json
import socket
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import assert_clean_failure, run_cli

from sparseforge.errors import SearchError
from sparseforge.models.loading import load_model
from sparseforge.prune.methods import get_method
from sparseforge.prune.pruner import prune
from sparseforge.search import SearchConfig, SearchSpace, non_dominated, parse_levels, run_search, search
from sparseforge.search.bank import VariantBank, unit_sizes
from sparseforge.search.cache import BudgetedStore
from sparseforge.search.decompose import combine, split_groups
from sparseforge.search.evopress import level_switch
from sparseforge.search.quality import QualityMeter
from sparseforge.search.runner import Evaluations, Request, SerialBackend, _connect
from sparseforge.sparsity.masks import is_valid_nm

LEVELS = "0.2:0.8:0.1"


def calibration(n: int = 8, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, 200, (n, seqlen), generator=torch.Generator().manual_seed(0))


def small(algorithm: str = "nsga2", tmp_path=None, **overrides) -> SearchConfig:
    settings_ = dict(algorithm=algorithm, levels=LEVELS, target=0.5, windows=4, seqlen=32, population=8,
                     generations=3, groups=2, group_generations=2, gpir_points=3, offspring=4, stages=[[2, 2], [4, 1]],
                     cache_dir=str(tmp_path / "cache") if tmp_path else None, reuse=False)
    return SearchConfig(**(settings_ | overrides))


def bank_for(handle, tmp_path, method="wanda", pattern="unstructured", budget=2**30, levels=LEVELS, log=print):
    space = SearchSpace(parse_levels(levels), unit_sizes(handle))
    chosen = get_method(method)
    return VariantBank(handle, space, chosen, pattern, chosen.default_per_row, {}, calibration(), 4, tmp_path / "c",
                       budget, log, progress=False)


# ---- space ------------------------------------------------------------------------------------------------------
def test_levels_parse_and_refuse():
    assert parse_levels("0.3:0.5:0.1") == (0.3, 0.4, 0.5)
    assert parse_levels("0.6, 0.4") == (0.4, 0.6)
    for bad, message in [("", "search space is empty"), ("0.5:0.9:0", "step must be positive"),
                         ("1.2", r"outside \[0, 1\)"), ("a:b", "levels must look like")]:
        with pytest.raises(SearchError, match=message):
            parse_levels(bad)
    with pytest.raises(SearchError, match="one level"):
        SearchSpace((0.5,), (10, 10))
    with pytest.raises(SearchError, match="no prunable blocks"):
        SearchSpace((0.4, 0.5), ())


def test_average_sparsity_of_a_group_reads_that_group():
    space = SearchSpace(parse_levels(LEVELS), (100, 100, 300))
    genome = (0, 6, 3)  # 0.2, 0.8, 0.5
    assert space.average_sparsity(genome, range(1, 3)) == pytest.approx((0.8 * 100 + 0.5 * 300) / 400)
    assert space.average_sparsity(genome) == pytest.approx((20 + 80 + 150) / 500)


def test_target_outside_levels_is_refused():
    space = SearchSpace(parse_levels(LEVELS), (100, 100, 100))
    with pytest.raises(SearchError, match=r"outside the level range \[0.2, 0.8\]"):
        space.check_target(0.9)


@given(st.floats(0.2, 0.8), st.integers(2, 12))
@settings(max_examples=60, deadline=None)
def test_balanced_genome_is_as_close_to_the_target_as_the_grid_allows(target, blocks):
    space = SearchSpace(parse_levels(LEVELS), (64,) * blocks)
    genome = space.balanced_genome(target)
    achieved = space.average_sparsity(genome)
    assert abs(achieved - target) <= 0.1 / blocks / 2 + 1e-9 or abs(achieved - target) <= 0.05 + 1e-9
    assert max(genome) - min(genome) <= 1  # as uniform as possible


# ---- the budgeted cache -------------------------------------------------------------------------------------------
def test_cache_evicts_least_recently_used_and_says_so(tmp_path):
    messages = []
    store = BudgetedStore(tmp_path, budget_bytes=2500, log=messages.append)
    for key in ("a", "b"):
        store.put(key, {"x": torch.zeros(250)})  # about 1 KB each with the header
        time.sleep(0.01)
    store.get("a")  # a is now the most recently used
    time.sleep(0.01)
    store.put("c", {"x": torch.zeros(250)})
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    assert store.evicted == 1 and "evicted 1 least recently used" in messages[-1]
    shrunk = BudgetedStore(tmp_path, budget_bytes=1200, log=messages.append)  # reopened with a smaller budget
    assert shrunk.used_bytes() <= 1200 and "over its budget" in messages[-2]
    store.put("huge", {"x": torch.zeros(10_000)})
    assert store.get("huge") is None and "exceeds the whole cache budget" in messages[-1]


def test_damaged_cache_entry_reads_as_missing(tmp_path):
    store = BudgetedStore(tmp_path, 10**6, log=lambda m: None)
    store.put("k", {"x": torch.ones(100)})
    store.path("k").write_bytes(store.path("k").read_bytes()[:40])
    assert store.get("k") is None


# ---- the variant bank ---------------------------------------------------------------------------------------------
def test_variants_reach_each_level_exactly_and_restore_dense(tiny_llama, tmp_path):
    dense = {v.name: v.weight.detach().clone() for v in tiny_llama.adapter.linears()}
    bank = bank_for(tiny_llama, tmp_path)
    bank.precompute()
    for level in bank.space.levels:
        bank.apply([level] * len(bank.views))
        for view in tiny_llama.adapter.linears():
            zeros_per_row = (view.weight == 0).sum(1)
            assert (zeros_per_row == round(level * view.in_features)).all()  # Wanda compares within rows
    bank.restore_dense()
    assert all(torch.equal(v.weight, dense[v.name]) for v in tiny_llama.adapter.linears())


def test_evicted_variants_are_recomputed_identically(tiny_llama, tmp_path):
    roomy = bank_for(tiny_llama, tmp_path / "roomy")
    roomy.precompute()
    messages = []
    cramped = bank_for(load_model("tiny-llama"), tmp_path / "cramped", budget=20000, log=messages.append)
    cramped.precompute()
    assert cramped.store.evicted > 0 and any("evicted" in m for m in messages)
    for index, level in itertools.product(range(len(roomy.views)), roomy.space.levels):
        assert roomy.masks_of(index, level).keys() == cramped.masks_of(index, level).keys()
        for name, mask in roomy.masks_of(index, level).items():
            assert torch.equal(mask, cramped.masks_of(index, level)[name])


def test_sparsegpt_variants_keep_their_updated_weights(tiny_llama, tmp_path):
    bank = bank_for(tiny_llama, tmp_path, method="sparsegpt")
    bank.apply([0.5, 0.3])
    reference = load_model("tiny-llama")
    prune(reference, method="sparsegpt", sparsity=0.5, calibration=calibration(), progress=False, order="block")
    view = next(iter(bank.views[0].values()))
    assert (view.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    changed = (view.weight != 0) & (view.weight != bank.dense[view.name])
    assert changed.any()  # SparseGPT's compensation, not only a mask


def test_nm_family_levels_give_valid_groups_and_refuse_other_levels(tiny_llama, tmp_path):
    bank = bank_for(tiny_llama, tmp_path, pattern="nm:4", levels="0.25,0.5,0.75")
    bank.apply([0.5, 0.75])
    for index, n in ((0, 2), (1, 1)):
        for view in bank.views[index].values():
            assert is_valid_nm(view.weight != 0, n, 4)
    with pytest.raises(SearchError, match="not an N:4 pattern"):
        bank_for(load_model("tiny-llama"), tmp_path / "x", pattern="nm:4", levels="0.3,0.5")
    with pytest.raises(SearchError, match="fixes the sparsity"):
        bank_for(load_model("tiny-llama"), tmp_path / "y", pattern="2:4", levels="0.3,0.5")


def test_dense_allocation_has_zero_divergence_and_zero_local_error(tiny_llama, tmp_path):
    bank = bank_for(tiny_llama, tmp_path)
    meter = QualityMeter(bank, {"w4": calibration(4)}, calibration(4), 2)
    assert meter.kl([0.0, 0.0], "w4") == pytest.approx(0.0, abs=1e-6)
    assert meter.local_error(0, [0.0]) == 0.0
    assert meter.kl([0.8, 0.8], "w4") > meter.kl([0.2, 0.2], "w4") > 0
    assert meter.local_error(1, [0.8]) > meter.local_error(1, [0.2]) > 0


# ---- algorithms ---------------------------------------------------------------------------------------------------
@given(st.lists(st.integers(0, 6), min_size=2, max_size=10), st.integers(0, 1000))
@settings(max_examples=100, deadline=None)
def test_level_switch_keeps_the_budget(genome, seed):
    space = SearchSpace(parse_levels(LEVELS), (32,) * len(genome))
    child = level_switch(tuple(genome), space, np.random.default_rng(seed))
    if child is not None:
        assert space.average_sparsity(child) == pytest.approx(space.average_sparsity(tuple(genome)), abs=1e-12)
        assert all(0 <= g < space.num_levels for g in child)


@given(st.lists(st.dictionaries(st.integers(0, 6), st.floats(0, 1), min_size=1, max_size=4), min_size=1,
                max_size=3), st.floats(0.2, 0.8))
@settings(max_examples=60, deadline=None)
def test_combination_is_the_cheapest_that_reaches_the_target(options, target):
    """The DP against brute force: one single-block group per list, options = (level, impairment)."""
    space = SearchSpace(parse_levels(LEVELS), (10,) * len(options))
    fronts = [[{"genome": (level,), "impairment": cost} for level, cost in group.items()] for group in options]
    chosen = combine(space, split_groups(len(options), len(options)), fronts, [target])
    feasible = [c for c in itertools.product(*fronts) if space.average_sparsity([p["genome"][0] for p in c]) >=
                target - 0.05 / len(options)]
    feasible = [c for c in feasible if sum(10 * space.levels[p["genome"][0]] for p in c) >= target * 10 *
                len(options) - 0.5]
    if not feasible:
        assert chosen == []
        return
    best = min(sum(p["impairment"] for p in c) for c in feasible)
    cost = sum(next(p["impairment"] for p in f if p["genome"] == (g,)) for f, g in zip(fronts, chosen[0]))
    assert cost == pytest.approx(best)


def test_groups_cover_all_blocks_in_order():
    assert [list(r) for r in split_groups(7, 3)] == [[0, 1], [2, 3, 4], [5, 6]]
    assert split_groups(2, 5) == [range(0, 1), range(1, 2)]


@pytest.mark.parametrize("algorithm", ["nsga2", "evopress", "decompose"])
def test_each_search_is_deterministic_and_its_front_is_non_dominated(tiny_llama, tmp_path, algorithm):
    first, _, _ = run_search(tiny_llama, small(algorithm, tmp_path), calibration(), 8, 32, progress=False)
    second, _, _ = run_search(tiny_llama, small(algorithm, tmp_path), calibration(), 8, 32, progress=False)
    assert first["front"] == second["front"]
    assert non_dominated(first["front"]) == sorted(first["front"], key=lambda p: (p["density"], p["kl"]))
    assert first["owl"]["average_sparsity"] == pytest.approx(0.5, abs=1e-6)
    if algorithm == "evopress":  # on budget, and never worse than the start (elitist)
        assert first["front"][0]["average_sparsity"] == pytest.approx(0.5)
        uniform = next(p for p in first["uniform"] if p["average_sparsity"] == pytest.approx(0.5))
        assert first["front"][0]["kl"] <= uniform["kl"]
    if algorithm == "nsga2":  # the uniform allocations are in the first population: the front is never worse
        for point in first["uniform"]:
            assert any(p["density"] <= point["density"] + 1e-12 and p["kl"] <= point["kl"] for p in first["front"])
    if algorithm == "decompose":
        assert first["evaluations"]["by_kind"]["local"] > 0
        assert all(len(group["points"]) <= 3 for group in first["groups"])


def test_search_commits_the_picked_point_as_masks(tiny_llama, tmp_path):
    result = search(tiny_llama, small("nsga2", tmp_path), pick=0.6, calibration=calibration(), nsamples=8, seqlen=32,
                    progress=False)
    picked = result["picked"]
    assert picked["average_sparsity"] >= 0.6 - 1e-6
    for index, sparsity in enumerate(picked["sparsities"]):
        for view in tiny_llama.adapter.block_linears(index).values():
            mask = tiny_llama.masks[view.name]
            assert (~mask).float().mean().item() == pytest.approx(sparsity, abs=0.02)
            assert (view.weight[~mask] == 0).all()
    assert tiny_llama.history[-1]["stage"] == "search"


def test_search_refuses_bad_requests(tiny_llama, tmp_path):
    with pytest.raises(SearchError, match="no point of the front reaches"):
        search(load_model("tiny-llama"), small("evopress", tmp_path, target=0.3), pick=0.7,
               calibration=calibration(), nsamples=8, seqlen=32, progress=False)
    with pytest.raises(SearchError, match="outside the level range"):
        search(tiny_llama, small("nsga2", tmp_path, target=None), pick=0.95, calibration=calibration(), progress=False)
    with pytest.raises(SearchError, match="give a target"):
        small("evopress", tmp_path, target=None).check()
    with pytest.raises(SearchError, match="unknown search algorithm"):
        small("random", tmp_path).check()
    prune(tiny_llama, method="magnitude", sparsity=0.5, progress=False)
    with pytest.raises(SearchError, match="already pruned"):
        run_search(tiny_llama, small("nsga2", tmp_path), calibration(), progress=False)


def test_rerun_replays_the_memo_and_tolerates_a_truncated_line(tiny_llama, tmp_path):
    config = small("nsga2", tmp_path, reuse=True)
    first, _, meter = run_search(tiny_llama, config, calibration(), 8, 32, progress=False)
    memo = next((meter.bank.directory / "evaluations").glob("nsga2-*.jsonl"))
    lines = memo.read_text().splitlines()
    memo.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])  # interrupted while writing the last line
    calls = []

    class Counting(SerialBackend):
        def map(self, requests):
            calls.extend(requests)
            return super().map(requests)

    evaluations = Evaluations(Counting(meter), memo)
    assert len(evaluations.memo) == len(lines) - 1
    key = json.loads(lines[0])["key"]
    kind, where, values = key.split("|")
    request = Request(kind, where, tuple(float(v) for v in values.split(",")))
    assert evaluations([request]) == [json.loads(lines[0])["value"]] and not calls
    second, _, _ = run_search(tiny_llama, config, calibration(), 8, 32, progress=False)
    assert second["front"] == first["front"]


# ---- Ray ----------------------------------------------------------------------------------------------------------
def test_ray_with_two_workers_gives_the_serial_front(tiny_llama, tmp_path):
    serial, _, _ = run_search(tiny_llama, small("nsga2", tmp_path), calibration(), 8, 32, progress=False)
    distributed, _, _ = run_search(tiny_llama, small("nsga2", tmp_path, workers=2), calibration(), 8, 32,
                                   progress=False)
    assert distributed["workers"] == 2
    assert distributed["front"] == serial["front"] and distributed["uniform"] == serial["uniform"]
    assert distributed["owl"] == serial["owl"]


def test_unreachable_ray_address_fails_fast(tiny_llama, tmp_path):
    """A closed port, and a port that accepts connections but never speaks Ray: both a one-line error, quickly."""
    import ray

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        free_port = closed.getsockname()[1]
    started = time.perf_counter()
    with pytest.raises(SearchError, match=f"cannot reach the Ray cluster at 127.0.0.1:{free_port}"):
        run_search(tiny_llama, small("nsga2", tmp_path, workers=2, ray_address=f"127.0.0.1:{free_port}",
                                     ray_timeout=1.0), calibration(), progress=False)
    assert time.perf_counter() - started < 5
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.perf_counter()
        with pytest.raises(SearchError, match=f"cannot reach the Ray cluster at {address}"):
            _connect(ray, address, 2.0)  # the connection step alone: no model to ship
        assert time.perf_counter() - started < 10
    with pytest.raises(SearchError, match="must look like host:port"):
        run_search(tiny_llama, small("nsga2", tmp_path, workers=2, ray_address="nowhere"), calibration(),
                   progress=False)
    with pytest.raises(SearchError, match="needs --workers"):
        small("nsga2", tmp_path, ray_address="127.0.0.1:6379").check()


# ---- command line and recipes -----------------------------------------------------------------------------------
def test_cli_search_writes_the_front_and_exports_the_pick(capsys, monkeypatch, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, monkeypatch, "search", "tiny-llama", "--pick", "0.6", "--levels", LEVELS,
                                "--search-windows", "2", "--search-seqlen", "32", "--population", "6", "--generations", "2",
                                "--nsamples", "4", "--seqlen", "64", "--eval-windows", "2",
                                "--cache-dir", tmp_path / "cache", "--out", out)
    assert code == 0, err
    assert {"report.json", "report.md", "search_front.png", "model"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    stage = report["stages"][0]
    assert stage["stage"] == "search" and stage["picked"]["average_sparsity"] >= 0.6 - 1e-6
    assert all(len(p["sparsities"]) == 2 for p in stage["front"])  # each point's per-block configuration
    assert report["sparsity"]["overall"] == pytest.approx(stage["picked"]["average_sparsity"], abs=0.02)
    assert "front: KL to dense" in stdout and "| average sparsity | KL to dense" in (out / "report.md").read_text()
    reloaded = load_model(str(out / "model"))
    assert reloaded.masks or any((v.weight == 0).any() for v in reloaded.adapter.linears())


@pytest.mark.parametrize("args, message", [
    (["--target", "0.95"], "outside the level range"),
    (["--levels", "", "--pick", "0.5"], "search space is empty"),
    (["--pick", "0.5", "--algorithm", "simulated-annealing"], "Input should be 'nsga2', 'evopress' or 'decompose'"),
    (["--pick", "0.5", "--workers", "2", "--ray-address", "127.0.0.1:1", "--ray-timeout", "1"],
     "cannot reach the Ray cluster"),
    (["--pick", "0.5", "--cache-budget", "0"], "cache_budget_gb: Input should be greater than 0"),
    ([], "needs pick"),
])
def test_cli_search_refuses_bad_input(capsys, monkeypatch, tmp_path, args, message):
    code, _, err = run_cli(capsys, monkeypatch, "search", "tiny-llama", "--eval-windows", "2", "--out",
                           tmp_path / "run", "--cache-dir", tmp_path / "cache", *args)
    assert_clean_failure(code, err, message)
    assert not (tmp_path / "run").exists()


def test_recipe_search_stage_must_come_before_pruning(tmp_path):
    from sparseforge.pipeline import run_recipe
    from sparseforge.recipe import parse_recipe

    recipe = parse_recipe({"model": "tiny-llama", "data": {"nsamples": 4, "seqlen": 32},
                           "stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
                                      {"search": {"pick": 0.5, "levels": LEVELS}}]})
    with pytest.raises(SearchError, match="already pruned"):
        run_recipe(recipe, tmp_path / "run")
    with pytest.raises(Exception, match="needs pick"):
        parse_recipe({"model": "tiny-llama", "stages": [{"search": {"levels": LEVELS}}]})
    with pytest.raises(Exception, match="colour"):
        parse_recipe({"model": "tiny-llama", "stages": [{"search": {"pick": 0.5, "colour": "red"}}]})
