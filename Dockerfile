# The image a PyTorchJob runs (kubernetes.image in a job spec; charts/orch-job's kubernetes.image).
# It holds the orch package with the bundled trainer (`python -m engine.train`); the job's
# ds_config and spec arrive at run time from the ConfigMap mounted at /etc/orch.
#
#   docker build -t registry.example.com/you/orch:0.1.0 .
#   docker push registry.example.com/you/orch:0.1.0
#
# Not built by our CI (no container engine there), so it stays minimal. The install lines are the
# README's: `pip install torch==2.13.0`, then the project. The README installs editable
# (`pip install -e '.[dev]'`) for development; an image installs the project non-editable
# (`pip install .`) and without the dev extras, so it does not depend on the source tree it was
# built from.
#
# A CUDA runtime base: torch's wheels bring their own CUDA libraries, the base brings the rest
# of the user space the NVIDIA container runtime expects. Override it for another CUDA version:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 .
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# build-essential: Triton (a torch dependency) compiles its kernel launchers with the C compiler
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /opt/orch
# torch first: the large layer stays cached while the project's code changes
RUN pip install torch==2.13.0
# only what the package needs (not a local .venv or run directories)
COPY pyproject.toml README.md ./
COPY orchestrator/ orchestrator/
COPY engine/ engine/
COPY templates/ templates/
COPY charts/ charts/
RUN pip install . && python -c "import engine, orchestrator" && orch --help >/dev/null

# The PyTorchJob's command is `python -m torch.distributed.run ... -m engine.train ...`; `python`
# is the venv's. Checkpoints go to the mounted checkpoint volume (ORCH_CHECKPOINT_DIR).
WORKDIR /orch/run
CMD ["python", "-m", "engine.train", "--help"]
