"""Sharded runs (pyramidkv/sharding.py): N processes split the samples, each writes its own part files,
the last process (or eval.py) merges them; the result equals a one-process run's, and a killed process
loses nothing. Launcher tests run real 2-process launches on CPU; set PYRAMIDKV_SKIP_LAUNCH_TESTS=1 to
skip them where `accelerate launch` cannot start processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pyramidkv import results_dir, sharding
from pyramidkv.predict import CLIError
from pyramidkv.sharding import Shard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_RULER = os.path.join(REPO, "run_ruler.py")
RUN_LONGBENCH = os.path.join(REPO, "run_longbench.py")
RULER_ARGS = ["--model_path", "tiny", "--context_lengths", "512", "--tasks", "niah_single_1,niah_single_2",
              "--num_samples", "4", "--method", "SnapKV,FullKV", "--max_capacity_prompts", "64", "--num_threads", "1"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
needs_launcher = pytest.mark.skipif(bool(os.environ.get("PYRAMIDKV_SKIP_LAUNCH_TESTS")),
                                    reason="PYRAMIDKV_SKIP_LAUNCH_TESTS is set")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _rank_env(rank, world=2):
    return _env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))


def _run(cmd, env=None, timeout=120):
    done = subprocess.run(cmd, env=env or _env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _tree(root, key, parts=False):
    """{relative results file: (records by id, line count)} of every results file under root, its part
    files' complete lines included when parts=True; else a part file left behind fails."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            assert parts or not sharding.is_part_file(name), f"part file left: {os.path.join(folder, name)}"
            stem = sharding.results_file_of(name)
            if stem.endswith(".json") and stem not in ("run_meta.json", "results.json"):
                path = os.path.join(folder, name)
                data = open(path, "rb").read()
                lines = data[: data.rfind(b"\n") + 1].decode().splitlines()
                records, count = found.get(os.path.relpath(os.path.join(folder, stem), root), ({}, 0))
                records.update({json.loads(line)[key]: json.loads(line) for line in lines})
                found[os.path.relpath(os.path.join(folder, stem), root)] = (records, count + len(lines))
    return found


@pytest.fixture(scope="module")
def single_ruler(tmp_path_factory):
    """The one-process reference run."""
    root = str(tmp_path_factory.mktemp("single"))
    _run([sys.executable, RUN_RULER, *RULER_ARGS, "--save_dir", root])
    tree = _tree(root, "index")
    assert len(tree) == 4 and all(count == 4 for _, count in tree.values())
    return tree


# ---- split, files, merge ------------------------------------------------------------------------
def test_shard_from_launcher_environment():
    assert sharding.current_shard({}) == Shard(0, 1, 0, 1)
    shard = sharding.current_shard({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert shard == Shard(3, 4, 1, 2) and shard.sharded
    assert [i for i in range(10) if shard.owns(i)] == [3, 7]
    owners = [[i for i in range(10) if Shard(r, 3).owns(i)] for r in range(3)]
    assert sorted(sum(owners, [])) == list(range(10))  # every sample exactly once
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "two"}, {"RANK": "-1", "WORLD_SIZE": "2"}):
        with pytest.raises(CLIError, match="RANK|WORLD_SIZE"):
            sharding.current_shard(bad)


def _write(path, records, tail=b""):
    with open(path, "wb") as f:
        f.write(b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail)


def test_done_ids_cover_the_results_file_and_every_part(tmp_path):
    path = str(tmp_path / "SnapKV.json")
    _write(path, [{"index": 0}])
    _write(path + ".part1of2", [{"index": 1}], tail=b'{"index": 3')  # cut by a kill: not done
    _write(path + ".part2of3", [{"index": 2}])  # an earlier run with another process count
    assert sharding.part_files(path) == [path + ".part1of2", path + ".part2of3"]
    assert sharding.done_ids(path, "index", Shard(0, 2)) == {0, 1, 2}
    assert open(path + ".part1of2", "rb").read().endswith(b'{"index": 3')  # another's file: only read
    assert sharding.done_ids(path, "index", Shard(1, 2)) == {0, 1, 2}
    assert open(path + ".part1of2", "rb").read().endswith(b"}\n")  # its own: the cut line dropped


