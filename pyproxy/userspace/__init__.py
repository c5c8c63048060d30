"""The userspace proxy mode: the kernel redirects service traffic to pyproxy, which copies bytes.

Kept for comparison with the kernel modes (it is how the very first kube-proxy worked).
"""
