"""Self-tuning: the chooser picks the known best arm on synthetic cost and acceptance curves, counts compile time
against the job, explores by its prior and keeps by measurement; the cost curve is cached by key, reused and rebuilt
when damaged; every arm a tuned job runs gives greedy's tokens, and every record says what ran and who chose it."""
import importlib.util
import json
import logging
import sys

import pytest
import torch

from lp.auto_tune import (COMPILED_ACCELERATOR, COMPILED_CPU, MAX_ARMS, REFERENCE, TRIAL_TOKENS, Arm, AutoDecoder,
                           Chooser, batch_menu, menu)
from lp.cli import main
from lp.config import LookaheadConfig
from lp.decoding import GenerationResult
from lp.distributed.team import SoloTeam
from lp.greedy_rules import hf_greedy
from lp import step_cost
from lp.step_cost import CostCurve, CostStore, cost_key, step_costs
from models import tiny_model
from test_cli import RUN, json_lines, run, save_tiny_model

BASE = LookaheadConfig()
WIDE = [arm for arm in REFERENCE if arm.name in ("reference 5,4,5", "reference 7,5,7", "reference 15,5,15")]
SIZES = (1, 4, 16, 32, 64, 128)


def curve(seconds) -> CostCurve:
    """A cost curve with seconds(t) at the measured sizes."""
    return CostCurve({t: seconds(t) for t in SIZES})


def ran(tokens: int, steps: int, seconds: float, fed: int = 10, compile_s: float = 0.0) -> GenerationResult:
    """A generation's figures as the decoder reports them."""
    return GenerationResult([5] * tokens, steps, [], seconds, 4, "max_new_tokens", tokens_fed_per_step=[fed] * steps,
                            compile_time_s=compile_s)


def test_a_flat_cost_curve_picks_the_widest_arm():
    """A host-bound step (a GPU's eager forward) costs the same whatever it feeds: the widest tree wins."""
    chooser = Chooser(REFERENCE, curve(lambda t: 0.02), BASE, "cuda", compile_s=60)
    assert chooser.choose(10_000).name == "reference 15,5,15"


def test_a_cost_that_grows_with_every_token_fed_picks_the_narrowest_arm():
    chooser = Chooser(REFERENCE, curve(lambda t: 1e-3 * t), BASE, "cpu", compile_s=25)
    assert chooser.choose(10_000).name == "reference 2,3,2"


def test_compiling_is_chosen_only_when_the_job_is_long_enough_to_pay_for_it():
    chooser = Chooser(menu("cpu", None), curve(lambda t: 3e-3 + 5e-5 * t), BASE, "cpu", compile_s=25)
    assert not chooser.choose(1_000).compiled  # 1000 tokens: 2 s eager against 25 s of compiling
    assert chooser.choose(1_000_000).compiled
    assert chooser.compile_s(chooser.choose(1_000_000)) == 25
    chooser.built.append(chooser.choose(1_000_000).name)  # once built, an arm's compile time is spent
    assert chooser.compile_s(chooser.choose(1_000)) == 0 and chooser.choose(1_000).compiled


def test_the_menu_offers_eager_and_compiled_settings_unless_one_is_asked_for():
    assert menu("cuda", None) == REFERENCE + COMPILED_ACCELERATOR
    assert menu("cuda", False) == REFERENCE
    assert menu("cpu", False) == REFERENCE
    assert menu("cpu", True) == COMPILED_CPU
    assert all(arm.compiled for arm in menu("cuda", True))
    assert menu("cpu", None) == REFERENCE + COMPILED_CPU


