"""The run launcher (skip / resume / failures / parallelism / Ctrl-C), results collection and
config-file sweeps, with a fake trainer script instead of real training (each test < ~2 s)."""

import csv
import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from prelar_jax.launch import runner
from prelar_jax.launch import sweep as sweep_lib
from prelar_jax.launch.runner import RunSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in for experiments/finetune.py: takes --key=value flags (so the sweep's
# --config.x=... --workdir=... work too), records every call, its time interval and any signal.
FAKE_TRAINER = textwrap.dedent(r"""
    import json, os, signal, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    workdir, mode = args["workdir"], args.get("mode", "finish")
    os.makedirs(workdir, exist_ok=True)
    def note(name, text):
        with open(os.path.join(workdir, name), "a") as f:
            f.write(text + "\n")
    def summary(finished):
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump({"finished": finished, "env_step": 600 if finished else 300}, f)
    start = time.time()
    note("calls.txt", str(start))
    print("fake trainer starting", mode, flush=True)
    if mode in ("trap", "stubborn"):
        def on_signal(signum, frame):
            note("signals.txt", signal.Signals(signum).name)
            if mode == "trap" and signum == signal.SIGTERM:
                summary(False)  # "saved a checkpoint", stopped before the end
                sys.exit(0)
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        note("ready", "1")
        time.sleep(30)
        sys.exit(0)
    time.sleep(float(args.get("sleep", "0")))
    note("times.txt", f"{start} {time.time()}")
    if mode == "fail":
        print("Traceback: boom, something broke", flush=True)
        sys.exit(3)
    seed = int(args.get("config.seed", "0"))
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        for step in (300, 600):
            f.write(json.dumps({"step": step, "eval/success_rate": seed / 10 + step / 6000,
                                "eval/return": float(step)}) + "\n")
    summary(mode == "finish")
""")


@pytest.fixture
def fake(tmp_path):
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    return str(path)


def _spec(fake: str, root, name: str, mode: str = "finish", sleep: float = 0.0, **labels) -> RunSpec:
    workdir = str(root / name)
    return RunSpec(
        name, [sys.executable, fake, f"--mode={mode}", f"--sleep={sleep}", f"--workdir={workdir}"], workdir, labels
    )


def _calls(spec: RunSpec) -> int:
    path = os.path.join(spec.workdir, "calls.txt")
    return len(open(path).read().split()) if os.path.exists(path) else 0


def _write_summary(workdir, finished: bool) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump({"finished": finished, "env_step": 1}, f)


def test_skips_finished_and_reruns_unfinished(fake, tmp_path):
    done = _spec(fake, tmp_path, "done")
    resumed = _spec(fake, tmp_path, "resumed")  # stopped earlier: summary says not finished
    stops = _spec(fake, tmp_path, "stops", mode="unfinished")  # exits 0 without finishing
    _write_summary(done.workdir, True)
    _write_summary(resumed.workdir, False)
    lines = []
    results = runner.run_all([done, resumed, stops], 2, str(tmp_path / "logs"), echo=lines.append)
    assert [r.status for r in results] == [runner.SKIPPED, runner.FINISHED, runner.UNFINISHED]
    assert [_calls(s) for s in (done, resumed, stops)] == [0, 1, 1]
    assert results[1].returncode == 0 and "fake trainer starting finish" in results[1].log_tail
    assert any("skip" in line and "done" in line for line in lines)
    assert sum(" start " in f" {line} " for line in lines) == 2
    saved = json.load(open(tmp_path / "logs" / "runs.json"))
    assert [r["status"] for r in saved["runs"]] == [r.status for r in results]
    assert saved["counts"] == {runner.SKIPPED: 1, runner.FINISHED: 1, runner.UNFINISHED: 1}

    # Again: the two finished runs are skipped, the unfinished one is started again.
    results = runner.run_all([done, resumed, stops], 2, str(tmp_path / "logs"), echo=lambda _: None)
    assert [r.status for r in results] == [runner.SKIPPED, runner.SKIPPED, runner.UNFINISHED]
    assert [_calls(s) for s in (done, resumed, stops)] == [0, 1, 2]
    log = open(os.path.join(stops.workdir, "run.log")).read()  # appended, one header per attempt
    assert log.count("runner start") == 2 and log.count("fake trainer starting unfinished") == 2


def test_failure_is_recorded_and_the_others_still_run(fake, tmp_path):
    specs = [
        _spec(fake, tmp_path, "fails", mode="fail"),
        RunSpec("missing", [str(tmp_path / "no_such_program")], str(tmp_path / "missing")),
        _spec(fake, tmp_path, "ok1"),
        _spec(fake, tmp_path, "ok2"),
    ]
    results = runner.run_all(specs, 1, str(tmp_path / "logs"), echo=lambda _: None)
    assert [r.status for r in results] == [runner.FAILED, runner.FAILED, runner.FINISHED, runner.FINISHED]
    assert results[0].returncode == 3
    assert results[0].log_tail[-1] == "Traceback: boom, something broke"
    assert results[1].returncode is None and "could not start" in results[1].log_tail[0]
    saved = json.load(open(tmp_path / "logs" / "runs.json"))["runs"]
    assert saved[0]["returncode"] == 3 and "boom" in saved[0]["log_tail"][-1]


def test_max_parallel_is_respected(fake, tmp_path):
    specs = [_spec(fake, tmp_path, f"run{i}", sleep=0.4) for i in range(5)]
    results = runner.run_all(specs, 2, str(tmp_path / "logs"), echo=lambda _: None)
    assert all(r.status == runner.FINISHED for r in results)
    intervals = [tuple(map(float, open(os.path.join(s.workdir, "times.txt")).read().split())) for s in specs]
    # The most intervals covering one moment (checked at every start, where the maximum occurs).
    overlap = max(sum(start <= t < end for start, end in intervals) for t, _ in intervals)
    assert overlap == 2


def test_interrupt_terminates_children_once_then_kills(fake, tmp_path):
    """Ctrl-C to the runner's process group: each running child gets exactly one SIGTERM (not the
    terminal's SIGINT too); one that ignores it is killed after the grace period; waiting runs
    are not started."""
    specs = [
        _spec(fake, tmp_path, "saves", mode="trap"),
        _spec(fake, tmp_path, "stubborn", mode="stubborn"),
        _spec(fake, tmp_path, "waiting"),
    ]
    payload = json.dumps([[s.name, s.command, s.workdir] for s in specs])
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {REPO!r})
        from prelar_jax.launch.runner import RunSpec, run_all
        specs = [RunSpec(*entry) for entry in json.loads(sys.argv[1])]
        run_all(specs, 2, {str(tmp_path / "logs")!r}, grace_seconds=1.0)
    """)
    process = subprocess.Popen(
        [sys.executable, "-c", code, payload],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 15
    while not all(os.path.exists(os.path.join(s.workdir, "ready")) for s in specs[:2]):
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()[0]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    output, _ = process.communicate(timeout=15)
    assert process.returncode == 0, output
    runs = {r["name"]: r for r in json.load(open(tmp_path / "logs" / "runs.json"))["runs"]}
    assert runs["saves"]["status"] == runner.INTERRUPTED and runs["saves"]["returncode"] == 0
    assert runs["stubborn"]["status"] == runner.INTERRUPTED and runs["stubborn"]["returncode"] == -signal.SIGKILL
    assert runs["waiting"]["status"] == runner.NOT_STARTED and _calls(specs[2]) == 0
    for spec in specs[:2]:
        assert open(os.path.join(spec.workdir, "signals.txt")).read().split() == ["SIGTERM"]
    assert "stopping" in output


def test_collect_results_dedups_steps_and_writes_csv(tmp_path):
    first = RunSpec("a", ["true"], str(tmp_path / "a"), {"method": "prelar", "task": "reach", "seed": 1})
    second = RunSpec("b", ["true"], str(tmp_path / "b"))  # no labels: identity from config.json
    unfinished = RunSpec("c", ["true"], str(tmp_path / "c"), {"method": "x", "task": "y", "seed": 0})
    lines = [
        {"step": 0, "model_loss": 1.0},  # not an evaluation line
        {"step": 300, "eval/success_rate": 0.0, "eval/return": 10.0},
        {"step": 600, "eval/success_rate": 0.5, "eval/return": "nan"},
        {"step": 600, "eval/success_rate": 1.0, "eval/return": 30.0},
    ]  # relogged after resume: wins
    for spec in (first, second, unfinished):
        os.makedirs(spec.workdir)
        with open(os.path.join(spec.workdir, "metrics.jsonl"), "w") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 900, "eval/succ')
    _write_summary(first.workdir, True)
    _write_summary(second.workdir, True)
    _write_summary(unfinished.workdir, False)
    with open(os.path.join(second.workdir, "config.json"), "w") as f:
        json.dump({"method": "dreamerv2", "task": "push", "seed": 2}, f)

    rows = runner.collect_results([first, second, unfinished], finished_only=True)
    expected = [
        (m, t, s, step, sr, ret)
        for m, t, s in (("prelar", "reach", 1), ("dreamerv2", "push", 2))
        for step, sr, ret in ((300, 0.0, 10.0), (600, 1.0, 30.0))
    ]
    assert [tuple(row[c] for c in runner.RESULT_COLUMNS) for row in rows] == expected
    assert len(runner.collect_results([first, second, unfinished])) == 6

    lines[-1]["eval/return"] = "nan"  # a non-finite value survives the round trip as nan
    with open(os.path.join(first.workdir, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
    rows = runner.collect_results([first])
    assert math.isnan(rows[1]["return"])
    path = tmp_path / "out" / "results.csv"
    runner.write_results_csv(rows, str(path))
    read = list(csv.DictReader(open(path)))
    assert list(read[0]) == list(runner.RESULT_COLUMNS)
    assert [(r["method"], int(r["seed"]), int(r["step"]), float(r["success_rate"])) for r in read] == [
        ("prelar", 1, 300, 0.0),
        ("prelar", 1, 600, 1.0),
    ]
    assert float(read[0]["return"]) == 10.0 and math.isnan(float(read[1]["return"]))


def test_done_line_counts_each_status_and_says_nothing_to_run_for_no_runs(fake, tmp_path):
    """The closing line lists the count of each status; with zero runs (e.g. a benchmark stage
    whose runs were all dropped) it says so instead of an empty list."""
    runs_json = str(tmp_path / "logs" / "runs.json")
    lines = []
    assert runner.run_all([], 2, str(tmp_path / "logs"), echo=lines.append) == []
    assert lines == [f"[runner] done: nothing to run (status of every run: {runs_json})"]
    saved = json.load(open(runs_json))
    assert saved["runs"] == [] and saved["counts"] == {}

    done, fails = _spec(fake, tmp_path, "done"), _spec(fake, tmp_path, "fails", mode="fail")
    _write_summary(done.workdir, True)
    lines = []
    runner.run_all([done, fails], 1, str(tmp_path / "logs"), echo=lines.append)
    assert lines[-1] == f"[runner] done: 1 {runner.SKIPPED}, 1 {runner.FAILED} (status of every run: {runs_json})"


def test_duplicate_workdirs_and_bad_max_parallel_are_errors(tmp_path):
    spec = RunSpec("a", ["true"], str(tmp_path / "a"))
    with pytest.raises(runner.RunnerError, match="share the workdir"):
        runner.run_all([spec, RunSpec("b", ["true"], str(tmp_path / "a") + "/")], 1, str(tmp_path))
    with pytest.raises(runner.RunnerError, match="max_parallel"):
        runner.run_all([spec], 0, str(tmp_path))


BASE = "configs/prelar_finetune.py:tiny"


def test_sweep_grid_times_list(tmp_path):
    sweep = {
        "base": BASE,
        "fixed": {"task": "reach"},
        "list": [{"intrinsic.beta": 0.0}, {"intrinsic.beta": 1.0, "loss.aux_reward_scale": 0.0}],
        "grid": {"loss.kl_scale": [0.5, 1.0], "seed": [0, 1]},
    }
    specs = sweep_lib.expand(sweep, str(tmp_path / "out"), source="s.py", python="py")
    expected = []
    for entry in ("beta=0.0", "beta=1.0,aux_reward_scale=0.0"):
        for kl in ("0.5", "1.0"):
            for seed in (0, 1):
                expected.append((f"{entry},kl_scale={kl},seed={seed}", f"prelar/{entry},kl_scale={kl}", seed))
    assert [(s.name, s.labels["method"], s.labels["seed"]) for s in specs] == expected
    assert all(s.labels["task"] == "reach" for s in specs)
    spec = specs[3]  # beta=0.0, kl_scale=1.0, seed=1
    assert spec.workdir == os.path.join(str(tmp_path / "out"), spec.name)
    assert spec.command == [
        "py",
        os.path.join(REPO, "experiments", "finetune.py"),
        f"--config={os.path.join(REPO, 'configs', 'prelar_finetune.py')}:tiny",
        "--config.task=reach",
        "--config.intrinsic.beta=0.0",
        "--config.loss.kl_scale=1.0",
        "--config.seed=1",
        f"--workdir={spec.workdir}",
    ]
    # Deterministic: the same sweep gives the same runs.
    assert sweep_lib.expand(sweep, str(tmp_path / "out"), source="s.py", python="py") == specs


def test_sweep_names_use_full_keys_where_short_ones_clash(tmp_path):
    sweep = {"base": BASE, "grid": {"intrinsic.capacity": [64], "replay.capacity": [1000, 2000], "seed": [0]}}
    names = [s.name for s in sweep_lib.expand(sweep, str(tmp_path))]
    assert names == [
        "intrinsic.capacity=64,replay.capacity=1000,seed=0",
        "intrinsic.capacity=64,replay.capacity=2000,seed=0",
    ]
    assert sweep_lib.expand({"base": BASE, "list": [{}]}, str(tmp_path))[0].name == "base"


@pytest.mark.parametrize(
    "sweep, message",
    [
        ({"base": BASE, "grid": {"loss.kl_scal": [0.5]}}, "'loss.kl_scal'"),
        ({"base": BASE, "list": [{"seed": 0}, {"optimizer.lrr": 1.0}]}, "'optimizer.lrr'"),
        ({"base": BASE, "grid": {"loss.kl_scale": ["big"]}}, "'loss.kl_scale'"),  # wrong type
        ({"base": BASE, "grid": {"loss": [1.0]}}, "'loss' is a group of keys"),
        ({"base": BASE, "grid": {"seed": [0]}, "list": [{"seed": 1}]}, "not both"),
        ({"base": BASE, "grid": {"seed": []}}, "non-empty list"),
        ({"base": BASE}, "'grid'"),
        ({"base": BASE, "grdi": {}}, "grdi"),
    ],
)
def test_sweep_errors_name_the_file_and_key(sweep, message, tmp_path):
    with pytest.raises(sweep_lib.SweepError) as info:
        sweep_lib.expand(sweep, str(tmp_path), source="configs/sweeps/mine.py")
    assert "configs/sweeps/mine.py" in str(info.value) and message in str(info.value)


def _sweep_cli():
    spec = importlib.util.spec_from_file_location("_sweep_cli", os.path.join(REPO, "experiments", "sweep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_print_lines_parse_back_to_the_argv(tmp_path, capsys):
    out = tmp_path / "runs with space"
    assert _sweep_cli().main(["--sweep=configs/sweeps/example.py", f"--out={out}", "--print"]) == 0
    lines = capsys.readouterr().out.splitlines()
    config = f"--config={os.path.join(REPO, 'configs', 'prelar_finetune.py')}:tiny"
    expected = []
    for kl in ("0.5", "1.0"):
        for ent in ("0.0001", "0.001"):
            for seed in ("0", "1"):
                name = f"kl_scale={kl},actor_ent={ent},seed={seed}"
                expected.append(
                    [
                        sys.executable,
                        os.path.join(REPO, "experiments", "finetune.py"),
                        config,
                        "--config.task=drawer-open",
                        f"--config.loss.kl_scale={kl}",
                        f"--config.actor_critic.actor_ent={ent}",
                        f"--config.seed={seed}",
                        f"--workdir={out / name}",
                    ]
                )
    assert [shlex.split(line) for line in lines] == expected
    assert not out.exists()  # printing runs nothing


def test_sweep_cli_runs_and_writes_results(fake, tmp_path):
    sweep_file = tmp_path / "sweep.py"
    sweep_file.write_text(
        f"def get_sweep():\n    return {{'base': {BASE!r}, 'script': {fake!r}, 'grid': {{'seed': [0, 1]}}}}\n"
    )
    out = tmp_path / "out"
    assert _sweep_cli().main([f"--sweep={sweep_file}", f"--out={out}", "--max_parallel=2"]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["method"], r["seed"], r["step"]) for r in rows] == [
        ("prelar", "0", "300"),
        ("prelar", "0", "600"),
        ("prelar", "1", "300"),
        ("prelar", "1", "600"),
    ]
    assert float(rows[3]["success_rate"]) == pytest.approx(1 / 10 + 600 / 6000)  # the fake saw --config.seed=1
    assert json.load(open(out / "runs.json"))["counts"] == {runner.FINISHED: 2}


@pytest.mark.slow
def test_sweep_cli_bad_file_is_one_line_exit_2(tmp_path):
    sweep_file = tmp_path / "bad.py"
    sweep_file.write_text(f"def get_sweep():\n    return {{'base': {BASE!r}, 'grid': {{'loss.kl_scal': [1.0]}}}}\n")
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "experiments", "sweep.py"),
            f"--sweep={sweep_file}",
            f"--out={tmp_path / 'out'}",
            "--print",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and str(sweep_file) in result.stderr and "'loss.kl_scal'" in result.stderr


@pytest.mark.skipif(not os.path.exists("/proc/self/autogroup"), reason="no scheduler autogroups here")
def test_a_niced_runner_gives_its_runs_session_level_niceness():
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert runner.inherit_niceness(child.pid, 0) is False  # not niced: nothing to pass on
        assert runner.inherit_niceness(child.pid, 7) is True
        with open(f"/proc/{child.pid}/autogroup") as handle:
            assert handle.read().split()[-1] == "7"
    finally:
        child.kill()
        child.wait()
