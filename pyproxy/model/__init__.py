"""The model: Kubernetes objects parsed and validated into an immutable desired state (pure)."""