def test_an_arm_that_disappoints_is_left_and_the_best_measured_one_is_kept():
    chooser = Chooser(WIDE, curve(lambda t: 0.02 + 1e-5 * t), BASE, "cpu", compile_s=25)
    first = chooser.choose(10_000)
    assert first.name == "reference 15,5,15"
    chooser.built.append(first.name)
    chooser.record(first, ran(290, 100, 100 * 0.090))  # an arm's first generation is not timed (it warms up) ...
    assert chooser.step_seconds(first) == pytest.approx(chooser.curve.latency(121 * first.fed_share))
    chooser.record(first, ran(290, 100, 100 * 0.040))  # ... its second is: as many tokens as its prior, twice the time
    assert chooser.step_seconds(first) == pytest.approx(0.040)
    second = chooser.choose(10_000, first.name)
    assert second.name == "reference 7,5,7"  # its prior now beats what 15,5,15 measured
    chooser.built.append(second.name)
    for _ in range(2):
        chooser.record(second, ran(265, 100, 100 * 0.045))
    third = chooser.choose(10_000, second.name)
    assert third.name == "reference 5,4,5"
    chooser.built.append(third.name)
    for _ in range(2):
        chooser.record(third, ran(235, 100, 100 * 0.050))
    assert chooser.choose(10_000, third.name).name == "reference 15,5,15"  # every arm measured: the best one


def test_a_running_arm_keeps_the_job_until_it_has_decoded_its_trial():
    chooser = Chooser(WIDE, curve(lambda t: 1e-3 * t), BASE, "cpu", compile_s=25)
    chooser.built.append("reference 15,5,15")
    chooser.record(chooser.by_name("reference 15,5,15"), ran(TRIAL_TOKENS - 1, 30, 1.0))
    assert chooser.choose(10_000, "reference 15,5,15").name == "reference 15,5,15"
    chooser.record(chooser.by_name("reference 15,5,15"), ran(1, 1, 0.03))
    assert chooser.choose(10_000, "reference 15,5,15").name == "reference 5,4,5"  # the narrowest of the three


def test_no_more_than_three_arms_are_ever_built():
    chooser = Chooser(menu("cpu", None), curve(lambda t: 1e-3 * t), BASE, "cpu", compile_s=25)
    for arm in WIDE:  # three eager arms, all measured slow
        chooser.built.append(arm.name)
        chooser.record(arm, ran(100, 100, 100 * 1.0))
        chooser.record(arm, ran(100, 100, 100 * 1.0))
    assert len(chooser.built) == MAX_ARMS
    best_unbuilt = min((a for a in chooser.arms if a.name not in chooser.built), key=lambda a: chooser.cost(a, 1e9))
    assert chooser.cost(best_unbuilt, 1e9) < min(chooser.cost(a, 1e9) for a in WIDE)  # it would win ...
    assert chooser.choose(1e9).name in chooser.built  # ... but the job already has its three shapes


def test_an_arms_compile_time_is_what_compiling_it_took_in_the_latest_run():
    first = Chooser(COMPILED_CPU, curve(lambda t: 0.01), BASE, "cpu", compile_s=25)
    arm = COMPILED_CPU[1]
    first.record(arm, ran(50, 20, 1.0, compile_s=40.0))  # a cold compiler: the 256-slot cache's step
    first.record(arm, ran(50, 20, 1.0, compile_s=20.0))  # and later the 512-slot one's
    assert first.compile_s(arm) == 60.0  # both sizes count
    later = Chooser(COMPILED_CPU, CostCurve.from_json(first.curve.to_json()), BASE, "cpu", compile_s=25)
    later.record(arm, ran(50, 20, 1.0, compile_s=6.0))  # the compiler's cache on disk made it quick
    assert later.compile_s(arm) == 6.0 and later.curve.observed[arm.name]["compile_s"] == 6.0


def test_the_jobs_predictability_scales_the_priors_of_arms_not_yet_run():
    chooser = Chooser(REFERENCE, curve(lambda t: 0.01), BASE, "cpu", compile_s=25)
    arm = chooser.by_name("reference 15,5,15")
    chooser.record(arm, ran(100 + int(0.5 * (arm.tokens_per_step - 1) * 100), 100, 1.0))  # half the prior's gain
    other = chooser.by_name("reference 5,4,5")
    assert chooser.tokens_per_step(other) == pytest.approx(1 + 0.5 * (other.tokens_per_step - 1), rel=0.02)


