"""runtime.errors.run_trainer, both trainers' entry point: one error policy (one line per node, or from the rank that
alone met a rank-specific error), exit 2 for a user error, 0 for a run that ends, a bug's traceback untouched."""

from __future__ import annotations

import signal

import pytest

from runtime.errors import TrainingError, run_trainer, trainer_main
from vision.data import UnreadableImage


@pytest.fixture(autouse=True)
def _handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _raise(err: BaseException):
    def body() -> None:
        raise err

    return body


@pytest.mark.parametrize("err", [TrainingError("no shards"), ValueError("no shards"), FileNotFoundError("no shards")])
def test_a_user_error_is_one_line_from_the_nodes_first_rank_and_exit_2(monkeypatch, capsys, err) -> None:
    for local_rank, expected in (("0", "vision.train: error: no shards\n"), ("1", "")):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert run_trainer(_raise(err), [], "vision.train") == 2
        captured = capsys.readouterr()
        assert (captured.err, captured.out) == (expected, "")
    monkeypatch.delenv("LOCAL_RANK")
    assert run_trainer(_raise(err), []) == 2  # one process, no launcher: it is the first rank
    assert capsys.readouterr().err == "error: no shards\n"


def test_a_rank_specific_error_is_printed_by_the_rank_that_met_it(monkeypatch, capsys) -> None:
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert run_trainer(_raise(UnreadableImage("cannot decode images/a.png")), [], "vision.train") == 2
    assert capsys.readouterr().err == "vision.train: error: cannot decode images/a.png\n"


def test_a_run_that_ends_exits_0_and_a_bug_keeps_its_traceback(monkeypatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert run_trainer(lambda: {"iterations": 3}, []) == 0
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # stop requests while shutting down are ignored
    with pytest.raises(KeyError):
        run_trainer(_raise(KeyError("a bug")), [])


def test_trainer_main_parses_warns_once_per_node_and_runs_the_body(monkeypatch, capsys) -> None:
    class Engine:
        prog = "demo.train"

        def parse_command_line(self, argv, load, doc):
            return (None, 2) if argv == ["--bad"] else (load(None, argv), 0)

    ran = []
    body = ran.append
    args = (Engine(), lambda path, cli_overrides: {"overrides": cli_overrides}, "doc", body)
    assert trainer_main(*args, ["--bad"]) == 2 and ran == []  # the engine printed why
    for local_rank, expected in (("0", "demo.train: warning: short run\n"), ("1", "")):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert trainer_main(*args, ["--lr", "1"], lambda cfg: ["short run"]) == 0
        assert capsys.readouterr().err == expected
    assert ran == [{"overrides": ["--lr", "1"]}] * 2
