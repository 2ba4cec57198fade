# Last layer of the stand-in for pytorch/pytorch:<tag> (deploy/ci/build_standins.py): on top of
# Debian + Python 3.11 + torch/torchvision in /opt/conda, the wheels that `pip install .` in
# deploy/Dockerfile needs (setuptools for the build, the project's dependencies), and pip told to
# use only them: the project image then builds with no index and no network.
# The same three lines turn a real pytorch image (docker load) into one that builds offline
# (docs/deploy.md, "A box without a registry").
ARG PYTHON_TORCH
FROM ${PYTHON_TORCH}
COPY wheels /opt/wheels
ENV PIP_NO_INDEX=1 \
    PIP_FIND_LINKS=/opt/wheels