def ran_steps(accepted: list[int], seconds: float = 1.0) -> GenerationResult:
    """A generation whose steps accepted these many tokens each (the bonus token included)."""
    return GenerationResult([5] * sum(accepted), len(accepted), accepted, seconds, 4, "max_new_tokens",
                            tokens_fed_per_step=[10] * len(accepted))


def test_a_job_whose_candidates_stay_right_once_right_rates_deeper_arms_above_their_priors():
    """(2,3,2) accepts a first candidate token in half its steps, and every one of those goes on to the second, the
    deepest it can: deeper arms are then expected to go on too. Where a second token never follows, they are not."""
    arm, deep = "reference 2,3,2", "reference 7,5,7"
    sticky = Chooser(REFERENCE, curve(lambda t: 0.01), BASE, "cpu", compile_s=25)
    sticky.record(sticky.by_name(arm), ran_steps([1, 3] * 200))
    stops = Chooser(REFERENCE, curve(lambda t: 0.01), BASE, "cpu", compile_s=25)
    stops.record(stops.by_name(arm), ran_steps([1, 2] * 200))
    scaled = 1 + (sticky.by_name(deep).tokens_per_step - 1) * sticky.predictability()  # what the priors alone say
    assert sticky.by_depth(sticky.by_name(deep)) > scaled * 1.1
    wider = stops.by_name(deep).first_chance(BASE, "cpu") / stops.by_name(arm).first_chance(BASE, "cpu")
    assert stops.by_depth(stops.by_name(deep)) - 1 == pytest.approx(0.5 * wider, rel=0.05)  # its first token alone


def test_a_depth_counts_only_the_steps_of_arms_that_reach_it():
    """(2,3,2) cannot accept a third candidate token: its steps that stopped at two are not misses at depth 3. A deeper
    arm's steps are: where (5,4,5) also ran and never went past two, depth 3 is rated low."""
    shallow = Chooser(REFERENCE, curve(lambda t: 0.01), BASE, "cpu", compile_s=25)
    shallow.record(shallow.by_name("reference 2,3,2"), ran_steps([3] * 400))
    both = Chooser(REFERENCE, curve(lambda t: 0.01), BASE, "cpu", compile_s=25)
    both.record(both.by_name("reference 2,3,2"), ran_steps([3] * 400))
    both.record(both.by_name("reference 5,4,5"), ran_steps([3] * 400))
    deep = "reference 7,5,7"
    assert shallow.by_depth(shallow.by_name(deep)) > both.by_depth(both.by_name(deep)) + 1.0


def test_arms_of_another_family_leave_the_depth_model_to_the_priors():
    """A compiled arm's candidates (prompt lookup, 10 tokens deep) say nothing of how the reference pool's go on."""
    chooser = Chooser(menu("cpu", None), curve(lambda t: 0.01), BASE, "cpu", compile_s=25)
    lookup = chooser.by_name("compiled 1,2,0 lookup 1x10")
    chooser.record(lookup, ran_steps([11, 1] * 100))
    assert chooser.by_depth(chooser.by_name("reference 7,5,7")) is None
    assert chooser.by_depth(lookup) > 5  # its own family: what it ran
    assert {arm.family() for arm in REFERENCE} == {"reference"} and lookup.family() != COMPILED_CPU[1].family()


def test_what_a_run_observes_replaces_the_curves_guess_for_the_next_run(tmp_path):
    first = Chooser(REFERENCE, curve(lambda t: 0.01), BASE, "cpu", compile_s=25)
    arm = first.by_name("reference 7,5,7")
    first.record(arm, ran(300, 100, 100 * 0.050, fed=40))
    first.record(arm, ran(300, 100, 100 * 0.033, fed=40))
    again = Chooser(REFERENCE, CostCurve.from_json(json.loads(json.dumps(first.curve.to_json()))), BASE, "cpu", 25)
    assert again.step_seconds(arm) == pytest.approx(0.033)
    assert again.curve.observed[arm.name]["fed"] == 40


# -- the cost curve on disk ------------------------------------------------------------------------------------


