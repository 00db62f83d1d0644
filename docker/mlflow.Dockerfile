# The MLflow tracking server of the full stack (docker-compose.yaml): PostgreSQL
# for metadata, an S3 bucket (MinIO) for artifacts, proxied to clients.
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.18.0
RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" "psycopg[binary]>=3.2" "boto3>=1.34" \
    && useradd --create-home --uid 1000 mlflow
USER mlflow
EXPOSE 5000
# The command (backend store, artifact destination) comes from docker-compose.yaml.
ENTRYPOINT ["mlflow", "server"]