def test_merge_folds_parts_once_and_skips_repeats_and_cut_lines(tmp_path):
    path = str(tmp_path / "SnapKV.json")
    _write(path, [{"index": 0, "pred": "a"}])
    _write(path + ".part0of2", [{"index": 0, "pred": "a"}, {"index": 2, "pred": "c"}])  # 0: a killed merge's repeat
    _write(path + ".part1of2", [{"index": 1, "pred": "b"}], tail=b'{"index": 3, "pr')
    assert sharding.merge_parts(path, "index") is True
    lines = [json.loads(line) for line in open(path)]
    assert [r["index"] for r in lines] == [0, 2, 1]
    assert sharding.part_files(path) == [] and not os.path.exists(path + ".part1of2.lock")
    assert sharding.merge_parts(path, "index") is None  # nothing left to merge


def test_locks_one_process_run_shards_and_merge(tmp_path):
    path = str(tmp_path / "t" / "SnapKV.json")
    with results_dir.locked([path], Shard(0, 2)):
        with results_dir.locked([path], Shard(1, 2)):  # the other process of the same run
            _write(path + ".part1of2", [{"index": 1}])
            with pytest.raises(CLIError, match="being written by another run"):
                with results_dir.locked([path]):  # a one-process run
                    pass
            with pytest.raises(CLIError, match="part0of2 is being written"):
                with results_dir.locked([path], Shard(0, 2)):  # a second process 0
                    pass
            assert sharding.merge_parts(path, "index") is False  # writers still running
    with results_dir.locked([path]):
        assert sharding.merge_parts(path, "index") is False  # a one-process run holds the file
    assert sharding.merge_parts(path, "index") is True


def test_part_files_count_in_the_settings_check(tmp_path):
    directory = tmp_path / "m_64"
    (directory / "512" / "niah_single_1").mkdir(parents=True)
    part = directory / "512" / "niah_single_1" / "SnapKV.json.part1of2"
    _write(str(part), [{"index": 1}])
    (directory / "512" / "niah_single_1" / "SnapKV.json.part1of2.lock").write_text("pid 1")
    assert results_dir.method_results_files(str(directory), "SnapKV") == [str(part)]
    (directory / "run_meta.json").write_text(json.dumps({"SnapKV": {"settings": {"method": "SnapKV", "seed": 42}}}))
    results_dir.check_settings(str(directory), {"method": "SnapKV", "seed": 42}, None)  # same setting resumes
    with pytest.raises(CLIError, match="seed 42 -> 7"):
        results_dir.check_settings(str(directory), {"method": "SnapKV", "seed": 7}, None)


def test_eval_merges_parts_a_killed_run_left(single_ruler, tmp_path):
    import eval as evaluate
    reference = tmp_path / "ref" / "m_64" / "512" / "niah_single_1"
    sharded = tmp_path / "sh" / "m_64" / "512" / "niah_single_1"
    reference.mkdir(parents=True)
    sharded.mkdir(parents=True)
    records, _ = single_ruler[os.path.join("pyramidkv-tiny-llama_64", "512", "niah_single_1", "SnapKV.json")]
    _write(str(reference / "SnapKV.json"), [records[i] for i in sorted(records)])
    _write(str(sharded / "SnapKV.json.part0of2"), [records[0], records[2]])
    _write(str(sharded / "SnapKV.json.part1of2"), [records[1], records[3]], tail=b'{"pred": "cut')
    assert evaluate.main(["--results_dir", str(tmp_path / "ref" / "m_64")]) == 0
    assert evaluate.main(["--results_dir", str(tmp_path / "sh" / "m_64")]) == 0
    want = json.load(open(tmp_path / "ref" / "m_64" / "results.json"))
    assert json.load(open(tmp_path / "sh" / "m_64" / "results.json")) == want
    assert sorted(os.listdir(sharded)) == ["SnapKV.json", "SnapKV.json.lock"]
    assert sorted(json.loads(line)["index"] for line in open(sharded / "SnapKV.json")) == [0, 1, 2, 3]


