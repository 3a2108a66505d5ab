"""What a user sees when things go wrong or take long: one line per error (never a traceback unless asked for),
Ctrl-C with the command that resumes, help text and a default on every option, and progress that does not flood a
log file."""

from __future__ import annotations

import signal
import subprocess
import time

import click
import pytest

from mimicdet.cli import main
from tests.reliability.helpers import CLI, SUBPROCESS_ENV, assert_refused, cli, cli_subprocess, train_args


def _options():
    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        for p in cmd.params:
            if isinstance(p, click.Option):
                yield " ".join(path), p
    return list(walk(main, []))


def test_every_option_has_help_text():
    missing = [f"{cmd} {p.opts[0]}" for cmd, p in _options() if not (p.help or "").strip()]
    assert missing == []


def test_every_option_with_a_default_shows_it():
    ctx = click.Context(main, info_name="mimic", show_default=True)
    hidden = []
    for cmd, p in _options():
        if not p.required and p.default is not None and not p.is_flag and not p.multiple:
            record = p.get_help_record(ctx)
            if record is None or "default" not in record[1]:
                hidden.append(f"{cmd} {p.opts[0]}")
    assert hidden == []


def test_a_path_under_a_file_is_one_line_before_any_work(world, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    t0 = time.monotonic()
    assert_refused(cli("evaluate", "--model", world / "teacher.pt", "--data", world / "voc", "--out",
                       blocker / "r.json"), 1, r"--out .*r\.json: .*file is a file, not a folder")
    assert time.monotonic() - t0 < 5


def test_verbose_shows_the_traceback(world, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = cli_subprocess("--verbose", "evaluate", "--model", world / "teacher.pt", "--data", world / "voc", "--out",
                       blocker / "r.json")
    assert r.returncode == 1 and "Traceback" in r.stderr


@pytest.mark.slow
def test_an_unreachable_scheduler_fails_fast_and_leaves_nothing(world, tmp_path):
    out = tmp_path / "store"
    t0 = time.monotonic()
    r = cli_subprocess("extract-teacher", "--teacher", world / "teacher.pt", "--data", world / "voc", "--out", out,
                       "--scheduler", "tcp://127.0.0.1:9")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "--scheduler tcp://127.0.0.1:9: no Dask scheduler answers there" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and time.monotonic() - t0 < 25


def test_an_s3_endpoint_that_is_down_is_one_line(world, tmp_path):
    env = dict(SUBPROCESS_ENV, MIMICDET_S3_ENDPOINT="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="k",
               AWS_SECRET_ACCESS_KEY="s")
    r = subprocess.run([*CLI, "inspect-store", "s3://bucket/store"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        'Error: s3://bucket/store: reading manifest.json failed: cannot reach the endpoint (Could not connect to '
        'the endpoint URL: "http://127.0.0.1:9/bucket/store/manifest.json")']


@pytest.mark.slow
def test_ctrl_c_says_where_it_stopped_and_how_to_resume(world, tmp_path):
    run = tmp_path / "run"
    args = [str(a) for a in train_args(world, world / "store", run, "--checkpoint-every", "2")]
    args[args.index("--iters") + 1] = "100000"
    # A suite started in the background (`cmd &` in a script) inherits SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the command the default disposition a terminal would.
    proc = subprocess.Popen([*CLI, *args], env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert f"interrupted; the run resumes from its last checkpoint with: mimic {' '.join(args)}" in err


def test_progress_written_to_a_file_is_a_few_lines(world, tmp_path):
    r = cli_subprocess(*train_args(world, world / "store", tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("student s1")]
    assert "\r" not in r.stderr and 1 <= len(lines) <= 3, r.stderr
