"""The command line's Prefect settings for flows it runs itself."""


def test_flows_run_from_the_command_line_skip_heartbeats_unless_asked_for(monkeypatch):
    """Prefect's heartbeat thread holds every flow's exit up to a second; runs started by ``ccrk``
    go without it, unless PREFECT_FLOWS_HEARTBEAT_FREQUENCY asks for heartbeats explicitly."""
    from prefect import flow
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings

    from ccrk.cli import build_parser, local_flow_runs

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
