#!/usr/bin/env python3
"""Renders and lints charts/pushcluster with the Helm v4 SDK (PyPI
helm-python-sdk), for the chart tests in operator/tests/operator/chart.rs.

    helm.py render CHART [--values JSON] [--name NAME] [--namespace NS]
        prints {"templates": {path: text}} as JSON (NOTES.txt included)
    helm.py lint CHART [--values JSON]
        prints Helm's lint result as JSON; exits 1 if it has errors

Helm errors (bad values, template errors) print Helm's message and exit 2.
"""

import argparse
import json
import sys

try:
    import helm_python
except ImportError:
    sys.exit("helm_python is missing: pip install helm-python-sdk")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["render", "lint"])
    parser.add_argument("chart")
    parser.add_argument("--values", default="{}", help="values as JSON")
    parser.add_argument("--name", default="pushcluster")
    parser.add_argument("--namespace", default="pushcluster-system")
    args = parser.parse_args()
    values = json.loads(args.values)

    if args.command == "lint":
        result = helm_python.lint(
            args.chart, values, strict=True, namespace=args.namespace, quiet=False
        )
        json.dump(result, sys.stdout, indent=2, default=str)
        return 1 if result.get("errors") else 0

    chart = helm_python.Chart.load(args.chart)
    try:
        templates = chart.render(
            values, name=args.name, namespace=args.namespace, is_install=True
        )
    finally:
        chart.close()
    json.dump({"templates": templates}, sys.stdout)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except helm_python.HelmError as error:
        # Helm's own message (for example a values.schema.json violation).
        print(error, file=sys.stderr)
        sys.exit(2)
