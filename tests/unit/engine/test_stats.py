"""Step metrics of a trained batch: the evaluator's own metrics become rollout/<name>_mean."""

from __future__ import annotations

from nexrl_async.core.records import Group, TrainBatch, Trajectory, Turn, VersionSpan, VersionToken
from nexrl_async.engine.stats import agent_metrics, batch_metrics, staleness_metrics

TOKEN = VersionToken(lease_id=0, version=0)


def _traj(index: int, reward: float, metrics: dict[str, float]) -> Trajectory:
    turn = Turn(role="assistant", token_ids=[1, 2], loss_mask=[1, 1])
    return Trajectory(
        group_id="g0", item_key="0:0", sample_index=index, token=TOKEN, turns=[turn],
        reward=reward, metrics=metrics,
    )  # fmt: skip


def test_evaluator_metrics_are_averaged_over_the_samples_that_report_them() -> None:
    trajs = [
        _traj(0, 1.0, {"exact": 1.0, "judge": 0.5}),
        _traj(1, 0.5, {"exact": 0.0}),
        _traj(2, 0.0, {"exact": 0.0, "judge": 1.5}),
        _traj(3, 0.5, {"exact": 1.0}),
    ]
    batch = TrainBatch(step=3, groups=[Group(group_id="g0", item_key="0:0", token=TOKEN,
                                             trajectories=trajs)])  # fmt: skip
    metrics = batch_metrics(batch)
    assert metrics["rollout/exact_mean"] == 0.5
    assert metrics["rollout/judge_mean"] == 1.0
    assert metrics["rollout/reward_mean"] == 0.5
    assert metrics["rollout/samples"] == 4.0


def test_an_evaluator_metric_never_hides_the_engines_own() -> None:
    trajs = [_traj(0, 1.0, {"reward": 7.0}), _traj(1, 0.0, {"reward": 7.0})]
    group = Group(group_id="g0", item_key="0:0", token=TOKEN, trajectories=trajs)
    metrics = batch_metrics(TrainBatch(step=0, groups=[group]))
    assert metrics["rollout/reward_mean"] == 0.5


def test_lengths_turns_tools_and_staleness_match_their_per_sample_definitions() -> None:
    def agent(index: int, calls: int, failures: int, version: int) -> Trajectory:
        span = VersionSpan(start=0, end=2, version=version)
        turns = [
            Turn(role="user", token_ids=[5, 6, 7], loss_mask=[0, 0, 0]),
            Turn(role="assistant", token_ids=[1, 2], loss_mask=[1, 1], versions=[span],
                 tool_calls=calls, tool_failures=failures),
            Turn(role="tool", token_ids=[8], loss_mask=[0]),
            Turn(role="assistant", token_ids=[3, 4, 9], loss_mask=[1, 1, 0], versions=[span]),
        ]  # fmt: skip
        return Trajectory(
            group_id=f"g{index}", item_key=f"0:{index}", sample_index=0, token=TOKEN,
            turns=turns, reward=float(index),
        )  # fmt: skip

    trajs = [agent(0, 2, 1, 3), agent(1, 1, 0, 5), agent(2, 0, 0, 4)]
    groups = [
        Group(group_id=t.group_id, item_key=t.item_key, token=TOKEN, trajectories=[t])
        for t in trajs
    ]
    batch = TrainBatch(step=6, groups=groups)
    metrics = batch_metrics(batch)
    assert metrics["rollout/response_len_mean"] == sum(t.num_generated for t in trajs) / 3
    assert metrics | agent_metrics(trajs, "rollout/") == metrics  # same turns and tool values
    assert metrics["rollout/tool_calls_mean"] == 1.0
    assert metrics["rollout/tool_success_rate"] == 2 / 3
    assert metrics | staleness_metrics(batch) == metrics
    assert metrics["pipeline/staleness_max"] == 3.0
