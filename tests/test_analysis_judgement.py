"""The test harness's reading of Argo Rollouts' analysis (tests/prometheus.py) against Argo's own rules
(utils/evaluate/evaluate.go, v1.9.1), so the end-to-end canary test judges as the controller would."""

import pytest
from prometheus import condition_holds, judge, substitute, template_args


@pytest.mark.parametrize(("metric", "result", "phase"), [
    ({"successCondition": "result[0] >= 0.9"}, [0.95], "Successful"),
    ({"successCondition": "result[0] >= 0.9"}, [0.5], "Failed"),  # only a success condition: not holding fails
    ({"failureCondition": "result[0] > 0.05"}, [0.01], "Successful"),  # only a failure condition
    ({"failureCondition": "result[0] > 0.05"}, [0.2], "Failed"),
    ({"successCondition": "result[0] >= 0.9", "failureCondition": "result[0] < 0.5"}, [0.7], "Inconclusive"),
    ({"successCondition": "result[0] >= 0.9", "failureCondition": "result[0] < 0.5"}, [0.3], "Failed"),
    ({}, [1.0], "Successful"),
])
def test_judgement_follows_argo(metric, result, phase):
    assert judge(metric, result) == phase


def test_conditions_of_another_form_and_empty_results_are_refused():
    with pytest.raises(ValueError, match="not of the form"):
        condition_holds("len(result) > 0", [1.0])
    with pytest.raises(ValueError, match="no value"):
        condition_holds("result[0] > 0", [])
    assert condition_holds("result[0] <= 1e-2", [0.01])


def test_arguments_are_substituted_with_template_defaults():
    template = {"spec": {"args": [{"name": "namespace", "value": "distilops"}, {"name": "canary-hash"}]}}
    args = template_args(template, {"canary-hash": "abc"})
    assert substitute('x{ns="{{args.namespace}}",h="{{ args.canary-hash }}"}', args) == 'x{ns="distilops",h="abc"}'
    with pytest.raises(KeyError, match="stable-hash"):
        substitute("{{args.stable-hash}}", args)