def test_the_cost_curve_is_measured_once_then_reused_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(step_cost, "SLOW_CALL_S", float("inf"))  # every size, however slow this machine is now
    store = CostStore(tmp_path / "costs.json")
    model = tiny_model()
    key, measured = step_costs(model, store)
    assert sorted(measured.points) == list(SIZES) and all(s > 0 for s in measured.points.values())
    assert list(measured.points.values()) == sorted(measured.points.values())  # more tokens never cost less
    saved = json.loads(store.path.read_text())[key]
    assert saved["dtype"] == "torch.float64" and "device" in saved and "measured" in saved
    again_key, again = step_costs(model, store)
    assert again_key == key and again.points == measured.points  # a new measurement would time differently


def test_a_size_whose_first_call_is_slow_is_the_last_one_measured_and_the_curve_goes_on_linearly(monkeypatch):
    monkeypatch.setattr(step_cost, "SLOW_CALL_S", 0.0)  # every call counts as slow: a large model on a CPU ...
    monkeypatch.setattr(step_cost, "TOO_SLOW_S", 0.0)  # ... and slower than a second
    curve = CostCurve(step_cost.measure(tiny_model()))
    assert sorted(curve.points) == [1, 4]  # the smallest size always, then the first slow one, no more
    slope = (curve.points[4] - curve.points[1]) / 3
    assert curve.latency(64) == pytest.approx(curve.points[4] + 60 * slope)


def test_slow_calls_under_a_second_still_give_the_curve_three_sizes(monkeypatch):
    """SmolLM2-135M on this CPU: a forward takes 0.06-0.2 s; its slope is not left to two points, one call apart."""
    monkeypatch.setattr(step_cost, "SLOW_CALL_S", 0.0)
    assert sorted(step_cost.measure(tiny_model())) == [1, 4, 16]


def test_the_cache_is_keyed_by_model_config_and_dtype():
    cpu = torch.device("cpu")
    model = tiny_model()
    assert cost_key(model, cpu, torch.float64) == cost_key(tiny_model(seed=1), cpu, torch.float64)  # weights: no
    assert cost_key(model, cpu, torch.float64) != cost_key(model, cpu, torch.float32)
    assert cost_key(model, cpu, torch.float64) != cost_key(tiny_model(num_hidden_layers=3), cpu, torch.float64)


def test_a_sharded_models_curve_is_kept_apart_by_its_tensor_parallel_ranks():
    cpu = torch.device("cpu")
    model = tiny_model()
    assert cost_key(model, cpu, torch.float64, shards=1) == cost_key(model, cpu, torch.float64)
    assert cost_key(model, cpu, torch.float64, shards=2) != cost_key(model, cpu, torch.float64)
    assert cost_key(model, cpu, torch.float64, shards=2) != cost_key(model, cpu, torch.float64, shards=4)


class Follower:
    """A rank that is not its group's leader: each decision it is asked for is the leader's, taken from `decisions`
    in order; `leaders_points` are the leader's curve (lp.distributed.agreement.GroupAgreement's interface)."""

    leader, size = False, 2

    def __init__(self, decisions, leaders_points=None):
        self.decisions, self.leaders_points, self.asked = list(decisions), leaders_points, []

    def first(self, value: int) -> int:
        self.asked.append(int(value))
        return self.decisions.pop(0)

    def first_floats(self, values):
        return list(self.leaders_points if self.leaders_points is not None else values)


def counted_forwards(model) -> list:
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_a_follower_takes_its_leaders_cached_curve_without_measuring_or_writing(tmp_path):
    """Ranks that shard one forward must run the same forwards: the leader found a curve, so nobody measures."""
    store = CostStore(tmp_path / "costs.json")  # this rank has none
    model = tiny_model()
    forwards = counted_forwards(model)
    leaders = [0.001 * (i + 1) for i in range(len(SIZES))]
    _, curve = step_costs(model, store, agree=Follower([1], leaders), shards=2)
    assert curve.points == dict(zip(SIZES, leaders)) and not forwards and not store.path.exists()


