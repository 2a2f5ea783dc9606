#!/usr/bin/env bash
# Fill the git-ignored folders that a `device` call carries: .carry/ (the offline CIFAR-10 copy and
# its archive builder) and .whl/ (the Python packages the GPU image lacks, for its Python 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .carry .whl
cp ../shared/cifar10/cifar10-jpeg.tar.gz ../shared/cifar10/make_archive.py .carry/
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
# mlflow for tracking and pydantic for the config, with what they need beyond the GPU image's packages.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  mlflow mlflow-skinny mlflow-tracing pydantic pydantic-core annotated-types typing-inspection \
  alembic mako sqlalchemy greenlet flask flask-cors itsdangerous blinker graphene graphql-core graphql-relay \
  gunicorn docker cachetools databricks-sdk google-auth pyasn1 pyasn1-modules rsa gitpython gitdb smmap \
  opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions sqlparse \
  python-dotenv fastapi starlette uvicorn importlib-metadata skops huey
du -sh .carry .whl
