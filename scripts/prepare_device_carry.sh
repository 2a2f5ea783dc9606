#!/usr/bin/env bash
# Fill the git-ignored folders that a `device` call carries: .carry/ (the offline CIFAR-10 copy and
# its archive builder) and .whl/ (the Python packages the GPU image lacks, for its Python 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .carry .whl
cp ../shared/cifar10/cifar10-jpeg.tar.gz ../shared/cifar10/make_archive.py .carry/
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 --platform any)
# MLflow for tracking and pydantic for the config, with what they need beyond the GPU image's own
# packages, each at the version this project's environment (.venv) runs, so the set is a tested one.
packages="mlflow mlflow-skinny mlflow-tracing pydantic pydantic-core annotated-types typing-inspection
  alembic mako sqlalchemy greenlet flask flask-cors itsdangerous blinker graphene graphql-core graphql-relay
  gunicorn docker cachetools databricks-sdk google-auth pyasn1 pyasn1-modules rsa gitpython gitdb smmap
  opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions sqlparse
  python-dotenv fastapi starlette uvicorn importlib-metadata skops huey cryptography cffi pycparser
  prettytable wcwidth"
pinned=$(.venv/bin/python - $packages <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

def spec(name):
    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:  # not needed here (another platform or Python): the newest
        return name

print(" ".join(spec(name) for name in sys.argv[1:]))
PY
)
rm -f .whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl $pinned
du -sh .carry .whl