def test_a_follower_measures_as_many_calls_as_its_leaders_clock_allows(tmp_path, monkeypatch):
    """The leader says: no cache, no size is slow, and the time is up at the first call it may stop at (the 4th);
    so each size gets one warm-up and three timed calls, however fast this rank is."""
    monkeypatch.setattr(step_cost, "BUDGET_S", float("inf"))  # this rank's own clock would allow every call
    model = tiny_model()
    forwards = counted_forwards(model)
    follower = Follower([0] + [0] * len(SIZES) + [1])
    _, curve = step_costs(model, CostStore(tmp_path / "costs.json"), agree=follower, shards=2)
    assert len(forwards) == len(SIZES) * (1 + 3) and not follower.decisions
    assert sorted(curve.points) == list(SIZES) and not (tmp_path / "costs.json").exists()  # the leader writes it


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", '{"KEY": {"points": {"1": -5}}}'])
def test_a_damaged_cache_is_measured_again_with_one_log_line(tmp_path, caplog, damage):
    store = CostStore(tmp_path / "costs.json")
    model = tiny_model()
    key = cost_key(model, torch.device("cpu"), torch.float64)
    store.path.write_text(damage.replace("KEY", key))
    with caplog.at_level(logging.WARNING, logger="lp"):
        _, measured = step_costs(model, store)
    assert [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()] and len(caplog.records) == 1
    assert all(s > 0 for s in measured.points.values())
    assert json.loads(store.path.read_text())[key]["points"]  # rewritten whole


def test_measuring_again_keeps_what_runs_observed(tmp_path):
    store = CostStore(tmp_path / "costs.json")
    model = tiny_model()
    key, measured = step_costs(model, store)
    measured.observed["reference 7,5,7"] = {"step_s": 0.5, "fed": 40}
    store.write(key, measured)
    _, again = step_costs(model, store, refresh=True)
    assert again.observed == {"reference 7,5,7": {"step_s": 0.5, "fed": 40}}


# -- a tuned job -----------------------------------------------------------------------------------------------


def test_every_arm_a_tuned_job_switches_to_gives_greedys_tokens(tmp_path):
    """An AutoDecoder made to take another arm every record (the arms not running learn each record's text)."""
    model = tiny_model()
    arms = [Arm("a", dict(window=2, ngram=3, guess=2, compile=False), 2.0, 0.7),
            Arm("b", dict(window=4, ngram=4, guess=4, compile=False), 2.0, 0.7),
            Arm("c", dict(window=3, ngram=2, guess=1, compile=False), 2.0, 0.7)]
    auto = AutoDecoder(model, job_tokens=6 * 20, store=CostStore(tmp_path / "costs.json"), arms=arms)
    turn = iter(arms * 2)
    auto.chooser.choose = lambda tokens_left, current=None: next(turn)
    for n in range(6):
        prompt = [(7 * n + 3 * i) % 90 + 3 for i in range(6)] * 2
        result = auto.generate(prompt, 20)
        assert result.token_ids == hf_greedy(model, prompt, 20)
        assert auto.settings()["arm"] == arms[n % 3].name and auto.settings()["chosen_by"] == "auto"
    assert sorted(auto.decoders) == ["a", "b", "c"]
    assert set(CostStore(tmp_path / "costs.json").read()[auto.key]["observed"]) == {"a", "b", "c"}


def test_a_budget_past_the_context_counts_only_the_room_the_prompt_leaves(tmp_path):
    """A record's max_new_tokens of 10**30 is decoded to the context: the tuner must not expect (and compile for)
    10**30 tokens."""
    model = tiny_model()
    auto = AutoDecoder(model, store=CostStore(tmp_path / "costs.json"), arms=REFERENCE[:1])
    asked, choose = [], auto.chooser.choose
    auto.chooser.choose = lambda tokens_left, current=None: asked.append(tokens_left) or choose(tokens_left, current)
    prompt = [5, 6, 7, 8]
    result = auto.generate(prompt, 10**30)
    room = model.config.max_position_embeddings - len(prompt)
    assert asked == [room] and result.new_tokens <= room
    auto.generate(torch.tensor([prompt]), 10**30)  # a [1, T] tensor holds T tokens, not one
    assert asked == [room, room]


