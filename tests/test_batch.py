"""Batch jobs: JSONL in and out, bad records become error records, and a killed job resumes without loss."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lp.cli.batch import InputError, JsonlWriter, done_keys, read_records
from lp.cli import main
from test_cli import RESULT_FIELDS, ROOT, RUN, base_args, clean_env, json_lines, tiny_dir  # noqa: F401 (fixture)


def write_lines(path, *lines) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_bad_lines_become_error_records_naming_the_line(tmp_path):
    path = write_lines(tmp_path / "in.jsonl",
                       '{"id": "a", "prompt": "x"}',
                       '{"id": "b", "prompt": ',
                       '[1, 2]',
                       '{"prompt": "no id"}',
                       '{"id": "c", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}',
                       '{"id": "d", "messages": [{"role": "user"}]}',
                       '{"id": "e", "prompt": "x", "max_new_tokens": -3}',
                       '{"id": "f", "prompt": "x", "temperature": 0.7}',
                       '{"id": "g", "prompt": "x", "seed": -1}',
                       '',
                       '{"id": 7, "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 5}')
    records = read_records(path)
    errors = {r.key: r.error for r in records}
    assert errors == {
        'id:"a"': None,
        "line:2": "line 2: not valid JSON (Expecting value)",
        "line:3": "line 3: expected a JSON object",
        "line:4": "line 4: has no id",
        'id:"c"': "give exactly one of prompt or messages",
        'id:"d"': 'messages must be a non-empty list of {"role": str, "content": str}',
        'id:"e"': "max_new_tokens must be a positive integer, got -3",
        'id:"f"': "'temperature' is a setting of the whole job, not of a record: give it on the command line "
                  "(--temperature) or in --config; records have id, prompt or messages, max_new_tokens, seed",
        'id:"g"': "seed must be an integer in [0, 9223372036854775807], got -1",
        "id:7": None,
    }
    assert records[-1].max_new_tokens == 5 and records[-1].line == 11


def test_duplicate_ids_are_refused_up_front(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", '{"id": 1, "prompt": "a"}', '{"id": 2, "prompt": "b"}',
                       '{"id": 1, "prompt": "c"}')
    with pytest.raises(InputError, match="id 1 appears on lines 1 and 3; ids must be unique"):
        read_records(path)


def test_a_wholly_unreadable_input_is_an_error(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x80\x81\xff" * 10)
    with pytest.raises(InputError, match="is not UTF-8"):
        read_records(binary)
    with pytest.raises(InputError, match="no line of .* is a JSON object"):
        read_records(write_lines(tmp_path / "a.txt", "just text", "more text"))
    with pytest.raises(InputError, match="is a directory"):
        read_records(tmp_path)


def test_resume_ignores_and_cuts_a_trailing_partial_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "a", "text": "x"}\n{"id": null, "line": 4, "error": "bad"}\n{"id": "b", "te')
    assert done_keys(out) == {'id:"a"', "line:4"}
    assert out.read_bytes().endswith(b'"bad"}\n')  # appending now starts on a fresh line
    assert done_keys(tmp_path / "missing.jsonl") == set()


def test_line_and_paragraph_separators_inside_strings_do_not_split_records(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", '{"id": 1, "prompt": "a\u2028b\u2029c\u0085d"}'.encode().decode(
        "unicode_escape"), '{"id": 2, "prompt": "x"}')
    records = read_records(path)
    assert [(r.id, r.error) for r in records] == [(1, None), (2, None)]


def test_only_result_lines_count_as_done(tmp_path):
    out = write_lines(tmp_path / "out.jsonl", '{"id": "a", "prompt": "an input record"}', '{"id": "b", "text": "x"}',
                      '{"id": "c", "error": "bad"}')
    assert done_keys(out) == {'id:"b"', 'id:"c"'}


def test_input_and_output_may_not_be_the_same_file(tiny_dir, tmp_path, capsys):
    path = write_lines(tmp_path / "jobs.jsonl", '{"id": 1, "prompt": "a"}')
    before = (tmp_path / "jobs.jsonl").read_bytes()
    assert main(base_args(tiny_dir, "--input", path, "--output", path)) == 2
    assert "--input and --output are the same file" in capsys.readouterr().err
    assert (tmp_path / "jobs.jsonl").read_bytes() == before


def test_writer_appends_whole_lines(tmp_path):
    path = tmp_path / "out.jsonl"
    writer = JsonlWriter(path)
    writer.write({"id": 1, "text": "é\nline"})
    writer.write({"id": 2, "text": ""})
    writer.close()
    assert json_lines(path.read_text(encoding="utf-8")) == [{"id": 1, "text": "é\nline"}, {"id": 2, "text": ""}]


@pytest.mark.parametrize("batch_size", ["1", "3"])
def test_a_batch_job_writes_results_and_error_records_and_goes_on(tiny_dir, tmp_path, capsys, batch_size):
    source = write_lines(tmp_path / "in.jsonl",
                         '{"id": "p", "prompt": "def f(x):"}',
                         '{"id": "broken", "prompt": ',
                         '{"id": "m", "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 5}',
                         '{"id": "long", "prompt": "' + "x" * 600 + '"}')
    output = tmp_path / "out.jsonl"
    assert main(base_args(tiny_dir, "--input", source, "--output", str(output), "--compare-greedy",
                          "--batch-size", batch_size)) == 0  # ran to its end; the failed records are in it
    records = {r.get("id") if r.get("id") is not None else r["line"]: r for r in json_lines(output.read_text())}
    assert set(records) == {"p", 2, "m", "long"}
    assert RESULT_FIELDS | {"greedy_match"} <= set(records["p"]) and records["p"]["greedy_match"] is True
    assert records["m"]["new_tokens"] == 5 and records["m"]["greedy_match"] is True
    assert records[2]["error"].startswith("line 2: not valid JSON")
    assert "shorten it" in records["long"]["error"]
    captured = capsys.readouterr()
    summary = json.loads(captured.err.strip().splitlines()[-1])["summary"]
    assert (summary["records"], summary["ok"], summary["errors"]) == (4, 2, 2)
    assert captured.out.splitlines()[-1].startswith("lp: 2 of 4 prompts")

    # Rerunning with the same output skips every id already there (and fails none).
    assert main(base_args(tiny_dir, "--input", source, "--output", str(output))) == 0
    assert len(output.read_text().splitlines()) == 4
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["summary"]["skipped"] == 4


def test_json_batch_prints_one_record_per_input_line(tiny_dir, tmp_path, capsys):
    source = write_lines(tmp_path / "in.jsonl", '{"id": 1, "prompt": "a"}', "oops", '{"id": 2, "prompt": "b"}')
    assert main(base_args(tiny_dir, "--input", source, "--json")) == 0
    records = json_lines(capsys.readouterr().out)
    assert [r.get("id") for r in records] == [1, None, 2] and records[1]["line"] == 2


@pytest.mark.slow
def test_a_killed_job_resumes_with_every_id_exactly_once(tiny_dir, tmp_path):
    ids = [f"r{i}" for i in range(150)]
    source = write_lines(tmp_path / "in.jsonl", *(json.dumps({"id": i, "prompt": f"{i}:abcab"}) for i in ids))
    output = tmp_path / "out.jsonl"
    cmd = [sys.executable, str(RUN), *base_args(tiny_dir, "--input", source, "--output", str(output),
                                                "--max-new-tokens", "24")]
    job = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not output.exists() or output.read_text().count("\n") < 5):
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    done = output.read_bytes()
    assert done.endswith(b"\n") and 5 <= done.count(b"\n") < len(ids), "the kill must land mid-job"
    json_lines(done.decode())  # every line written so far is whole
    with open(output, "ab") as f:
        f.write(b'{"id": "r149", "text": "half a rec')  # as if a machine died mid-write

    rerun = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    records = json_lines(output.read_text())
    assert sorted(r["id"] for r in records) == sorted(ids)
    assert all("error" not in r and r["new_tokens"] == 24 for r in records)


def test_a_second_job_on_the_same_output_is_refused_naming_the_first(tmp_path):
    first = JsonlWriter(tmp_path / "out.jsonl")
    with pytest.raises(InputError, match=rf"another lp job \(pid {os.getpid()}\) is writing .*out.jsonl"):
        JsonlWriter(tmp_path / "out.jsonl")
    first.close()
    JsonlWriter(tmp_path / "out.jsonl").close()  # free again once the first job has closed it


def test_an_output_that_is_not_a_regular_file_is_streamed_to_not_read(tmp_path):
    read_end, write_end = os.pipe()
    pipe = f"/proc/self/fd/{write_end}"
    assert done_keys(pipe) == set()  # reading a pipe for resume would block for ever
    writer = JsonlWriter(pipe)
    writer.write({"id": 1, "text": "x"})
    writer.close()
    os.close(write_end)
    assert json.loads(os.read(read_end, 1000)) == {"id": 1, "text": "x"}
    os.close(read_end)
    JsonlWriter("/dev/null").write({"id": 2, "text": "fsync of /dev/null fails: not attempted"})


def test_a_full_disk_is_one_error_line_that_says_how_to_resume(tiny_dir, tmp_path, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is absent on this system")
    source = write_lines(tmp_path / "in.jsonl", '{"id": 1, "prompt": "a"}')
    assert main(base_args(tiny_dir, "--input", source, "--output", "/dev/full")) == 2
    err = capsys.readouterr().err
    assert "lp: error: cannot write --output '/dev/full': No space left on device" in err
    assert "Traceback" not in err


def test_a_byte_order_mark_is_not_a_bad_first_record(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"id": 1, "prompt": "a"}\n')
    assert [(r.id, r.error) for r in read_records(path)] == [(1, None)]


def test_an_empty_prompt_is_refused_on_the_command_line_as_in_a_record(tiny_dir, capsys):
    assert main(base_args(tiny_dir, "--prompt", "")) == 2
    assert "--prompt must be non-empty text" in capsys.readouterr().err


@pytest.mark.slow
def test_a_terminated_batch_job_says_how_to_resume(tiny_dir, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", *[f'{{"id": {i}, "prompt": "p{i}", "max_new_tokens": 4000}}'
                                                  for i in range(50)])
    out = tmp_path / "out.jsonl"
    job = subprocess.Popen([sys.executable, str(RUN), *base_args(tiny_dir, "--input", source, "--output", str(out))],
                           cwd=ROOT, env=clean_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out.exists() and out.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130
    assert "lp: error: interrupted; rerun the same command to resume" in err and "Traceback" not in err


def test_failed_records_are_retried_on_request_only(tiny_dir, tmp_path):
    long_prompt = "x" * 600  # longer than the tiny model's 512 positions: an error record
    source = write_lines(tmp_path / "in.jsonl", '{"id": "ok", "prompt": "a"}', f'{{"id": "bad", "prompt": "{long_prompt}"}}')
    out = tmp_path / "out.jsonl"
    assert main(base_args(tiny_dir, "--input", source, "--output", str(out))) == 0
    first = json_lines(out.read_text())
    assert {r["id"] for r in first} == {"ok", "bad"} and "error" in next(r for r in first if r["id"] == "bad")
    assert main(base_args(tiny_dir, "--input", source, "--output", str(out))) == 0
    assert json_lines(out.read_text()) == first  # a plain rerun: everything counts as done
    assert main(base_args(tiny_dir, "--input", source, "--output", str(out), "--retry-errors")) == 3  # all failed
    again = json_lines(out.read_text())
    assert again[:2] == first and [r["id"] for r in again[2:]] == ["bad"]  # only the failed id ran again


# -- nothing lost, nothing twice, nothing that stops every rerun ----------------------------------------------

def test_the_lock_is_on_the_file_so_no_other_name_for_it_gets_in(tmp_path):
    out = tmp_path / "out.jsonl"
    first = JsonlWriter(out)
    (tmp_path / "link.jsonl").symlink_to(out)
    os.link(out, tmp_path / "hard.jsonl")
    (tmp_path / "sub").mkdir()
    for name in ("link.jsonl", "hard.jsonl", "sub/../out.jsonl"):
        with pytest.raises(InputError, match="another lp job"):
            JsonlWriter(tmp_path / name)
    assert (tmp_path / "out.jsonl.lock").read_text() == str(os.getpid())  # the note that names the holder
    first.close()
    assert not (tmp_path / "out.jsonl.lock").exists()  # a job leaves no lock file behind
    JsonlWriter(tmp_path / "link.jsonl").close()


def test_a_refusal_names_the_holders_pid_whatever_name_the_second_job_gives_the_file(tmp_path):
    # the note sits beside the first job's name for the file; a hard link elsewhere has no note beside it
    out = tmp_path / "out.jsonl"
    first = JsonlWriter(out)
    (tmp_path / "elsewhere").mkdir()
    os.link(out, tmp_path / "elsewhere" / "hard.jsonl")
    (tmp_path / "out.jsonl.lock").unlink()  # nor does a note that was lost count: the lock itself says who holds it
    try:
        for name in ("elsewhere/hard.jsonl", "out.jsonl"):
            with pytest.raises(InputError, match=f"another lp job \\(pid {os.getpid()}\\)"):
                JsonlWriter(tmp_path / name)
    finally:
        first.close()


def test_an_id_that_is_not_text_is_written_escaped_and_resumes_as_the_same_id(tmp_path):
    out = tmp_path / "out.jsonl"
    writer = JsonlWriter(out)
    writer.write({"id": "sur\udc80id", "text": "x"})
    writer.write({"id": "é", "text": "y"})
    writer.close()
    assert [r["id"] for r in json_lines(out.read_text(encoding="utf-8"))] == ["sur\udc80id", "é"]
    assert done_keys(out) == {'id:"sur\\udc80id"', 'id:"\\u00e9"'}


def test_a_prompt_holding_a_lone_surrogate_is_an_error_record_saying_so(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", '{"id": "s", "prompt": "ab\\udc80c"}',
                       '{"id": "m", "messages": [{"role": "user", "content": "\\ud800"}]}')
    assert [r.error for r in read_records(path)] == [
        "the prompt hold a lone surrogate ('\\udc80' at character 2), which is not text; fix the input's encoding",
        "the messages hold a lone surrogate ('\\ud800' at character 0), which is not text; fix the input's encoding"]


def test_a_suites_extra_fields_are_ignored_and_a_misspelt_field_is_refused(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", '{"id": 1, "prompt": "a", "source": "x", "tags": []}',
                       '{"id": 2, "prompt": "a", "max_new_token": 5}',
                       '{"id": 3, "prompt": ' + "[" * 100000 + "]" * 100000 + "}")
    records = read_records(path)
    assert records[0].error is None and records[0].ignored == ("source", "tags")
    assert records[1].error.startswith("unknown field 'max_new_token'; did you mean 'max_new_tokens'?")
    assert records[2].error == "line 3: nested too deeply to read"  # one line, not the whole job
    for suite in (ROOT / "benchmarks" / "prompts").glob("*.jsonl"):  # the shipped prompt files are inputs too
        assert all(r.error is None for r in read_records(suite)), suite


def test_a_budget_past_any_context_is_clamped_on_every_path(tiny_dir, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", '{"id": 1, "prompt": "ab", "max_new_tokens": ' + str(10**30) + "}",
                         '{"id": 2, "prompt": "b", "max_new_tokens": 3}')
    for flags in ([], ["--batch-size", "2"]):
        out = tmp_path / f"out{len(flags)}.jsonl"
        assert main(base_args(tiny_dir, "--input", source, "--output", str(out), *flags)) == 0
        records = {r["id"]: r for r in json_lines(out.read_text())}
        assert records[1]["stop_reason"] == "context" and records[2]["new_tokens"] == 3


def test_records_on_stdout_go_there_once_and_everything_else_to_stderr(tiny_dir, tmp_path):
    source = write_lines(tmp_path / "in.jsonl", *[f'{{"id": {i}, "prompt": "p{i}"}}' for i in range(3)])
    results = tmp_path / "res.jsonl"
    for extra in ([], ["--json"]):  # `--output /dev/stdout > res.jsonl`, with and without --json
        with open(results, "w") as stdout:
            job = subprocess.run([sys.executable, str(RUN), *base_args(tiny_dir, "--input", source, "--output",
                                                                        "/dev/stdout", *extra)],
                                 cwd=ROOT, env=clean_env(), stdout=stdout, stderr=subprocess.PIPE, text=True,
                                 timeout=300)
        assert job.returncode == 0, job.stderr[-2000:]
        assert [r["id"] for r in json_lines(results.read_text())] == [0, 1, 2]  # nothing overwritten, nothing twice
        assert "lp: 3 of 3 prompts" in job.stderr or '"summary"' in job.stderr
    assert not (tmp_path / "res.jsonl.lock").exists()


def test_a_huge_record_budget_counts_for_the_tuner_as_what_the_context_lets_it_make(tiny_dir, tmp_path, monkeypatch):
    # a record's max_new_tokens 10**30 (clamped to the context when decoded) made a batch job of 3 short records
    # expect 10**30 tokens and compile for 45 s (tools/fault_probe.py's 9_record_huge_batch2)
    cli = sys.modules["lp.cli.main"]
    real, asked = cli.choose_for_batch, []

    def spy(model, base, lanes, job_tokens, *args, **kwargs):
        asked.append(job_tokens)
        return real(model, base, lanes, job_tokens, *args, **kwargs)
    monkeypatch.setattr(cli, "choose_for_batch", spy)
    source = write_lines(tmp_path / "in.jsonl", '{"id": 1, "prompt": "ab ab"}',
                         '{"id": 2, "prompt": "cd cd", "max_new_tokens": ' + str(10 ** 30) + '}')
    out = tmp_path / "out.jsonl"
    args = ["--model", tiny_dir, "--dtype", "float64", "--max-new-tokens", "4", "--batch-size", "2", "--input",
            source, "--output", str(out)]  # self-tuned: no shape setting
    assert main(args) == 0
    assert asked == [4 + (512 - 5)]  # the second record's room in the model's 512 positions, after its 5 tokens
    assert json_lines(out.read_text())[-1]["stop_reason"] == "context"


def test_a_batch_job_whose_every_record_failed_exits_3_for_the_scheduler(tiny_dir, tmp_path, capsys):
    source = write_lines(tmp_path / "in.jsonl", '{"id": 1, "prompt": "' + "x" * 600 + '"}', '{"id": 2}')
    out = tmp_path / "out.jsonl"
    assert main(base_args(tiny_dir, "--input", source, "--output", str(out))) == 3
    assert [("error" in r) for r in json_lines(out.read_text())] == [True, True]
    assert main(base_args(tiny_dir, "--input", source, "--output", str(out))) == 0  # nothing left to run


def test_a_disk_that_fills_up_mid_record_leaves_the_file_ending_with_a_whole_record(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: the write stops part-way, and the part is cut off."""
    out = tmp_path / "out.jsonl"
    script = (f"import resource\nfrom lp.cli.batch import JsonlWriter, OutputError\nw = JsonlWriter({str(out)!r})\n"
              "w.write({'id': 1, 'text': 'short'})\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (60, 60))\n"
              "try:\n    w.write({'id': 2, 'text': 'x' * 200})\nexcept OutputError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "cannot write --output" in done.stdout and "rerun the same command to resume" in done.stdout, done.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [1]
    assert out.read_text().endswith("\n")
