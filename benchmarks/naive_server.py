"""The baseline the serving benchmark compares against: a plain Flask app that runs one forward pass per
request, the usual first deployment of a model.

    python benchmarks/naive_server.py --model models/student --engine pipeline --port 5001
"""

from __future__ import annotations

import argparse

from flask import Flask, jsonify, request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--engine", choices=["pipeline", "distilops"], default="pipeline",
                        help="pipeline: transformers.pipeline (PyTorch); distilops: TextClassifier (ONNX too)")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (distilops engine; 0 = all)")
    args = parser.parse_args()

    if args.engine == "pipeline":
        from transformers import pipeline

        classifier = pipeline("text-classification", model=args.model, device=-1)

        def classify(texts: list[str]) -> list[dict]:
            return [{"label": r["label"], "score": r["score"]} for r in classifier(texts)]
    else:
        from distilops.serving.inference import TextClassifier

        model = TextClassifier(args.model, threads=args.threads or None)

        def classify(texts: list[str]) -> list[dict]:
            return [{"label": r.label, "score": r.score} for r in model.classify(texts)]

    app = Flask(__name__)

    @app.post("/classify")
    def classify_route():
        return jsonify(classify(request.get_json()["texts"]))

    @app.get("/readyz")
    def ready():
        return "ok"

    app.run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