def test_a_team_runs_the_arm_rank_0_picked_whatever_this_ranks_chooser_says(tmp_path):
    class RankZeroSaysLast(SoloTeam):
        def pick(self, value: int) -> int:
            self.asked = value
            return 2

    model = tiny_model()
    team = RankZeroSaysLast()
    store = CostStore(tmp_path / "costs.json")
    store.write(cost_key(model, torch.device("cpu"), torch.float64), curve(lambda t: 1e-3 * t))  # every token costs
    auto = AutoDecoder(model, job_tokens=40, store=store, arms=WIDE, team=team)
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    assert auto.generate(prompt, 20).token_ids == hf_greedy(model, prompt, 20)
    assert team.asked == 0  # this rank would have run the narrowest arm on this cost curve ...
    assert auto.settings()["arm"] == WIDE[2].name  # ... but runs rank 0's
    assert auto.decoder.team is team


def test_a_teams_menu_leaves_out_windows_narrower_than_the_team():
    assert [arm.name for arm in menu("cpu", None, ranks=2)] == [a.name for a in REFERENCE + COMPILED_CPU[1:]]
    assert [arm.name for arm in menu("cpu", None, ranks=3)] == [a.name for a in REFERENCE[1:] + COMPILED_CPU[1:]]
    assert [arm.name for arm in menu("cpu", None, ranks=6)] == ["reference 7,5,7", "reference 15,5,15",
                                                                "compiled 7,5,7 budget 14", "compiled 15,5,15 budget 30"]


def test_a_team_splits_the_fed_tokens_and_keeps_its_figures_apart(tmp_path):
    alone = Chooser(REFERENCE, curve(lambda t: 1e-3 * t), BASE, "cpu", compile_s=25)
    team = Chooser(REFERENCE, curve(lambda t: 1e-3 * t), BASE, "cpu", compile_s=25, ranks=2)
    arm = team.by_name("reference 15,5,15")
    assert team.step_seconds(arm) == pytest.approx(1e-3 * (1 + 120 / 2) * arm.fed_share)
    assert alone.step_seconds(arm) == pytest.approx(1e-3 * (1 + 120) * arm.fed_share)
    team.record(arm, ran(300, 100, 3.0))
    team.record(arm, ran(300, 100, 3.0))
    assert set(team.curve.observed) == {"reference 15,5,15 x2 ranks"}


@pytest.mark.slow
def test_a_compiled_arm_of_a_tuned_job_gives_greedys_tokens(tmp_path):
    model = tiny_model().float()
    auto = AutoDecoder(model, job_tokens=3 * 24, store=CostStore(tmp_path / "costs.json"), arms=COMPILED_CPU[:1])
    for n in range(3):
        prompt = [(5 * n + 2 * i) % 90 + 3 for i in range(8)] * 2
        assert auto.generate(prompt, 24).token_ids == hf_greedy(model, prompt, 24)
    assert auto.settings()["compiled"] is True and auto.settings()["engine"] == "fast"
    assert CostStore(tmp_path / "costs.json").read()[auto.key]["observed"][COMPILED_CPU[0].name]["compile_s"] > 0


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny_model")))


def test_with_no_shape_given_the_command_line_tunes_and_every_record_says_so(tiny_dir, capsys):
    args = ["--model", tiny_dir, "--dtype", "float64", "--max-new-tokens", "12", "--prompt", "abcabc", "--prompt",
            "xyzxyz", "--json", "--compare-greedy"]
    assert main(args) == 0
    captured = capsys.readouterr()
    records = json_lines(captured.out)
    assert [r["greedy_match"] for r in records] == [True, True]
    for r in records:
        assert r["lookahead"]["chosen_by"] == "auto" and r["lookahead"]["arm"] in {a.name for a in REFERENCE}
        assert r["lookahead"]["compiled"] is False  # 24 tokens: compiling would never pay
    summary = json.loads(captured.err.strip().splitlines()[-1])["summary"]
    assert summary["lookahead"]["chosen_by"] == "auto"


