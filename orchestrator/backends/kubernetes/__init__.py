"""The Kubernetes backend: a job is a Kubeflow PyTorchJob plus a ConfigMap, through the API server."""
