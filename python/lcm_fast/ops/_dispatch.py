"""Registry of fused ops and the backend each one takes on a device."""

OPS: dict = {}