def test_verbose_says_why_the_tuner_chose(tiny_dir, capsys):
    assert main(["--model", tiny_dir, "--dtype", "float64", "--max-new-tokens", "8", "--prompt", "abc",
                 "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "self-tuning, 8 tokens to go: reference " in err and "tokens/step at " in err and " ms/step" in err


def test_explicit_settings_win_and_records_say_the_user_chose(tiny_dir, capsys):
    assert main(["--model", tiny_dir, "--dtype", "float64", "--max-new-tokens", "8", "--prompt", "abc", "--json",
                 "--ngram", "3"]) == 0
    [record] = json_lines(capsys.readouterr().out)
    assert record["lookahead"]["chosen_by"] == "user" and record["lookahead"]["ngram"] == 3
    assert "arm" not in record["lookahead"]


def test_auto_tune_off_runs_the_defaults(tiny_dir, capsys):
    assert main(["--model", tiny_dir, "--dtype", "float64", "--max-new-tokens", "8", "--prompt", "abc", "--json",
                 "--no-auto-tune"]) == 0
    [record] = json_lines(capsys.readouterr().out)
    assert record["lookahead"]["chosen_by"] == "default"
    assert (record["lookahead"]["window"], record["lookahead"]["ngram"], record["lookahead"]["guess"]) == (15, 5, 15)


def test_a_batch_tunes_once_for_its_job_says_so_and_gives_the_default_settings_tokens(tiny_dir, capsys):
    prompts = ["--prompt", "abc abc abc", "--prompt", "def def", "--prompt", "gh"]
    args = ["--model", tiny_dir, "--dtype", "float64", "--max-new-tokens", "12", *prompts, "--json", "--batch-size", "2"]
    assert main(args + ["--verbose"]) == 0
    captured = capsys.readouterr()
    tuned = json_lines(captured.out)
    assert {r["lookahead"]["chosen_by"] for r in tuned} == {"auto"}
    assert {r["lookahead"]["arm"] for r in tuned} <= {arm.name for arm in batch_menu("cpu", None)}
    assert "self-tuning a batch of 2, 36 tokens to go: batch " in captured.err  # the figures, with --verbose
    assert main(args + ["--no-auto-tune"]) == 0
    fixed = json_lines(capsys.readouterr().out)
    assert {r["lookahead"]["chosen_by"] for r in fixed} == {"default"}
    assert [r["token_ids"] for r in tuned] == [r["token_ids"] for r in fixed]  # settings change steps, not tokens


def test_a_batch_on_a_cpu_takes_the_setting_that_feeds_least_per_accepted_token():
    """A CPU's forward costs what it feeds, lanes or not: the narrowest setting per accepted token wins."""
    for lanes in (1, 4, 16):
        chooser = Chooser(batch_menu("cpu", False), curve(lambda t: 1e-4 * t), BASE, "cpu", compile_s=0, lanes=lanes)
        assert chooser.choose(10_000).name == "batch eager 1,2,0 lookup 1x10 budget 10"


def test_a_growing_batch_narrows_the_setting_and_then_halves_its_tree():
    """A GPU-like step: flat up to 512 tokens fed, then growing with them. One lane takes the widest setting; 8
    lanes would feed 968 tokens at (15,5,15), so a narrower one wins; 12 lanes take (7,5,7) with half its tree."""
    gpu = CostCurve({t: 0.02 * max(1.0, t / 512) for t in (1, 64, 256, 512, 1024)})
    picks = [Chooser(batch_menu("cuda", True), gpu, BASE, "cuda", compile_s=0, lanes=lanes).choose(1e6).name
             for lanes in (1, 8, 12)]
    assert picks == ["batch compiled 15,5,15 budget 60", "batch compiled 7,5,7 budget 28",
                     "batch compiled 7,5,7 budget 14"]


def test_the_batch_menu_runs_the_fast_paths_step_with_its_tree_and_half_of_it():
    arms = batch_menu("cpu", None)
    assert {arm.compiled for arm in arms} == {True, False} and all(arm.fed_share == 1.0 for arm in arms)
    assert all(arm.config(BASE).fast_path_only for arm in arms)  # eager arms run the fast path's step too
    budgets = sorted(arm.settings["budget"] for arm in arms if arm.name.startswith("batch eager 15,5,15"))
    assert budgets == [15, 30] and batch_menu("cpu", True) == [arm for arm in arms if arm.compiled]
    assert all(arm.settings["window"] >= 4 for arm in batch_menu("cuda", None, ranks=4))


def test_asking_to_tune_and_giving_a_shape_is_one_line_error(tiny_dir, capsys):
    assert main(["--model", tiny_dir, "--prompt", "abc", "--auto-tune", "--window", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("lp: error: auto_tune picks the step's shape itself, but window is given too; drop auto_tune "
                       "or the shape settings (window)")


def test_tune_measures_prints_the_curve_and_exits(tiny_dir, capsys):
    assert main(["--model", tiny_dir, "--dtype", "float64", "--tune"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step cost of one forward on ") and "key " in out[0]
    assert [line.split()[0] for line in out[1:7]] == [str(t) for t in SIZES]
    assert all("tokens fed:" in line and " ms (" in line for line in out[1:7])


@pytest.mark.slow
def test_a_torchrun_team_tunes_as_one_and_matches_greedy(tiny_dir):
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", RUN,
               "--model", tiny_dir, "--dtype", "float64", "--max-new-tokens", "40", "--prompt", "abcabc",
               "--prompt", "xyzxyz", "--prompt", "abcxyz", "--json", "--compare-greedy"])
    assert out.returncode == 0, out.stderr[-2000:]
    records = json_lines(out.stdout)
    assert [r["greedy_match"] for r in records] == [True] * 3
    assert {r["lookahead"]["chosen_by"] for r in records} == {"auto"} and {r["ranks"] for r in records} == {2}


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed "
                    "(pip install 'lp[deepspeed]')")
@pytest.mark.slow
def test_a_replica_sharded_with_tp_tunes_as_one_and_matches_greedy(tiny_dir, tmp_path):
    """Its two ranks time their collective forward together (one curve, kept under the tensor-parallel size) and
    run the setting the replica's first rank picks; then --tune measures the sharded forward again."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", RUN,
               "--model", tiny_dir, "--dtype", "float64", "--tp", "2"]
    out = run(command + ["--max-new-tokens", "24", "--prompt", "abcabc", "--prompt", "xyzxyz", "--json",
                         "--compare-greedy"], timeout=300, LP_CACHE_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    records = json_lines(out.stdout)
    assert [r["greedy_match"] for r in records] == [True] * 2
    assert {r["lookahead"]["chosen_by"] for r in records} == {"auto"}
    [(key, entry)] = json.loads((tmp_path / "step_costs.json").read_text()).items()
    assert entry["tensor_parallel"] == 2 and len(entry["points"]) >= 2 and entry["observed"]
    tuned = run(command + ["--tune"], timeout=300, LP_CACHE_DIR=str(tmp_path))
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    assert tuned.stdout.count("step cost of one forward on ") == 1 and f"key {key}" in tuned.stdout  # rank 0's
    assert list(json.loads((tmp_path / "step_costs.json").read_text())) == [key]  # the sharded curve, not a whole one


def test_a_tuned_job_keeps_its_memory_in_a_file_and_starts_the_next_from_it(tiny_dir, tmp_path, capsys):
    memory = tmp_path / "job.memory"
    args = ["--model", tiny_dir, "--dtype", "float64", "--max-new-tokens", "24", "--prompt", "abcabcabc", "--json",
            "--memory-file", str(memory)]
    assert main(args) == 0
    assert "saved the job's memory to" in capsys.readouterr().err
    assert main(args + ["--compare-greedy"]) == 0  # whatever n-gram size the first job's setting kept
    captured = capsys.readouterr()
    assert "starting from the memory in" in captured.err
    assert [r["greedy_match"] for r in json_lines(captured.out)] == [True]
