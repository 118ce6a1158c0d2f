"""Fault injection for the service tests, loaded by every Python process whose PYTHONPATH holds this folder
(`bentoml serve` and its workers): ONNX Runtime's `InferenceSession.run` starts raising, as a GPU's sticky
CUDA error makes every call raise, after DISTILOPS_TEST_FAIL_AFTER_CALLS successful calls, and (optionally)
stops again after DISTILOPS_TEST_FAIL_CALLS failed ones. Never on the product's path: tests only."""

import os

if os.environ.get("DISTILOPS_TEST_FAIL_AFTER_CALLS"):
    import onnxruntime

    succeed_first = int(os.environ["DISTILOPS_TEST_FAIL_AFTER_CALLS"])
    fail_for = int(os.environ.get("DISTILOPS_TEST_FAIL_CALLS", "0")) or float("inf")
    calls = {"n": 0}
    run = onnxruntime.InferenceSession.run

    def failing_run(self, *args, **kwargs):
        calls["n"] += 1
        if succeed_first < calls["n"] <= succeed_first + fail_for:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected by the test)")
        return run(self, *args, **kwargs)

    onnxruntime.InferenceSession.run = failing_run
