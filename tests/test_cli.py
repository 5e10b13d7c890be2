"""The command line's Prefect settings for flows it runs itself."""


def test_flows_run_from_the_command_line_skip_heartbeats_unless_asked_for(monkeypatch):
    """Prefect's heartbeat thread holds every flow's exit up to a second; runs started by ``ccrk``
    go without it, unless PREFECT_FLOWS_HEARTBEAT_FREQUENCY asks for heartbeats explicitly."""
    from prefect import flow
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    from ccrk.app.cli import build_parser, local_flow_runs

    @flow
    def empty():
        return 1

    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    monkeypatch.delenv("PREFECT_RUNNER_HEARTBEAT_FREQUENCY", raising=False)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 180}):  # Prefect's default: on
        with local_flow_runs():
            assert get_current_settings().flows.heartbeat_frequency is None
            assert empty() == 1
        assert get_current_settings().flows.heartbeat_frequency == 180

        monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60")
        with local_flow_runs():
            assert get_current_settings().flows.heartbeat_frequency == 180

    parser = build_parser()
    flows = {"acquire", "translate", "build", "pretrain", "evaluate", "finetune", "reproduce"}
    for verb, argv in (("build", ["build"]), ("catalog", ["catalog"]), ("verify", ["verify", "x"])):
        assert getattr(parser.parse_args(argv), "runs_flows", False) == (verb in flows)


def test_tables_printed_to_a_file_keep_every_cell_whole(tmp_path):
    """To a pipe or a log there is no width to keep to: a wide table comes out whole, not cut to
    80 columns with "…" (benchmark tables and manifest summaries are read from logs)."""
    import subprocess
    import sys

    code = ("from ccrk.app.console import print_table; "
            "print_table('wide', ['a column heading', 'another column heading', 'third heading', 'fourth heading', "
            "'fifth heading', 'sixth heading'], [('x' * 20, 'y' * 20, 1, 2, 3, 'captions [en]')]); "
            "print_table('narrow', ['a', 'b'], [(1, 2)])")
    env = {k: v for k, v in __import__("os").environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=__import__("os").path.dirname(__import__("os").path.dirname(__file__))).stdout
    assert "…" not in out
    for cell in ("a column heading", "another column heading", "sixth heading", "x" * 20, "y" * 20, "captions [en]"):
        assert cell in out
    assert max(len(line) for line in out.splitlines()) > 80
    narrow = out[out.index("narrow"):].splitlines()
    assert max(len(line.rstrip()) for line in narrow) < 20  # a narrow table stays narrow