# ---- real processes -----------------------------------------------------------------------------
@needs_launcher
def test_accelerate_launch_two_processes_predict_what_one_does(single_ruler, tmp_path):
    root = str(tmp_path / "sharded")
    done = _run([*LAUNCH, RUN_RULER, *RULER_ARGS, "--save_dir", root])
    assert "merged 2 part file(s)" in done.stderr
    assert _tree(root, "index") == single_ruler  # same ids, same text, each line once, no parts left
    meta = json.load(open(os.path.join(root, "pyramidkv-tiny-llama_64", "run_meta.json")))
    assert meta["SnapKV"]["protocol"]["processes"] == 2 and "previous_runs" not in meta["SnapKV"]
    # a one-process rerun of the same setting is not refused: everything is done, nothing is added
    _run([sys.executable, RUN_RULER, *RULER_ARGS, "--save_dir", root])
    assert _tree(root, "index") == single_ruler


@needs_launcher
def test_killed_process_resumes_without_loss_or_repeats(single_ruler, tmp_path):
    root = str(tmp_path / "killed")
    cmd = [sys.executable, RUN_RULER, *RULER_ARGS, "--save_dir", root]
    watched = os.path.join(root, "pyramidkv-tiny-llama_64", "512", "niah_single_1", "SnapKV.json.part1of2")
    rank0 = subprocess.Popen(cmd, env=_rank_env(0), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rank1 = subprocess.Popen(cmd, env=_rank_env(1), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while not (os.path.exists(watched) and open(watched, "rb").read().count(b"\n") >= 1):
        assert rank1.poll() is None and time.time() < deadline, "process 1 ended before its first sample"
        time.sleep(0.005)
    rank1.send_signal(signal.SIGKILL)
    rank1.wait()
    _, err = rank0.communicate(timeout=90)
    assert rank0.returncode == 0, err.decode()[-2000:]
    # what both wrote (merged by process 0 if it ended after the kill, else still in parts) is kept
    partial = _tree(root, "index", parts=True)
    counts = {path: count for path, (_, count) in partial.items()}
    assert sum(counts.values()) < 16, f"the kill came too late to test a resume: {counts}"
    for path, (records, count) in partial.items():
        assert count == len(records) and records.items() <= single_ruler[path][0].items()
    _run([*LAUNCH, RUN_RULER, *RULER_ARGS, "--save_dir", root])  # resume with the launcher
    assert _tree(root, "index") == single_ruler


@needs_launcher
def test_longbench_two_processes_predict_what_one_does(tmp_path):
    args = ["--model_path", "tiny", "--datasets", "qasper,samsum,trec", "--method", "SnapKV",
            "--max_capacity_prompts", "64", "--num_threads", "1"]
    _run([sys.executable, RUN_LONGBENCH, *args, "--save_dir", str(tmp_path / "one")])
    cmd = [sys.executable, RUN_LONGBENCH, *args, "--save_dir", str(tmp_path / "two")]
    ranks = [subprocess.Popen(cmd, env=_rank_env(r), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for r in range(2)]
    for proc in ranks:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
    one = _tree(str(tmp_path / "one"), "_id")
    assert len(one) == 3 and _tree(str(tmp_path / "two"), "_id") == one


@pytest.mark.parametrize("runner", ["run_summarization", "run_qa_choice"])
def test_runners_that_do_not_split_refuse_a_launch(runner, monkeypatch):
    module = __import__(runner)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(CLIError, match=f"{runner}.py does not split its samples"):
        module.main([])
